"""The chat WebSocket. It owns the socket and nothing else: frames in, frames out.

Each reply is generated in its own task so `chat.stop` and a disconnect are
heard at once; deltas go from that task straight to this socket, never
through the channel layer (NOTES.md: that costs 6-40x CPU per token and drops
messages past capacity). Replies resumed from elsewhere arrive through the
replay hub into this socket's outbox, drained by one pump task.
"""

from __future__ import annotations

import asyncio
import json
import logging
import weakref
from collections.abc import Coroutine
from typing import Any

from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncWebsocketConsumer
from channels.layers import DEFAULT_CHANNEL_LAYER
from django.conf import settings

from chat import pipeline, protocol, selectors, signout
from chat.errors import ChatError, Internal, InvalidInput, NotFound, outage_error
from chat.models import Message
from chat.owners import Owner
from chat.replay import Followed, hub
from monitoring.sentry import capture_exception
from monitoring.services import reply_recover

logger = logging.getLogger(__name__)

# Every frame sent is encoded by this one encoder: json.dumps with an option
# builds a new encoder per call (3.9 against 2.3 us a delta frame).
_FRAME_ENCODER = json.JSONEncoder(ensure_ascii=False)

# How long a disconnect waits for cancelled replies to be stored.
_STORE_GRACE_SECONDS = 10


class ChatConsumer(AsyncWebsocketConsumer):
    @property
    def channel_layer_alias(self) -> str:
        """Subscribe to the channel layer only when it spans processes (scaled mode).

        In-process, every subscribed socket costs the in-memory layer a scan
        on each receive (quadratic with 1,000 sockets), and the replay hub can
        reach this process's sockets directly.
        """
        return DEFAULT_CHANNEL_LAYER if settings.REDIS_URL else "chat-no-layer"

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
        self._outbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._pump: asyncio.Task[None] | None = None
        self._followers: set[asyncio.Task[None]] = set()
        self._group = None
        self._session_group = None
        self._signed_out_closing = False
        await self.accept()
        session_key = self.scope.get("session_key")
        if session_key:
            self._session_group = signout.session_group(session_key)
            if self.channel_layer is not None:
                await self._layer("group_add", self._session_group, self.channel_name)
            else:
                signout.join(self._session_group, self._signed_out)
        if self.owner is not None:
            if self.channel_layer is not None:
                # Also where a deleted account's sockets are told to close.
                self._group = signout.owner_group(self.owner.key)
                await self._layer("group_add", self._group, self.channel_name)
            else:
                hub.join(self.owner.key, self._deliver)
                # An anonymous owner is its session: closed when it signs in.
                signout.join(signout.owner_group(self.owner.key), self._signed_out)

    async def disconnect(self, code: int) -> None:
        if self._session_group is not None:
            if self.channel_layer is not None:
                await self._layer("group_discard", self._session_group, self.channel_name)
            else:
                signout.leave(self._session_group, self._signed_out)
        if self._group is not None:
            await self._layer("group_discard", self._group, self.channel_name)
        elif self.owner is not None:
            hub.leave(self.owner.key, self._deliver)
            signout.leave(signout.owner_group(self.owner.key), self._signed_out)
        hub.detach(self._deliver)
        for follower in self._followers:
            follower.cancel()
        if self._pump is not None:
            self._pump.cancel()
        if settings.CHAT_CANCEL_ON_DISCONNECT:
            tasks = list(self.replies.values())
            for task in tasks:
                task.cancel()
            if tasks:
                await asyncio.wait(tasks, timeout=_STORE_GRACE_SECONDS)
        # Otherwise the replies run on: they are saved, and can be resumed.

    def _signed_out(self, code: int = signout.SIGNED_OUT) -> None:
        """Close the socket: its session ended or its account went (on this socket's loop).

        `code` says which: SIGNED_OUT (the page stops) or SIGNED_IN (it reconnects).
        """
        if self._signed_out_closing:  # both at once: signing out follows a deletion
            return
        self._signed_out_closing = True
        closing = asyncio.get_running_loop().create_task(self.close(code=code))
        self._followers.add(closing)  # the loop keeps only a weak reference
        closing.add_done_callback(self._followers.discard)

    async def session_ended(self, event: dict[str, Any]) -> None:
        # A process of an older release sends no code: it meant signed out.
        code = event.get("code", signout.SIGNED_OUT)
        await self.close(code=code if code in signout.CLOSE_CODES else signout.SIGNED_OUT)

    async def send_json(self, frame: dict[str, Any]) -> None:
        await self.send(text_data=_FRAME_ENCODER.encode(frame))

    def _deliver(self, frame: dict[str, Any]) -> None:
        """Queue a frame from the replay hub; called without awaiting, in order."""
        self._outbox.put_nowait(frame)
        if self._pump is None or self._pump.done():
            self._pump = asyncio.get_running_loop().create_task(self._drain_outbox())

    async def _drain_outbox(self) -> None:
        while True:
            frame = await self._outbox.get()
            try:
                await self.send_json(frame)
            except Exception:
                # The socket is gone; its disconnect handler detaches us.
                return

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
            elif kind == "feedback":
                await self.on_feedback(frame)
            else:
                shown = kind if isinstance(kind, str) and len(kind) <= 40 else "that"
                raise InvalidInput(f"Unknown frame type {shown!r}.")
        except ChatError as exc:
            await self.send_json(exc.frame(client_msg_id=client_msg_id))
        except Exception as exc:
            outage = outage_error(exc)
            if outage is not None:
                logger.warning(
                    "chat frame failed: a service is unreachable (%s)", type(exc).__name__
                )
                await self.send_json(outage.frame(client_msg_id=client_msg_id))
                return
            logger.exception("chat frame failed")
            capture_exception(exc)
            await self.send_json(Internal().frame(client_msg_id=client_msg_id))

    async def on_send(self, request: pipeline.SendRequest) -> None:
        started_at = asyncio.get_running_loop().time()

        def start(result: tuple[pipeline.Accepted, pipeline.Prepared | None]) -> None:
            accepted, prepared = result
            if prepared is not None:
                self._start_reply(accepted, prepared, started_at)

        # The reply starts as soon as the send is stored, from the trip's
        # return, before this coroutine (and a burst's thousand others) resumes.
        accepted, prepared = await pipeline.chat_accept(
            owner=self.owner, request=request, client_ip=self.client_ip, then=start
        )
        if prepared is None:  # a duplicate send: its reply already exists
            await self.send_json(pipeline.accepted_frame(accepted))

    def _start_reply(
        self, accepted: pipeline.Accepted, prepared: pipeline.Prepared, started_at: float
    ) -> None:
        # The reply's task sends chat.accepted itself, once its model call has
        # begun (pipeline.reply_run).
        buffer = hub.open(reply_id=accepted.reply_id, owner_key=accepted.owner_key, task=None)
        task = asyncio.create_task(
            pipeline.reply_run(
                accepted=accepted,
                emit=self.send_json,
                started_at=started_at,
                buffer=buffer,
                prepared=prepared,
            )
        )
        buffer.task = task
        self.replies[accepted.reply_id] = task
        task.add_done_callback(lambda _t: self.replies.pop(accepted.reply_id, None))
        # The owner's other tabs learn of the reply and can resume it.
        started = {
            "type": "chat.started",
            "conversation": accepted.conversation_id,
            "message": accepted.reply_id,
        }
        if self._group is not None:
            _notices.send(
                self._layer(
                    "group_send",
                    self._group,
                    {**started, "type": "reply.started", "origin": self.channel_name},
                )
            )
        else:
            hub.announce(accepted.owner_key, started, origin=self._deliver)

    async def reply_started(self, event: dict[str, Any]) -> None:
        if event.get("origin") != self.channel_name:
            await self.send_json(
                {
                    "type": "chat.started",
                    "conversation": event["conversation"],
                    "message": event["message"],
                }
            )

    async def _layer(self, method: str, *args: Any) -> None:
        """Call the channel layer for a rare control message; never fail the chat for it."""
        if self.channel_layer is None:
            return
        try:
            await asyncio.wait_for(getattr(self.channel_layer, method)(*args), timeout=2)
        except Exception:
            logger.warning("channel layer %s failed", method, exc_info=True)

    async def on_stop(self, request: protocol.StopRequest) -> None:
        owner = self._owner_or_raise()
        task = hub.running_task(request.message_id)
        buffer_owner = hub.owner_of(request.message_id)
        if task is not None and buffer_owner == owner.key:
            # Running in this process: no need to ask the database who owns it.
            task.cancel()
            return
        reply = await database_sync_to_async(selectors.access_reply)(
            owner=owner, message_id=request.message_id
        )
        if reply.status == Message.Status.PENDING:
            await hub.request_stop(reply.pk)

    async def on_resume(self, request: protocol.ResumeRequest) -> None:
        owner = self._owner_or_raise()
        if hub.owner_of(request.message_id) == owner.key:
            hub.attach(reply_id=request.message_id, after=request.after, listener=self._deliver)
            return
        reply = await database_sync_to_async(selectors.access_reply)(
            owner=owner, message_id=request.message_id
        )
        if hub.attach(reply_id=reply.pk, after=request.after, listener=self._deliver):
            return
        follower = asyncio.create_task(self._follow_or_replay_stored(reply, request.after))
        self._followers.add(follower)
        follower.add_done_callback(self._followers.discard)

    async def _follow_or_replay_stored(self, reply: Message, after: int) -> None:
        """Follow a reply this process does not run, or answer it from storage.

        A reply still pending that nobody is generating (its process died)
        is failed now with the text its user saw, as the reaper would later,
        so the page ends it at once instead of waiting forever.
        """
        followed = await self._follow(reply.pk, after, wait_for_stream=False)
        if followed is not None and followed.outcome == "done":
            return
        # "gapped": it ended, but Redis lost part of its stream; the stored
        # text, sent below, is the whole of it.
        fresh = await database_sync_to_async(Message.objects.get)(pk=reply.pk)
        if fresh.status == Message.Status.PENDING and followed is not None:
            if followed.outcome == "absent" and settings.REDIS_URL:
                # Begun on another process a moment ago: wait for its stream.
                followed = await self._follow(reply.pk, after, wait_for_stream=True)
                if followed is not None and followed.outcome == "done":
                    return
            if followed is not None:
                # Embedded: one server process, and it does not know this
                # reply, so the process that began it is gone. Scaled: its
                # writer stopped saying it lives.
                fresh = await database_sync_to_async(reply_recover)(
                    reply_id=reply.pk,
                    seen_text=followed.text if followed.outcome == "interrupted" else None,
                )
                after = max(after, followed.last_seq)
                if followed.outcome == "interrupted" and fresh.status != Message.Status.PENDING:
                    try:
                        await hub.end_interrupted(reply.pk, selectors.done_frame_for(fresh))
                    except Exception:
                        logger.warning("closing the stream of reply %s failed", reply.pk)
        if fresh.status == Message.Status.PENDING:
            # Redis cannot be read, so who runs it is unknown; the reaper
            # will finish it. Tell the client rather than leave it waiting.
            self._deliver(NotFound("That reply was interrupted and is being recovered.").frame())
            return
        self._deliver(stored_replay(fresh, after))
        self._deliver(selectors.done_frame_for(fresh))

    async def _follow(self, reply_id: int, after: int, *, wait_for_stream: bool) -> Followed | None:
        """Follow the reply's stream from another process; None if Redis failed."""
        try:
            return await hub.follow_remote(
                reply_id=reply_id,
                after=after,
                listener=self._deliver,
                wait_for_stream=wait_for_stream,
            )
        except Exception:
            logger.warning("resume from Redis failed for reply %s", reply_id, exc_info=True)
            return None

    async def on_feedback(self, frame: dict[str, Any]) -> None:
        from feedback.services import feedback_submit

        saved = await database_sync_to_async(feedback_submit)(
            owner=self._owner_or_raise(),
            client_ip=self.client_ip,
            message_id=frame.get("message"),
            rating=frame.get("rating"),
            reasons=frame.get("reasons", []),
            comment=frame.get("comment", ""),
        )
        await self.send_json(
            {"type": "feedback.saved", "message": saved.message_id, "rating": saved.rating}
        )

    def _owner_or_raise(self) -> Owner:
        if self.owner is None:
            raise NotFound()
        return self.owner


class _Notices:
    """The owner's other tabs hear of a new reply in the background, a few notices at a time.

    Each of channels_redis' group_send calls holds a Redis connection of its
    own from an unbounded pool, so a burst of 1,000 sends opened hundreds of
    connections at once (and redis-py reads its package metadata for each):
    ~40 % of a scaled server's time in the burst's first seconds. The sender
    does not wait for its notice; the notices of one process go out at most
    IN_FLIGHT at a time, in order.
    """

    IN_FLIGHT = 4

    def __init__(self) -> None:
        self._slots: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Semaphore] = (
            weakref.WeakKeyDictionary()
        )
        self._running: set[asyncio.Task[None]] = set()

    def send(self, notice: Coroutine[Any, Any, None]) -> None:
        loop = asyncio.get_running_loop()
        slots = self._slots.get(loop)
        if slots is None:
            slots = self._slots[loop] = asyncio.Semaphore(self.IN_FLIGHT)

        async def run() -> None:
            try:
                async with slots:
                    await notice
            finally:
                notice.close()  # cancelled while waiting: it never started

        task = loop.create_task(run())
        self._running.add(task)  # the loop keeps only a weak reference
        task.add_done_callback(self._running.discard)


_notices = _Notices()


def stored_replay(reply: Message, after: int) -> dict[str, Any]:
    """Return the stored text as one delta, for a reply whose stream has expired.

    Frame boundaries are not kept in the database, so a client that already
    had part of it (after > 0) gets the whole text under `replace: true`.
    """
    frame: dict[str, Any] = {
        "type": "chat.delta",
        "message": reply.pk,
        "seq": after + 1,
        "text": reply.content,
    }
    if after > 0:
        frame["replace"] = True
    return frame
