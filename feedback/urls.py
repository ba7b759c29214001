from django.urls import path

from feedback import views

app_name = "feedback"

urlpatterns = [
    path("api/feedback/", views.feedback_api, name="api"),
]
