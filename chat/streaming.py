"""Sending a reply's text to the socket as `chat.delta` frames.

Tokens that arrive within `window` seconds of the last frame are coalesced
into the next one, so a fast model does not cost a frame per token; a slow
model's tokens still leave at once. Only text handed to the socket counts as
sent: that is exactly what is stored if the reply is cut short.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import Any

Emit = Callable[[dict[str, Any]], Awaitable[None]]


class DeltaSender:
    def __init__(self, *, emit: Emit, message_id: int, window: float, max_chars: int) -> None:
        self._emit = emit
        self._message_id = message_id
        self._window = window
        self._max_chars = max_chars
        self._loop = asyncio.get_running_loop()
        self._buffer: list[str] = []
        self._buffered = 0
        self._sent: list[str] = []
        self._seq = 0
        self._last_flush = -1e9
        self._first_sent_at: float | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._tail: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()

    @property
    def text(self) -> str:
        """Return everything that has been handed to the socket so far."""
        return "".join(self._sent)

    @property
    def first_sent_at(self) -> float | None:
        return self._first_sent_at

    @property
    def seq(self) -> int:
        return self._seq

    async def push(self, chunk: str) -> None:
        if not chunk:
            return
        self._buffer.append(chunk)
        self._buffered += len(chunk)
        now = self._loop.time()
        if self._buffered >= self._max_chars or now - self._last_flush >= self._window:
            await self.flush()
        elif self._timer is None:
            self._timer = self._loop.call_later(
                self._last_flush + self._window - now, self._flush_soon
            )

    def _flush_soon(self) -> None:
        self._timer = None
        if self._buffer and (self._tail is None or self._tail.done()):
            self._tail = self._loop.create_task(self.flush())

    async def flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        async with self._lock:
            if not self._buffer:
                return
            text = "".join(self._buffer)
            self._buffer.clear()
            self._buffered = 0
            self._seq += 1
            self._last_flush = self._loop.time()
            await self._emit(
                {"type": "chat.delta", "message": self._message_id, "seq": self._seq, "text": text}
            )
            if self._first_sent_at is None:
                self._first_sent_at = self._loop.time()
            self._sent.append(text)

    async def close(self, *, deliver: bool) -> None:
        """Stop the timer; send what is buffered when `deliver`, else drop it."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._tail is not None and not self._tail.done():
            # A frame already on its way is either sent or not; wait to know.
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await asyncio.shield(self._tail)
        if deliver:
            await self.flush()
        else:
            self._buffer.clear()
            self._buffered = 0
