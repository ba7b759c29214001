"""An in-process WebSocket client for the ASGI app.

Channels ships one in `channels.testing`, but importing that package pulls
in daphne (for its live-server case), which this project does not run.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from asgiref.testing import ApplicationCommunicator


class WebsocketCommunicator(ApplicationCommunicator):  # type: ignore[misc]
    def __init__(self, application: Any, path: str, headers: list[tuple[bytes, bytes]]) -> None:
        scope = {
            "type": "websocket",
            "path": path,
            "query_string": b"",
            "headers": headers,
            "subprotocols": [],
            "client": ("127.0.0.1", 50000),
            "server": ("testserver", 80),
        }
        super().__init__(application, scope)

    async def connect(self, timeout: float = 5) -> tuple[bool, Any]:
        await self.send_input({"type": "websocket.connect"})
        response = await self.receive_output(timeout)
        if response["type"] == "websocket.close":
            return False, response.get("code", 1000)
        assert response["type"] == "websocket.accept", response
        return True, response.get("subprotocol")

    async def send_to(self, text_data: str | None = None, bytes_data: bytes | None = None) -> None:
        if text_data is not None:
            await self.send_input({"type": "websocket.receive", "text": text_data})
        else:
            await self.send_input({"type": "websocket.receive", "bytes": bytes_data})

    async def receive_from(self, timeout: float = 5) -> str:
        response = await self.receive_output(timeout)
        assert response["type"] == "websocket.send", f"expected a frame, got {response!r}"
        return str(response["text"])

    async def disconnect(self, code: int = 1000, timeout: float = 15) -> None:
        await self.send_input({"type": "websocket.disconnect", "code": code})
        with contextlib.suppress(asyncio.CancelledError):
            await self.wait(timeout)
