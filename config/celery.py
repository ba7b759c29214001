"""The Celery app: tasks are discovered in each Django app's `tasks.py`."""

import os
from typing import Any

from celery import Celery, signals

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings.embedded")

app = Celery("chat")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()


@signals.setup_logging.connect
def logging_setup(**_: Any) -> None:
    """Log from the worker and beat as the web process does: settings.LOGGING.

    Left to itself Celery swaps the root logger's handlers for its own, which
    lack the personal-data redaction (monitoring/logs.py). LOG_LEVEL sets the
    level here too; the command's --loglevel is not used.
    """
    from logging.config import dictConfig

    from django.conf import settings

    dictConfig(settings.LOGGING)
