"""Sign-in, sign-out, sign-up and password reset, each rate-limited.

django-ratelimit's decorator is sync-only, which these views are. It counts
POSTs (the attempts), per IP and, for sign-in and reset, per account named,
so neither one address nor a spread of addresses can hammer one account.
Over the limit the view answers 429 with a page saying when to try again.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from django.conf import settings
from django.contrib.auth import views as auth_views
from django.contrib.auth.forms import AuthenticationForm
from django.http import HttpRequest, HttpResponse, HttpResponseBase, HttpResponseRedirect
from django.shortcuts import render
from django.urls import path
from django_ratelimit.decorators import ratelimit

from chat import adopt, data_views, views
from chat.safety.limits import parse_rate
from monitoring import metrics

View = Callable[..., HttpResponseBase]


def rate_limited(*, scope: str, rate_setting: str, keys: tuple[str, ...]) -> Callable[[View], View]:
    """Count POSTs to a view by each key; over the rate, answer 429 instead of the view."""

    def rate(group: str, request: HttpRequest) -> str:
        return str(getattr(settings, rate_setting))

    def decorate(view: View) -> View:
        @functools.wraps(view)
        def checked(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponseBase:
            if getattr(request, "limited", False):
                metrics.ratelimited(scope)
                _, period = parse_rate(rate(scope, request))
                response = render(
                    request,
                    "registration/too_many_attempts.html",
                    {"wait_minutes": max(1, -(-period // 60))},
                    status=429,
                )
                response["Retry-After"] = str(period)
                return response
            return view(request, *args, **kwargs)

        wrapped: View = checked
        for key in keys:
            wrapped = ratelimit(
                group=f"auth.{scope}:{key}", key=key, rate=rate, method="POST", block=False
            )(wrapped)
        return wrapped

    return decorate


class LoginView(auth_views.LoginView):
    """Django's sign-in page; the chats the visitor had before are kept (chat/adopt.py)."""

    def form_valid(self, form: AuthenticationForm) -> HttpResponse:
        adopt.login_keeping_chats(self.request, form.get_user())
        return HttpResponseRedirect(self.get_success_url())


login = rate_limited(
    scope="login", rate_setting="CHAT_RATELIMIT_LOGIN", keys=("ip", "post:username")
)(LoginView.as_view())
signup = rate_limited(scope="signup", rate_setting="CHAT_RATELIMIT_SIGNUP", keys=("ip",))(
    views.signup
)
password_reset = rate_limited(
    scope="password_reset",
    rate_setting="CHAT_RATELIMIT_PASSWORD_RESET",
    keys=("ip", "post:email"),
)(auth_views.PasswordResetView.as_view())
# Each attempt is a password guess: counted per account and per IP.
account_delete = rate_limited(
    scope="account_delete", rate_setting="CHAT_RATELIMIT_ACCOUNT_DELETE", keys=("ip", "user")
)(data_views.account_delete)

urlpatterns = [
    path("data/", data_views.data_page, name="account-data"),
    path("data/export/", data_views.data_export, name="account-data-export"),
    path("data/delete/", account_delete, name="account-delete"),
    path("data/deleted/", data_views.account_deleted, name="account-deleted"),
    path("login/", login, name="login"),
    path("logout/", auth_views.LogoutView.as_view(), name="logout"),
    path("signup/", signup, name="signup"),
    path("password_reset/", password_reset, name="password_reset"),
    path(
        "password_reset/done/",
        auth_views.PasswordResetDoneView.as_view(),
        name="password_reset_done",
    ),
    path(
        "reset/<uidb64>/<token>/",
        auth_views.PasswordResetConfirmView.as_view(),
        name="password_reset_confirm",
    ),
    path(
        "reset/done/",
        auth_views.PasswordResetCompleteView.as_view(),
        name="password_reset_complete",
    ),
]
