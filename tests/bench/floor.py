"""The floor: a bare Channels consumer that streams the demo text, nothing else.

Same protocol frames as the app (chat.accepted, one chat.delta per token,
chat.done with usage), same demo text and pacing (it runs the demo provider
itself, configured by the same CHAT_DEMO_* variables), served by uvicorn with
the same flags. No database, sessions, limits, moderation, coalescing, replay
buffers or metrics: what Channels on uvicorn costs by itself.

Run as `uvicorn tests.bench.floor:application`.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
from typing import Any

import django
from django.conf import settings

if not settings.configured:
    settings.configure(
        DEBUG=False,
        ALLOWED_HOSTS=["*"],
        INSTALLED_APPS=["channels"],
        DATABASES={},
        USE_TZ=True,
        LOGGING_CONFIG=None,
    )
    django.setup()

from channels.generic.websocket import AsyncWebsocketConsumer
from channels.routing import ProtocolTypeRouter, URLRouter
from django.urls import path

from chat.providers.base import ChatMessage, StreamOptions, Usage
from chat.providers.demo import DemoProvider

PROVIDER = DemoProvider(
    ttft_ms=int(os.environ.get("CHAT_DEMO_TTFT_MS", "300")),
    tokens_per_second=float(os.environ.get("CHAT_DEMO_TPS", "30")),
    reply_tokens=int(os.environ.get("CHAT_DEMO_REPLY_TOKENS", "120")),
)
_ids = itertools.count(1)


class FloorConsumer(AsyncWebsocketConsumer):
    async def dispatch(self, message: dict[str, Any]) -> None:
        # Channels' stock dispatch hops to a thread to close stale database
        # connections before every event; with no database there is nothing
        # to close, and the app skips that hop too.
        handler = getattr(self, message["type"].replace(".", "_"), None)
        if handler is None:
            raise ValueError(f"No handler for message type {message['type']}")
        await handler(message)

    async def connect(self) -> None:
        self.tasks: set[asyncio.Task[None]] = set()
        await self.accept()

    async def disconnect(self, code: int) -> None:
        for task in self.tasks:
            task.cancel()

    async def send_json(self, frame: dict[str, Any]) -> None:
        await self.send(text_data=json.dumps(frame, ensure_ascii=False))

    async def receive(self, text_data: str | None = None, bytes_data: bytes | None = None) -> None:
        try:
            frame = json.loads(text_data or "")
        except ValueError:
            frame = None
        if not isinstance(frame, dict) or frame.get("type") != "chat.send":
            await self.send_json({"type": "chat.error", "code": "invalid_input", "message": "?"})
            return
        reply_id = next(_ids)
        await self.send_json(
            {
                "type": "chat.accepted",
                "client_msg_id": frame.get("client_msg_id"),
                "conversation": frame.get("conversation") or reply_id,
                "user_message": reply_id,
                "message": reply_id,
                "model": "demo:demo",
            }
        )
        task = asyncio.create_task(self.stream(reply_id, str(frame.get("content", ""))))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def stream(self, reply_id: int, content: str) -> None:
        loop = asyncio.get_running_loop()
        started = loop.time()
        first: float | None = None
        seq = 0
        usage = Usage(prompt_tokens=0, completion_tokens=0)
        messages = [ChatMessage(role="user", content=content)]
        async for event in PROVIDER.stream(messages, StreamOptions(model="demo")):
            if isinstance(event, Usage):
                usage = event
                continue
            seq += 1
            await self.send_json(
                {"type": "chat.delta", "message": reply_id, "seq": seq, "text": event}
            )
            if first is None:
                first = loop.time()
        now = loop.time()
        await self.send_json(
            {
                "type": "chat.done",
                "message": reply_id,
                "finish_reason": usage.finish_reason,
                "model": "demo:demo",
                "cached": False,
                "usage": {
                    "prompt_tokens": usage.prompt_tokens,
                    "completion_tokens": usage.completion_tokens,
                },
                "cost_usd": 0.0,
                "ttft_ms": None if first is None else round((first - started) * 1000),
                "latency_ms": round((now - started) * 1000),
            }
        )


application = ProtocolTypeRouter(
    {"websocket": URLRouter([path("ws/chat/", FloorConsumer.as_asgi())])}
)
