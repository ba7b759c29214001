"""Two server processes on PostgreSQL + Redis, no sticky sessions (the scaled mode)."""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterator

import pytest
import websockets

from tests.e2e.conftest import RunningServer, start_server, stop_server
from tests.e2e.test_real_server import cookie_header, signed_up_client

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(
        not (os.environ.get("DATABASE_URL") and os.environ.get("REDIS_URL")),
        reason="runs in the scaled pass (make test-scaled): needs DATABASE_URL and REDIS_URL",
    ),
]


@pytest.fixture(scope="module")
def two_servers(
    tmp_path_factory: pytest.TempPathFactory, django_db_setup: None
) -> Iterator[tuple[RunningServer, RunningServer]]:
    a = start_server(tmp_path_factory.mktemp("a"), CHAT_DEMO_TPS="20", CHAT_DEMO_REPLY_TOKENS="60")
    b = start_server(tmp_path_factory.mktemp("b"), CHAT_DEMO_TPS="20", CHAT_DEMO_REPLY_TOKENS="60")
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
