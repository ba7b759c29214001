from django.apps import AppConfig


class FeedbackConfig(AppConfig):
    name = "feedback"

    def ready(self) -> None:
        from feedback import (
            checks,  # noqa: F401 - registers the system checks
            versions,  # noqa: F401 - connects the version snapshot's signals
        )
