from django.contrib import admin
from django.urls import include, path

urlpatterns = [
    path("admin/", admin.site.urls),
    path("accounts/", include("chat.account_urls")),
    path("", include("monitoring.urls")),
    path("", include("feedback.urls")),
    path("", include("chat.urls")),
]
