"""System checks for the feedback settings (run by `manage.py check` and at startup)."""

from __future__ import annotations

import re
from typing import Any

from django.conf import settings
from django.core.checks import CheckMessage, Error, register

_SLUG = re.compile(r"^[a-z0-9_]{1,40}$")


@register()
def check_feedback_settings(app_configs: Any = None, **kwargs: Any) -> list[CheckMessage]:
    errors: list[CheckMessage] = []
    for name in ("FEEDBACK_REASONS_UP", "FEEDBACK_REASONS_DOWN"):
        reasons = getattr(settings, name, None)
        if not isinstance(reasons, list | tuple) or not all(
            isinstance(r, str) and _SLUG.match(r) for r in reasons
        ):
            errors.append(
                Error(
                    f"{name} must be a list of slugs (a-z, 0-9, _; up to 40 characters).",
                    id="feedback.E001",
                )
            )
    for name in (
        "FEEDBACK_MAX_COMMENT_CHARS",
        "FEEDBACK_EXPORT_STREAM_MAX",
        "FEEDBACK_ROLLUP_SECONDS",
    ):
        value = getattr(settings, name, None)
        if not isinstance(value, int) or value < 1:
            errors.append(
                Error(f"{name} must be a whole number of at least 1.", id="feedback.E002")
            )
    return errors
