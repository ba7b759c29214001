"""Two server processes on PostgreSQL + Redis, no sticky sessions (the scaled mode)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import uuid
from collections.abc import Iterator

import httpx
import pytest
import websockets

from tests.e2e.conftest import RunningServer, kill_server, server_pids, start_server, stop_server
from tests.e2e.test_real_server import cookie_header, signed_up_client

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(
        not (os.environ.get("DATABASE_URL") and os.environ.get("REDIS_URL")),
        reason="runs in the scaled pass (make test-scaled): needs DATABASE_URL and REDIS_URL",
    ),
]


# A writer says it lives every 0.2 s and counts as gone 1 s after its last
# word; a quiet stream's follower checks every 0.5 s.
PACED = {"CHAT_DEMO_TPS": "20", "CHAT_DEMO_REPLY_TOKENS": "60", "CHAT_WRITER_ALIVE_S": "1"}


@pytest.fixture(scope="module")
def two_servers(
    tmp_path_factory: pytest.TempPathFactory, django_db_setup: None
) -> Iterator[tuple[RunningServer, RunningServer]]:
    a = start_server(tmp_path_factory.mktemp("a"), **PACED)
    b = start_server(tmp_path_factory.mktemp("b"), **PACED)
    yield a, b
    stop_server(a.process)
    stop_server(b.process)


async def test_a_reply_started_on_one_process_resumes_on_the_other(two_servers):
    a, b = two_servers
    client = signed_up_client(a, f"roamer-{uuid.uuid4().hex[:6]}")
    cookie = cookie_header(client)
    async with websockets.connect(
        f"ws://127.0.0.1:{a.port}/ws/chat/",
        additional_headers={"Cookie": cookie, "Origin": a.url},
    ) as on_a:
        await on_a.send(
            json.dumps(
                {
                    "type": "chat.send",
                    "content": "Cross the seam",
                    "client_msg_id": str(uuid.uuid4()),
                }
            )
        )
        accepted = json.loads(await on_a.recv())
        got = [json.loads(await on_a.recv()) for _ in range(3)]
    assert [f["type"] for f in got] == ["chat.delta"] * 3

    async with websockets.connect(
        f"ws://127.0.0.1:{b.port}/ws/chat/",
        additional_headers={"Cookie": cookie, "Origin": b.url},
    ) as on_b:
        await on_b.send(
            json.dumps(
                {"type": "chat.resume", "message": accepted["message"], "after": got[-1]["seq"]}
            )
        )
        rest = []
        while True:
            frame = json.loads(await on_b.recv())
            rest.append(frame)
            if frame["type"] == "chat.done":
                break
    deltas = got + [f for f in rest if f["type"] == "chat.delta"]
    assert [d["seq"] for d in deltas] == list(range(1, len(deltas) + 1))
    assert rest[-1]["finish_reason"] == "stop"
    history = client.get(f"/api/conversations/{accepted['conversation']}/messages/").json()
    assert history["messages"][-1]["content"] == "".join(d["text"] for d in deltas)


async def test_stop_on_the_other_process_stops_the_reply(two_servers):
    a, b = two_servers
    client = signed_up_client(b, f"stopper-{uuid.uuid4().hex[:6]}")
    cookie = cookie_header(client)
    async with (
        websockets.connect(
            f"ws://127.0.0.1:{a.port}/ws/chat/",
            additional_headers={"Cookie": cookie, "Origin": a.url},
        ) as on_a,
        websockets.connect(
            f"ws://127.0.0.1:{b.port}/ws/chat/",
            additional_headers={"Cookie": cookie, "Origin": b.url},
        ) as on_b,
    ):
        await on_a.send(
            json.dumps(
                {"type": "chat.send", "content": "Stop me", "client_msg_id": str(uuid.uuid4())}
            )
        )
        accepted = json.loads(await on_a.recv())
        assert json.loads(await on_a.recv())["type"] == "chat.delta"
        await on_b.send(json.dumps({"type": "chat.stop", "message": accepted["message"]}))
        while True:
            frame = json.loads(await on_a.recv())
            if frame["type"] == "chat.done":
                break
    assert frame["finish_reason"] == "cancelled"


async def recv(socket: websockets.ClientConnection) -> dict:
    """Return the next frame; a reply followed forever fails the test instead of hanging it."""
    return json.loads(await asyncio.wait_for(socket.recv(), timeout=15))


async def recv_until_done(socket: websockets.ClientConnection) -> list[dict]:
    frames = []
    while True:
        frames.append(await recv(socket))
        if frames[-1]["type"] == "chat.done":
            return frames


async def test_a_reply_whose_process_is_killed_ends_failed_on_the_process_following_it(
    two_servers, tmp_path
):
    """The other process follows a reply that has no text yet (its first token takes
    2.5 s, longer than a dead writer takes to be noticed) without calling it
    interrupted; once the writing process is SIGKILLed, the follower ends the
    reply within about a second, failed, with the text the user saw, and stores it."""
    _, b = two_servers
    doomed = start_server(
        tmp_path, **{**PACED, "CHAT_DEMO_TTFT_MS": "2500", "CHAT_DEMO_REPLY_TOKENS": "400"}
    )
    try:
        client = signed_up_client(doomed, f"crashed-{uuid.uuid4().hex[:6]}")
        cookie = cookie_header(client)
        async with (
            websockets.connect(
                f"ws://127.0.0.1:{doomed.port}/ws/chat/",
                additional_headers={"Cookie": cookie, "Origin": doomed.url},
            ) as on_doomed,
            websockets.connect(
                f"ws://127.0.0.1:{b.port}/ws/chat/",
                additional_headers={"Cookie": cookie, "Origin": b.url},
            ) as on_b,
        ):
            await on_doomed.send(
                json.dumps(
                    {"type": "chat.send", "content": "Crash", "client_msg_id": str(uuid.uuid4())}
                )
            )
            accepted = await recv(on_doomed)
            assert accepted["type"] == "chat.accepted", accepted
            await on_b.send(
                json.dumps({"type": "chat.resume", "message": accepted["message"], "after": 0})
            )
            seen: list[dict] = []
            while len(seen) < 4:  # the other tab may hear chat.started too
                frame = await recv(on_b)
                assert frame["type"] in ("chat.started", "chat.delta"), frame
                if frame["type"] == "chat.delta":
                    seen.append(frame)
            kill_server(doomed)
            rest = await recv_until_done(on_b)
        assert rest[-1]["finish_reason"] == "error"
        assert not [f for f in rest if f["type"] == "chat.error"]
        shown = "".join(
            f["text"] for f in seen + rest if f["type"] == "chat.delta" and not f.get("replace")
        )
        ended = [f for f in rest if f.get("replace")]
        if ended:  # the stored text, sent whole
            shown = ended[-1]["text"]
        history = httpx.get(
            f"{b.url}/api/conversations/{accepted['conversation']}/messages/",
            headers={"Cookie": cookie},
            timeout=10,
        ).json()
        stored = history["messages"][-1]
        assert stored["content"] == shown
        assert stored["content"].startswith("".join(f["text"] for f in seen))
        assert stored["finish_reason"] == "error"
    finally:
        if doomed.process.poll() is None:
            stop_server(doomed.process)
        for pid in server_pids(doomed):  # never leave a process behind
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
