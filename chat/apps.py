from django.apps import AppConfig


class ChatConfig(AppConfig):
    name = "chat"
    verbose_name = "Chat"

    def ready(self) -> None:
        from django.contrib.auth import get_user_model
        from django.contrib.auth.signals import user_logged_out
        from django.db.models.signals import post_delete

        from chat import (
            checks,  # noqa: F401 - registers the system checks
            signout,
        )
        from chat.safety import limits  # noqa: F401 - connects the block snapshot's signals

        user_logged_out.connect(signout.on_logged_out, dispatch_uid="chat.signout")
        post_delete.connect(
            signout.on_user_deleted, sender=get_user_model(), dispatch_uid="chat.user_deleted"
        )
