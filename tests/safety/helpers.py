"""Shared helpers for the safety tests."""

from __future__ import annotations

import asyncio
from typing import Any
from urllib.parse import unquote

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


async def asgi_http(
    method: str, path: str, query: bytes, headers: list[tuple[bytes, bytes]], body: bytes
) -> tuple[int, dict[bytes, bytes], bytes]:
    """Send one request through the ASGI application as a server would."""
    from config.asgi import application

    sent: list[dict[str, Any]] = []
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        # As servers decode it: percent-escapes undone, bad UTF-8 replaced.
        "path": unquote(path),
        "raw_path": path.encode("ascii"),
        "query_string": query,
        "root_path": "",
        "headers": headers,
        "client": ("127.0.0.1", 50000),
        "server": ("testserver", 80),
    }
    answered = asyncio.Event()
    asked = False

    async def receive() -> dict[str, Any]:
        nonlocal asked
        if not asked:
            asked = True
            return {"type": "http.request", "body": body, "more_body": False}
        await answered.wait()
        return {"type": "http.disconnect"}

    async def send_(message: dict[str, Any]) -> None:
        sent.append(message)
        if message["type"] == "http.response.body" and not message.get("more_body"):
            answered.set()

    await asyncio.wait_for(application(scope, receive, send_), timeout=10)
    start = next(m for m in sent if m["type"] == "http.response.start")
    content = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return start["status"], dict(start.get("headers", [])), content


async def replies_settled(timeout: float = 10) -> None:
    """Wait for the replies still running in this process, and their Redis flush, to end.

    A test's event loop closes when it ends: a reply still running then
    stays "running" in the replay hub for good, and the next test's Redis
    flusher polls for it forever.
    """
    from chat.replay import hub

    tasks = [b.task for b in hub._buffers.values() if b.task is not None]
    if tasks:
        await asyncio.wait(tasks, timeout=timeout)
    flusher = hub._flusher
    if (
        flusher is not None
        and not flusher.done()
        and flusher.get_loop() is asyncio.get_running_loop()
    ):
        await asyncio.wait([flusher], timeout=timeout)
