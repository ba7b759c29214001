"""Small helpers for talking the chat protocol in tests."""

from __future__ import annotations

import json
import uuid
from typing import Any

from tests.asgi_ws import WebsocketCommunicator

TIMEOUT = 10


async def send(comm: WebsocketCommunicator, frame: dict[str, Any] | str) -> None:
    await comm.send_to(text_data=frame if isinstance(frame, str) else json.dumps(frame))


async def recv(comm: WebsocketCommunicator) -> dict[str, Any]:
    return json.loads(await comm.receive_from(timeout=TIMEOUT))


def send_frame(content: str = "Hello there", **extra: Any) -> dict[str, Any]:
    return {"type": "chat.send", "content": content, "client_msg_id": str(uuid.uuid4()), **extra}


async def recv_until_done(comm: WebsocketCommunicator) -> list[dict[str, Any]]:
    """Collect frames up to and including the next chat.done."""
    frames = []
    while True:
        frame = await recv(comm)
        frames.append(frame)
        if frame["type"] == "chat.done":
            return frames


def delta_text(frames: list[dict[str, Any]]) -> str:
    return "".join(f["text"] for f in frames if f["type"] == "chat.delta")
