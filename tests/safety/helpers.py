"""Shared helpers for the safety tests."""

from __future__ import annotations

from typing import Any

from channels.db import database_sync_to_async

from chat.models import AbuseBlock, Message
from tests.chat.helpers import recv, recv_until_done, send, send_frame
from tests.conftest import session_cookie_for


@database_sync_to_async
def cookie_for(make_user: Any, username: str | None = "alice") -> str:
    return session_cookie_for(make_user(username) if username else None)


@database_sync_to_async
def reload(message_id: int) -> Message:
    return Message.objects.get(pk=message_id)


@database_sync_to_async
def blocks() -> list[AbuseBlock]:
    return list(AbuseBlock.objects.select_related("lifted_by").order_by("id"))


async def chat(comm: Any, content: str = "Hello there", **extra: Any) -> list[dict[str, Any]]:
    """Send a message; return its frames up to chat.done, or the single chat.error."""
    await send(comm, send_frame(content, **extra))
    first = await recv(comm)
    if first["type"] == "chat.error":
        return [first]
    assert first["type"] == "chat.accepted", first
    return [first, *await recv_until_done(comm)]
