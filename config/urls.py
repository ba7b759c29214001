import inspect

from django.contrib import admin
from django.urls import include, path
from django.views import defaults

# Django's error pages without their CSRF check: `requires_csrf_token` reads
# `request.POST`, and a body that cannot be parsed (multipart without a
# boundary) raised inside the error handler, so a 400 or 404 became a 500.
# The pages need no token; the context processor still offers one.
handler400 = inspect.unwrap(defaults.bad_request)
handler403 = inspect.unwrap(defaults.permission_denied)
handler404 = inspect.unwrap(defaults.page_not_found)
handler500 = inspect.unwrap(defaults.server_error)

urlpatterns = [
    path("admin/", admin.site.urls),
    path("accounts/", include("chat.account_urls")),
    path("", include("monitoring.urls")),
    path("", include("feedback.urls")),
    path("", include("chat.urls")),
]
