from django.urls import path

from chat import views

app_name = "chat"

urlpatterns = [
    path("", views.index, name="index"),
    path("api/conversations/", views.conversations, name="conversations"),
    path(
        "api/conversations/<int:conversation_id>/",
        views.conversation_detail,
        name="conversation-detail",
    ),
    path(
        "api/conversations/<int:conversation_id>/messages/",
        views.conversation_messages,
        name="conversation-messages",
    ),
]
