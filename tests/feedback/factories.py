"""Factories for conversations, replies and feedback (the rest goes through the public surface)."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from chat.models import Conversation, Message
from feedback.models import ModelVersion


def conversation(*, user: Any = None, session_key: str = "") -> Conversation:
    return Conversation.objects.create(
        user=user, session_key="" if user is not None else (session_key or "sess-x")
    )


def exchange(
    conv: Conversation,
    *,
    question: str = "What is a walking skeleton?",
    answer: str = "A tiny end-to-end slice of the system.",
    status: str = Message.Status.FINISHED,
    finish_reason: str = "stop",
    model: str = "demo:demo",
    version: ModelVersion | None = None,
    **reply_fields: Any,
) -> tuple[Message, Message]:
    """Store a user message and its assistant reply; return both."""
    asked = Message.objects.create(conversation=conv, role=Message.Role.USER, content=question)
    fields: dict[str, Any] = {
        "ttft_ms": 120,
        "latency_ms": 900,
        "prompt_tokens": 20,
        "completion_tokens": 40,
        "cost_usd": Decimal("0.0012"),
    }
    fields.update(reply_fields)
    reply = Message.objects.create(
        conversation=conv,
        role=Message.Role.ASSISTANT,
        content=answer if status == Message.Status.FINISHED else "",
        status=status,
        finish_reason=finish_reason if status == Message.Status.FINISHED else "",
        reply_to=asked,
        model=model,
        version=version,
        **fields,
    )
    return asked, reply


def version(number: int, model: str, **fields: Any) -> ModelVersion:
    return ModelVersion.objects.create(number=number, model=model, **fields)
