from django.apps import AppConfig


class ChatConfig(AppConfig):
    name = "chat"
    verbose_name = "Chat"

    def ready(self) -> None:
        from chat import checks  # noqa: F401 - registers the system checks
        from chat.safety import limits  # noqa: F401 - connects the block snapshot's signals
