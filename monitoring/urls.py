from django.urls import path

from monitoring import views

app_name = "monitoring"

urlpatterns = [
    path("health/live", views.live, name="live"),
]
