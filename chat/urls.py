from django.urls import path

from chat import data_views, views

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
    path(
        "api/conversations/<int:conversation_id>/export/",
        data_views.conversation_export,
        name="conversation-export",
    ),
]
