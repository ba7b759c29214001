"""Two real servers on a Redis of their own, which is killed and brought back mid-reply.

The scaled pass's Redis is shared, so these tests start a throwaway
`redis-server` on a free port and point the servers at it (cache, rate-limit
counters, stream buffers, channel layer and broker), then SIGKILL it.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import websockets

from tests.e2e.conftest import RunningServer, free_port, start_server, stop_server
from tests.e2e.test_real_server import cookie_header, signed_up_client

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(
        not (os.environ.get("DATABASE_URL") and os.environ.get("REDIS_URL")),
        reason="runs in the scaled pass (make test-scaled): needs DATABASE_URL and REDIS_URL",
    ),
]

REDIS_SERVER = shutil.which("redis-server")
if REDIS_SERVER is None:
    if os.environ.get("CI") == "true":
        raise RuntimeError("CI: redis-server is needed to test a Redis outage")
    pytestmark.append(pytest.mark.skip(reason="redis-server is not installed"))

# 60 tokens at 20 a second: a reply lasts 3 s, long enough to kill Redis in it.
PACED = {"CHAT_DEMO_TPS": "20", "CHAT_DEMO_REPLY_TOKENS": "60", "CHAT_WRITER_ALIVE_S": "1"}


class OwnRedis:
    """A redis-server without persistence that can be killed and started again."""

    def __init__(self, directory: Path) -> None:
        self.port = free_port()
        self.directory = directory
        self.process: subprocess.Popen[str] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"

    def start(self) -> None:
        assert REDIS_SERVER is not None
        self.process = subprocess.Popen(
            [
                *(REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1"),
                *("--save", "", "--appendonly", "no", "--dir", str(self.directory)),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        assert self.process.stdout is not None
        for line in self.process.stdout:  # its own word that it listens
            if "Ready to accept connections" in line:
                return
        raise RuntimeError("redis-server did not start")

    def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=10)
        assert self.process.stdout is not None
        self.process.stdout.close()


@pytest.fixture(scope="module")
def redis_and_servers(
    tmp_path_factory: pytest.TempPathFactory, django_db_setup: None
) -> Iterator[tuple[OwnRedis, RunningServer, RunningServer]]:
    redis = OwnRedis(tmp_path_factory.mktemp("redis"))
    redis.start()
    services = {"REDIS_URL": f"{redis.url}/1", "CELERY_BROKER_URL": f"{redis.url}/2"}
    servers: list[RunningServer] = []
    try:
        for name in ("a", "b"):
            servers.append(start_server(tmp_path_factory.mktemp(name), **PACED, **services))
        yield redis, servers[0], servers[1]
    finally:
        for server in servers:
            stop_server(server.process)
        if redis.process is not None and redis.process.poll() is None:
            redis.kill()


@pytest.fixture
def redis_up(redis_and_servers):
    """Each test starts with Redis up, and leaves it up."""
    redis, a, b = redis_and_servers
    if redis.process is None or redis.process.poll() is not None:
        redis.start()
    yield redis, a, b
    if redis.process is None or redis.process.poll() is not None:
        redis.start()


def connect(server: RunningServer, cookie: str) -> websockets.connect:
    return websockets.connect(
        f"ws://127.0.0.1:{server.port}/ws/chat/",
        additional_headers={"Cookie": cookie, "Origin": server.url},
    )


async def recv(socket: websockets.ClientConnection) -> dict:
    """Return the next frame; a socket that goes silent fails the test instead of hanging it."""
    return json.loads(await asyncio.wait_for(socket.recv(), timeout=15))


async def send(socket: websockets.ClientConnection, content: str) -> dict:
    """Send a message (never asked before, so no cached answer); return its chat.accepted."""
    await socket.send(
        json.dumps(
            {
                "type": "chat.send",
                "content": f"{content} {uuid.uuid4().hex[:8]}",
                "client_msg_id": str(uuid.uuid4()),
            }
        )
    )
    while True:
        frame = await recv(socket)
        assert frame["type"] in ("chat.accepted", "chat.started"), frame
        if frame["type"] == "chat.accepted":
            return frame


async def deltas(socket: websockets.ClientConnection, count: int) -> list[dict]:
    got: list[dict] = []
    while len(got) < count:
        frame = await recv(socket)
        assert frame["type"] in ("chat.delta", "chat.started"), frame
        if frame["type"] == "chat.delta":
            got.append(frame)
    return got


async def until_done(socket: websockets.ClientConnection) -> list[dict]:
    frames = [await recv(socket)]
    while frames[-1]["type"] != "chat.done":
        frames.append(await recv(socket))
    return frames


def stored_reply(server: RunningServer, cookie: str, conversation: int) -> dict:
    history = httpx.get(
        f"{server.url}/api/conversations/{conversation}/messages/",
        headers={"Cookie": cookie},
        timeout=10,
    ).json()
    return history["messages"][-1]


async def test_a_reply_streams_on_to_its_end_while_redis_is_down(redis_up):
    """Killing Redis closed every chat socket of every process at once (the
    channel layer's receive raised in each consumer): the replies ran on and
    were stored, but every page lost its stream. The socket now stays open and
    the reply arrives whole."""
    redis, a, _ = redis_up
    client = signed_up_client(a, f"steady-{uuid.uuid4().hex[:6]}")
    cookie = cookie_header(client)
    async with connect(a, cookie) as socket:
        accepted = await send(socket, "Keep talking")
        seen = await deltas(socket, 2)
        redis.kill()
        rest = await until_done(socket)
    assert rest[-1]["finish_reason"] == "stop", rest[-1]
    assert not [f for f in rest if f["type"] == "chat.error"], rest
    shown = seen + [f for f in rest if f["type"] == "chat.delta"]
    assert [f["seq"] for f in shown] == list(range(1, len(shown) + 1))
    stored = stored_reply(a, cookie, accepted["conversation"])
    assert stored["finish_reason"] == "stop"
    assert stored["content"] == "".join(f["text"] for f in shown)


async def test_a_message_sent_while_redis_is_down_is_answered(redis_up):
    """Chat keeps working while Redis is down (decision 0004: rate limits fall
    back to each process). The circuit breaker's shared state, read before each
    model call, raised instead: every message sent during the outage got
    `internal` and no reply. It is now called as if the breaker were closed."""
    redis, _, b = redis_up
    client = signed_up_client(b, f"outage-{uuid.uuid4().hex[:6]}")
    cookie = cookie_header(client)
    redis.kill()
    async with connect(b, cookie) as socket:
        accepted = await send(socket, "Anyone there")
        frames = await until_done(socket)
    assert not [f for f in frames if f["type"] == "chat.error"], frames
    assert frames[-1]["finish_reason"] == "stop", frames[-1]
    shown = [f for f in frames if f["type"] == "chat.delta"]
    stored = stored_reply(b, cookie, accepted["conversation"])
    assert stored["finish_reason"] == "stop"
    assert stored["content"] == "".join(f["text"] for f in shown)


async def test_a_resume_after_redis_came_back_empty_shows_the_whole_reply(redis_up):
    """Redis restarted without its data (persistence is optional, docs/deploy.md)
    mid-reply: the reply's stream then lacks every delta from before the restart
    and during the outage. A resume on another process replayed what was left
    as if it followed on, so the page showed the reply with a hole in it. The
    follower now notices the skipped seq and, when the reply ends, sends the
    stored text whole (`replace: true`)."""
    redis, a, b = redis_up
    client = signed_up_client(a, f"hole-{uuid.uuid4().hex[:6]}")
    cookie = cookie_header(client)
    async with connect(a, cookie) as on_a:
        accepted = await send(on_a, "Mind the gap")
        seen = await deltas(on_a, 2)
        redis.kill()
        await deltas(on_a, 2)  # written while Redis is down: lost to the stream
        redis.start()  # empty
        await deltas(on_a, 2)  # the stream now starts here
        async with connect(b, cookie) as on_b:
            await on_b.send(
                json.dumps(
                    {
                        "type": "chat.resume",
                        "message": accepted["message"],
                        "after": seen[-1]["seq"],
                    }
                )
            )
            rest = await until_done(on_b)
    assert rest[-1]["finish_reason"] == "stop", rest[-1]
    live = [f for f in rest if f["type"] == "chat.delta" and not f.get("replace")]
    assert [f["seq"] for f in live] == list(range(3, len(live) + 3)), "a seq was skipped"
    shown = "".join(f["text"] for f in seen + live)
    whole = [f for f in rest if f.get("replace")]
    if whole:
        shown = whole[-1]["text"]
    assert shown == stored_reply(b, cookie, accepted["conversation"])["content"]


async def test_stop_from_another_process_while_redis_is_down_says_unavailable(redis_up):
    """Stop reaches another process's reply through Redis. While Redis is down
    it cannot, and the user was told `internal` ("Something went wrong on our
    side"), with an error report per click; a send while the database is down
    was answered the same way. Both are now `unavailable` with `retry_after`:
    a service is down, try again shortly. The reply itself runs on and is
    stored."""
    redis, a, b = redis_up
    client = signed_up_client(a, f"halt-{uuid.uuid4().hex[:6]}")
    cookie = cookie_header(client)
    async with connect(a, cookie) as on_a, connect(b, cookie) as on_b:
        accepted = await send(on_a, "Stop me if you can")
        await deltas(on_a, 1)
        redis.kill()
        await on_b.send(json.dumps({"type": "chat.stop", "message": accepted["message"]}))
        refused = await recv(on_b)
        while refused["type"] == "chat.started":
            refused = await recv(on_b)
        rest = await until_done(on_a)
    assert refused["type"] == "chat.error", refused
    assert refused["code"] == "unavailable", refused
    assert refused["retry_after"] >= 1
    assert rest[-1]["finish_reason"] == "stop"
