"""The chat WebSocket. It owns the socket and nothing else: frames in, frames out.

Each reply is generated in its own task so `chat.stop` and a disconnect are
heard at once; deltas go from that task straight to this socket, never
through the channel layer (NOTES.md: that costs 6-40x CPU per token and drops
messages past capacity).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
from typing import Any

from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncWebsocketConsumer
from django.conf import settings

from chat import pipeline, protocol, selectors
from chat.errors import ChatError, Internal, InvalidInput
from chat.owners import Owner

logger = logging.getLogger(__name__)

# How long a disconnect waits for cancelled replies to be stored.
_STORE_GRACE_SECONDS = 10


class ChatConsumer(AsyncWebsocketConsumer):
    owner: Owner | None
    client_ip: str
    replies: dict[int, asyncio.Task[None]]

    async def dispatch(self, message: dict[str, Any]) -> None:
        # Channels hops to a worker thread before every event to close stale
        # DB connections; our ORM calls go through database_sync_to_async,
        # which does that itself, so skip the hop (NOTES.md: it cost p99 TTFT).
        handler = getattr(self, message["type"].replace(".", "_"), None)
        if handler is None:
            raise ValueError(f"No handler for message type {message['type']}")
        await handler(message)

    async def connect(self) -> None:
        self.owner = self.scope.get("owner")
        client = self.scope.get("client") or ("", 0)
        self.client_ip = str(client[0])
        self.replies = {}
        await self.accept()

    async def disconnect(self, code: int) -> None:
        tasks = list(self.replies.values())
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=_STORE_GRACE_SECONDS)

    async def send_json(self, frame: dict[str, Any]) -> None:
        await self.send(text_data=json.dumps(frame, ensure_ascii=False))

    async def receive(self, text_data: str | None = None, bytes_data: bytes | None = None) -> None:
        client_msg_id: str | None = None
        try:
            frame = protocol.parse_frame(
                text_data, bytes_data, max_bytes=settings.CHAT_MAX_FRAME_BYTES
            )
            client_msg_id = protocol.client_msg_id_of(frame)
            kind = frame.get("type")
            if kind == "chat.send":
                await self.on_send(protocol.parse_send(frame))
            elif kind == "chat.stop":
                await self.on_stop(protocol.parse_stop(frame))
            elif kind == "chat.resume":
                await self.on_resume(protocol.parse_resume(frame))
            else:
                shown = kind if isinstance(kind, str) and len(kind) <= 40 else "that"
                raise InvalidInput(f"Unknown frame type {shown!r}.")
        except ChatError as exc:
            await self.send_json(exc.frame(client_msg_id=client_msg_id))
        except Exception:
            logger.exception("chat frame failed")
            await self.send_json(Internal().frame(client_msg_id=client_msg_id))

    async def on_send(self, request: pipeline.SendRequest) -> None:
        started_at = asyncio.get_running_loop().time()
        accepted = await pipeline.chat_accept(
            owner=self.owner, request=request, client_ip=self.client_ip
        )
        await self.send_json(pipeline.accepted_frame(accepted))
        if accepted.duplicate:
            return
        task = asyncio.create_task(
            pipeline.reply_run(accepted=accepted, emit=self.send_json, started_at=started_at)
        )
        self.replies[accepted.reply_id] = task
        task.add_done_callback(functools.partial(self._forget_reply, accepted.reply_id))

    def _forget_reply(self, reply_id: int, _task: asyncio.Task[None]) -> None:
        self.replies.pop(reply_id, None)

    async def on_stop(self, request: protocol.StopRequest) -> None:
        task = self.replies.get(request.message_id)
        if task is not None:
            # Our own running reply: no need to ask the database who owns it.
            task.cancel()
            return
        # Not running here: it must still be the caller's, or it does not exist.
        await database_sync_to_async(selectors.access_reply)(
            owner=self._owner_or_raise(), message_id=request.message_id
        )

    async def on_resume(self, request: protocol.ResumeRequest) -> None:
        reply = await database_sync_to_async(selectors.access_reply)(
            owner=self._owner_or_raise(), message_id=request.message_id
        )
        if reply.status == reply.Status.PENDING:
            # Running on this socket already: the client will get the rest live.
            return
        if request.after == 0 and reply.content:
            await self.send_json(
                {"type": "chat.delta", "message": reply.pk, "seq": 1, "text": reply.content}
            )
        with contextlib.suppress(Exception):
            await self.send_json(
                {
                    "type": "chat.done",
                    "message": reply.pk,
                    "finish_reason": reply.finish_reason,
                    "model": reply.model,
                    "cached": False,
                    "usage": {
                        "prompt_tokens": reply.prompt_tokens or 0,
                        "completion_tokens": reply.completion_tokens or 0,
                    },
                    "cost_usd": float(reply.cost_usd),
                    "ttft_ms": reply.ttft_ms,
                    "latency_ms": reply.latency_ms,
                }
            )

    def _owner_or_raise(self) -> Owner:
        from chat.errors import NotFound

        if self.owner is None:
            raise NotFound()
        return self.owner
