"""Your data: download a conversation or everything, delete the account (chat/account.py)."""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.contrib.auth import logout
from django.contrib.auth.base_user import AbstractBaseUser
from django.contrib.auth.decorators import login_required
from django.http import HttpRequest, HttpResponse, StreamingHttpResponse
from django.http.response import HttpResponseBase
from django.shortcuts import redirect, render
from django.views.decorators.http import require_GET, require_POST

from chat import account
from chat.errors import ChatError, NotFound
from chat.views import error_response, owner_of
from config.streaming import streamed


def _download(request: HttpRequest, export: account.Export) -> StreamingHttpResponse:
    response = StreamingHttpResponse(
        streamed(request, export.chunks),
        content_type=export.content_type,
    )
    response["Content-Disposition"] = f'attachment; filename="{export.file_name}"'
    # Personal data: no shared cache keeps a copy.
    response["Cache-Control"] = "private, no-store"
    return response


@require_GET
def conversation_export(request: HttpRequest, conversation_id: int) -> HttpResponseBase:
    """GET ?format=md|json: download one of the caller's conversations."""
    owner = owner_of(request)
    try:
        if owner is None:
            raise NotFound()
        export = account.conversation_export(
            owner=owner, conversation_id=conversation_id, format=request.GET.get("format", "md")
        )
    except ChatError as exc:
        return error_response(exc)
    return _download(request, export)


@require_GET
def data_page(request: HttpRequest) -> HttpResponse:
    """The account page: download everything, delete the account."""
    if not request.user.is_authenticated and not settings.CHAT_ALLOW_ANONYMOUS:
        return redirect(f"/accounts/login/?next={request.path}")
    return render(request, "account/data.html", _page_context(request))


def _page_context(request: HttpRequest, **extra: Any) -> dict[str, Any]:
    return {
        "has_session": owner_of(request) is not None,
        "keeps_numbers": settings.MONITORING_RETENTION_MODE == "anonymise",
        **extra,
    }


@require_GET
def data_export(request: HttpRequest) -> HttpResponseBase:
    """Download everything the caller has here as one JSON file."""
    owner = owner_of(request)
    if owner is None:
        return redirect("account-data")
    return _download(request, account.account_export(owner=owner))


@require_POST
@login_required
def account_delete(request: HttpRequest) -> HttpResponse:
    """Delete the signed-in user's account once they confirm it with their password."""
    user = request.user
    assert isinstance(user, AbstractBaseUser)  # login_required
    try:
        account.check_account_password(user=user, password=request.POST.get("password"))
    except account.WrongPassword as exc:
        context = _page_context(request, delete_error=exc.user_message)
        return render(request, "account/data.html", context, status=400)
    account.account_delete(user_id=user.pk)
    logout(request)
    return redirect("account-deleted")


@require_GET
def account_deleted(request: HttpRequest) -> HttpResponse:
    return render(request, "account/deleted.html")
