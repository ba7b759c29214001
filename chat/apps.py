from django.apps import AppConfig


class ChatConfig(AppConfig):
    name = "chat"
    verbose_name = "Chat"

    def ready(self) -> None:
        from django.contrib.auth.signals import user_logged_out

        from chat import (
            checks,  # noqa: F401 - registers the system checks
            signout,
        )
        from chat.safety import limits  # noqa: F401 - connects the block snapshot's signals

        user_logged_out.connect(signout.on_logged_out, dispatch_uid="chat.signout")
