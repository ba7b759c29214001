"""Reply streams that outlive their socket: replay after a reconnect, live after.

While a reply runs, and for `CHAT_REPLAY_TTL_SECONDS` after it ends, its
deltas are kept with their seq. `chat.resume` replays every delta after
`after` and then continues live, with no gap or duplicate at the seam: the
backlog is read and the listener registered in one step of the event loop.

Embedded mode keeps them in this process. Scaled mode also writes them to a
Redis stream per reply, batched by a per-process flusher (one pipeline per
tick, not a round trip per token), so a resume on another server process
reads the backlog there and follows the stream. Never the channel layer: it
drops messages past capacity (NOTES.md). Stop requests for a reply running on
another process travel the same way: a Redis key the flusher polls.

A process can die mid-reply (a crash, SIGKILL, a deploy) and leave its
stream without an end. Each stream therefore opens with an entry naming the
process that writes it, and while a process has running replies its flusher
keeps a short-lived key saying it lives (one SET a second, whatever the
number of replies). A follower that hears nothing for a while checks that
key; once it has lapsed the reply is reported interrupted, to be failed with
the text its stream holds, instead of being followed forever.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import secrets
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from asgiref.sync import sync_to_async
from django.conf import settings

logger = logging.getLogger(__name__)

Listener = Callable[[dict[str, Any]], None]

_STREAM_KEY = "chat:replay:{}"
_PARTIAL_KEY = "chat:partial:{}"
_STOP_KEY = "chat:stop:{}"
_ALIVE_KEY = "chat:alive:{}"


@dataclass(slots=True)
class Followed:
    """How following a reply on another process ended.

    `outcome` is "done" (its chat.done was handed over), "absent" (no
    process keeps its stream), "interrupted" (the process writing it is
    gone; `text` is every delta its stream holds, `last_seq` the last seq
    handed over) or "gapped" (it ended, but its stream lacks deltas the
    client needs, as after Redis came back empty: its chat.done was not
    handed over, and the stored text should be sent instead).
    """

    outcome: str
    text: str = ""
    last_seq: int = 0


def partial_key(reply_id: int) -> str:
    """Return the cache key of a running reply's checkpointed text (embedded mode),
    or of a finished reply's that could not be stored (either mode)."""
    return _PARTIAL_KEY.format(reply_id)


def store_partials(texts: dict[str, str]) -> None:
    """Keep replies' text where the reaper looks for it: {partial_key(id): text}."""
    from django.core.cache import cache

    cache.set_many(texts, timeout=settings.CHAT_REPLY_MAX_SECONDS * 2)


@dataclass(slots=True)
class ReplyBuffer:
    reply_id: int
    owner_key: str
    texts: list[str] = field(default_factory=list)  # texts[i] has seq i + 1
    done: dict[str, Any] | None = None
    listeners: list[Listener] = field(default_factory=list)
    task: asyncio.Task[None] | None = None
    stopped: bool = False  # a stop from another process has cancelled the task

    def delta(self, seq: int) -> dict[str, Any]:
        return {
            "type": "chat.delta",
            "message": self.reply_id,
            "seq": seq,
            "text": self.texts[seq - 1],
        }


class ReplayHub:
    """The replies this process is generating or generated lately."""

    def __init__(self) -> None:
        self._buffers: dict[int, ReplyBuffer] = {}
        # Each owner's sockets in this process, for rare notices (chat.started).
        self._sockets: dict[str, list[Listener]] = {}
        self._redis_pending: list[tuple[int, dict[str, str]]] = []
        self._flusher: asyncio.Task[None] | None = None
        self._redis: Any = None
        self._redis_loop: asyncio.AbstractEventLoop | None = None
        self._checkpointer: asyncio.Task[None] | None = None
        self._process: tuple[int, str] | None = None
        self._alive_at = 0.0

    @property
    def process_id(self) -> str:
        """Name this process for the streams it writes; a forked child gets its own."""
        pid = os.getpid()
        if self._process is None or self._process[0] != pid:
            self._process = (pid, f"{socket.gethostname()}:{pid}:{secrets.token_hex(4)}")
        return self._process[1]

    # --- the generating side ---------------------------------------------------

    def open(
        self, *, reply_id: int, owner_key: str, task: asyncio.Task[None] | None
    ) -> ReplyBuffer:
        buffer = ReplyBuffer(reply_id=reply_id, owner_key=owner_key, task=task)
        self._buffers[reply_id] = buffer
        if settings.REDIS_URL:
            # The stream exists from now on and names its writer, so a resume
            # on another process follows a reply that has no text yet (queued,
            # or waiting for its first token) rather than finding nothing.
            # This also starts the flusher, which polls for Stop from other
            # processes and says that this one lives.
            self._queue_redis(reply_id, {"writer": self.process_id})
        elif self._checkpointer is None or self._checkpointer.done():
            self._checkpointer = asyncio.get_running_loop().create_task(self._checkpoint_loop())
        return buffer

    def publish_delta(self, buffer: ReplyBuffer, text: str) -> int:
        """Record one delta and hand it to every listener; return its seq."""
        buffer.texts.append(text)
        seq = len(buffer.texts)
        if buffer.listeners:
            frame = buffer.delta(seq)
            for listener in buffer.listeners:
                listener(frame)
        if settings.REDIS_URL:
            self._queue_redis(buffer.reply_id, {"seq": str(seq), "text": text})
        return seq

    def publish_done(self, buffer: ReplyBuffer, frame: dict[str, Any]) -> None:
        buffer.done = frame
        for listener in buffer.listeners:
            listener(frame)
        buffer.listeners.clear()
        buffer.task = None
        if settings.REDIS_URL:
            self._queue_redis(buffer.reply_id, {"done": json.dumps(frame)})
        loop = asyncio.get_running_loop()
        loop.call_later(settings.CHAT_REPLAY_TTL_SECONDS, self._buffers.pop, buffer.reply_id, None)

    def owner_of(self, reply_id: int) -> str | None:
        buffer = self._buffers.get(reply_id)
        return buffer.owner_key if buffer is not None else None

    def running_task(self, reply_id: int) -> asyncio.Task[None] | None:
        buffer = self._buffers.get(reply_id)
        return buffer.task if buffer is not None else None

    # --- an owner's sockets in this process ----------------------------------------

    def join(self, owner_key: str, listener: Listener) -> None:
        self._sockets.setdefault(owner_key, []).append(listener)

    def leave(self, owner_key: str, listener: Listener) -> None:
        sockets = self._sockets.get(owner_key, [])
        if listener in sockets:
            sockets.remove(listener)
        if not sockets:
            self._sockets.pop(owner_key, None)

    def announce(self, owner_key: str, frame: dict[str, Any], *, origin: Listener) -> None:
        """Hand a notice to the owner's other sockets in this process."""
        for listener in self._sockets.get(owner_key, []):
            if listener != origin:
                listener(frame)

    # --- the resuming side -----------------------------------------------------

    def attach(self, *, reply_id: int, after: int, listener: Listener) -> bool:
        """Replay deltas after `after` to `listener` and keep it posted; False if unknown here.

        Everything happens without an await, so no delta can slip between the
        backlog and the live feed. A listener already posted gets the backlog
        it asked for again but stays posted once: each resume added it anew,
        so k resumes sent every later delta k times, and a client's small
        frames could grow the list without bound.
        """
        buffer = self._buffers.get(reply_id)
        if buffer is None:
            return False
        for seq in range(max(after, 0) + 1, len(buffer.texts) + 1):
            listener(buffer.delta(seq))
        if buffer.done is not None:
            listener(buffer.done)
        elif listener not in buffer.listeners:
            buffer.listeners.append(listener)
        return True

    def detach(self, listener: Listener) -> None:
        for buffer in self._buffers.values():
            if listener in buffer.listeners:
                buffer.listeners.remove(listener)

    async def follow_remote(
        self, *, reply_id: int, after: int, listener: Listener, wait_for_stream: bool = False
    ) -> Followed:
        """Replay and follow a reply generated by another process (scaled mode).

        Without a stream the answer is "absent" at once, unless
        `wait_for_stream` (the reply is known to be pending): then its writer
        has CHAT_WRITER_ALIVE_S to open it before the reply counts as
        interrupted. A stream that goes quiet for half that long has its
        writer's liveness checked; one that never named its writer (written
        by an older release) is given up after CHAT_REPLY_MAX_SECONDS.
        """
        if not settings.REDIS_URL:
            return Followed("absent")
        redis = self._client()
        key = _STREAM_KEY.format(reply_id)
        if not wait_for_stream and not await redis.exists(key):
            return Followed("absent")
        alive_s = settings.CHAT_WRITER_ALIVE_S
        quiet_ms = max(int(alive_s * 500), 50)
        last_id = "0-0"
        writer: str | None = None
        texts: dict[int, str] = {}
        last_seq = after
        # Set once the stream skips a seq the client has not had: Redis lost
        # part of it (restarted empty, or a flush failed). Deltas after the
        # hole are not sent, so the page never shows a text with a hole in it.
        gapped = False
        heard_at = time.monotonic()

        def interrupted() -> Followed:
            # The text up to the stream's first hole, if it has one.
            held: list[str] = []
            while len(held) + 1 in texts:
                held.append(texts[len(held) + 1])
            return Followed("interrupted", text="".join(held), last_seq=last_seq)

        while True:
            batches = await redis.xread({key: last_id}, block=quiet_ms, count=500)
            if not batches:
                quiet_s = time.monotonic() - heard_at
                if writer is not None:
                    if not await redis.exists(_ALIVE_KEY.format(writer)):
                        return interrupted()
                elif last_id == "0-0":
                    if quiet_s >= alive_s:  # pending, yet nobody opened its stream
                        return interrupted()
                elif quiet_s >= settings.CHAT_REPLY_MAX_SECONDS:
                    return interrupted()
                continue
            heard_at = time.monotonic()
            for entry_id, fields in batches[0][1]:
                last_id = entry_id
                if b"done" in fields:
                    if gapped:
                        return Followed("gapped", last_seq=after)
                    listener(json.loads(fields[b"done"]))
                    return Followed("done", last_seq=last_seq)
                if b"writer" in fields:
                    writer = fields[b"writer"].decode()
                    continue
                seq = int(fields[b"seq"])
                texts[seq] = fields[b"text"].decode()
                if seq > last_seq + 1:
                    gapped = True
                if seq > last_seq and not gapped:
                    last_seq = seq
                    listener(
                        {
                            "type": "chat.delta",
                            "message": reply_id,
                            "seq": seq,
                            "text": texts[seq],
                        }
                    )

    async def end_interrupted(self, reply_id: int, done: dict[str, Any]) -> None:
        """Close the stream of a reply failed after its writer died (scaled mode).

        Later resumes, on any process, then replay it and end at once instead
        of each waiting to find the writer gone.
        """
        if settings.REDIS_URL:
            key = _STREAM_KEY.format(reply_id)
            async with self._client().pipeline(transaction=False) as pipe:
                pipe.xadd(key, {"done": json.dumps(done)})
                pipe.expire(key, settings.CHAT_REPLAY_TTL_SECONDS)
                await pipe.execute()

    async def request_stop(self, reply_id: int) -> None:
        """Ask whichever process runs this reply to stop it."""
        if settings.REDIS_URL:
            await self._client().set(_STOP_KEY.format(reply_id), b"1", ex=600)

    def stop_from_thread(self, reply_ids: list[int]) -> None:
        """Stop these replies wherever they run; for code off the event loop (a view).

        A reply this process runs is cancelled on its own loop; in the scaled
        mode the stop key is also set, for a reply another process runs (its
        flusher polls the key, as for `chat.stop`).
        """
        for reply_id in reply_ids:
            buffer = self._buffers.get(reply_id)
            task = buffer.task if buffer is not None else None
            if task is not None and not task.done():
                task.get_loop().call_soon_threadsafe(task.cancel)
        if not settings.REDIS_URL or not reply_ids:
            return
        import redis

        client = redis.Redis.from_url(
            settings.REDIS_URL, socket_timeout=3, socket_connect_timeout=3
        )
        try:
            with client.pipeline(transaction=False) as pipe:
                for reply_id in reply_ids:
                    pipe.set(_STOP_KEY.format(reply_id), b"1", ex=600)
                pipe.execute()
        except redis.RedisError:
            logger.warning("could not ask for %d replies to stop", len(reply_ids), exc_info=True)
        finally:
            client.close()

    # --- embedded mode: checkpoints for the reaper ----------------------------------

    async def _checkpoint_loop(self) -> None:
        """Copy running replies' text to the shared cache every few seconds.

        In one process there is no Redis stream to read back; if this process
        dies, the reaper (in the Celery worker) finds the text the user saw
        here. One cache write per running reply per tick, whatever its token
        rate; the database is not touched.
        """
        interval = settings.CHAT_PARTIAL_CHECKPOINT_S
        written: dict[int, int] = {}
        while True:
            await asyncio.sleep(interval)
            running = [b for b in self._buffers.values() if b.task is not None]
            if not running:
                return
            changed = {
                partial_key(b.reply_id): "".join(b.texts)
                for b in running
                if written.get(b.reply_id) != len(b.texts) and b.texts
            }
            for b in running:
                written[b.reply_id] = len(b.texts)
            if changed:
                try:
                    await sync_to_async(store_partials, thread_sensitive=False)(changed)
                except Exception:
                    logger.warning("replay checkpoint failed", exc_info=True)

    # --- Redis -------------------------------------------------------------------

    def _client(self) -> Any:
        loop = asyncio.get_running_loop()
        if self._redis is None or self._redis_loop is not loop:
            import redis.asyncio as aioredis

            self._redis = aioredis.from_url(
                settings.REDIS_URL, socket_timeout=10, socket_connect_timeout=3
            )
            self._redis_loop = loop
            self._flusher = None
        return self._redis

    def _queue_redis(self, reply_id: int, fields: dict[str, str]) -> None:
        self._redis_pending.append((reply_id, fields))
        self._ensure_flusher()

    def _ensure_flusher(self) -> None:
        self._client()
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.get_running_loop().create_task(self._flush_loop())

    async def _flush_loop(self) -> None:
        interval = settings.CHAT_REPLAY_FLUSH_MS / 1000
        while True:
            await asyncio.sleep(interval)
            pending, self._redis_pending = self._redis_pending, []
            running = [b.reply_id for b in self._buffers.values() if b.task is not None]
            if not pending and not running:
                return
            try:
                await self._flush(pending, running)
            except Exception:
                # Redis being down must not break the replies themselves:
                # only resuming on another process is lost meanwhile.
                logger.warning("replay flush to Redis failed", exc_info=True)

    async def _flush(self, pending: list[tuple[int, dict[str, str]]], running: list[int]) -> None:
        redis = self._client()
        ttl = settings.CHAT_REPLAY_TTL_SECONDS
        async with redis.pipeline(transaction=False) as pipe:
            touched: set[int] = set()
            for reply_id, fields in pending:
                pipe.xadd(_STREAM_KEY.format(reply_id), fields)
                touched.add(reply_id)
            for reply_id in touched:
                # A running reply's stream lives as long as the longest reply
                # may; a finished one for the replay TTL.
                pipe.expire(_STREAM_KEY.format(reply_id), ttl + settings.CHAT_REPLY_MAX_SECONDS)
            if running:
                now = time.monotonic()
                alive_s = settings.CHAT_WRITER_ALIVE_S
                if now - self._alive_at >= alive_s / 5:
                    # Followers on other processes check this key when a
                    # stream goes quiet; it lapses soon after this process dies.
                    pipe.set(_ALIVE_KEY.format(self.process_id), b"1", px=int(alive_s * 1000))
                    self._alive_at = now
                pipe.mget([_STOP_KEY.format(r) for r in running])
            results = await pipe.execute()
        if running:
            for reply_id, flag in zip(running, results[-1], strict=True):
                buffer = self._buffers.get(reply_id)
                # Once: the flag stays set while the stopped reply is stored.
                if flag and buffer is not None and buffer.task is not None and not buffer.stopped:
                    buffer.stopped = True
                    buffer.task.cancel()


hub = ReplayHub()
