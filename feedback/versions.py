"""Which model/prompt version answers a conversation."""

from __future__ import annotations

from dataclasses import dataclass

from django.conf import settings


@dataclass(frozen=True, slots=True)
class ActiveVersion:
    version_id: int | None
    model: str
    fallbacks: tuple[str, ...]
    system_prompt: str
    temperature: float | None
    max_tokens: int | None


def version_for(*, conversation_id: int) -> ActiveVersion:
    """Return the version that should answer this conversation's next message."""
    return ActiveVersion(
        version_id=None,
        model=settings.CHAT_MODEL,
        fallbacks=tuple(settings.CHAT_FALLBACK_MODELS),
        system_prompt=settings.CHAT_SYSTEM_PROMPT,
        temperature=None,
        max_tokens=None,
    )
