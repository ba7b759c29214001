"""Rate limits hold across two real server processes (`make run` twice).

Embedded: both share the data dir, so the SQLite cache file holds the
counters. Scaled: both point at the same Redis and PostgreSQL.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import websockets

from tests.e2e.conftest import RunningServer, start_server, stop_server
from tests.e2e.test_real_server import cookie_header, signed_up_client

pytestmark = pytest.mark.e2e

LIMIT = 4


@pytest.fixture(scope="module")
def two_servers(
    tmp_path_factory: pytest.TempPathFactory, django_db_setup: None
) -> Iterator[tuple[RunningServer, RunningServer]]:
    shared = tmp_path_factory.mktemp("shared")
    extra = {
        "CHAT_RATELIMIT_USER": f"{LIMIT}/h",
        "CHAT_RATELIMIT_SIGNUP": "100/h",
        "CHAT_DEMO_TTFT_MS": "0",
        "CHAT_DEMO_TPS": "0",
        "CHAT_DEMO_REPLY_TOKENS": "5",
    }
    a = start_server(shared, **extra)
    try:
        b = start_server(shared, **extra)
    except BaseException:
        stop_server(a.process)
        raise
    yield a, b
    stop_server(a.process)
    stop_server(b.process)


async def _send(server: RunningServer, cookie: str) -> dict[str, Any]:
    async with websockets.connect(
        f"ws://127.0.0.1:{server.port}/ws/chat/",
        additional_headers={"Cookie": cookie, "Origin": server.url},
    ) as socket:
        await socket.send(
            json.dumps(
                {"type": "chat.send", "content": "count me", "client_msg_id": str(uuid.uuid4())}
            )
        )
        first = json.loads(await socket.recv())
        if first["type"] == "chat.accepted":
            while json.loads(await socket.recv())["type"] != "chat.done":
                pass
        return first


async def test_the_per_user_counter_is_shared_by_both_processes(two_servers):
    a, b = two_servers
    cookie = cookie_header(signed_up_client(a, f"counted-{uuid.uuid4().hex[:6]}"))
    answers = [await _send(a if i % 2 == 0 else b, cookie) for i in range(LIMIT + 2)]
    kinds = [f["type"] if f["type"] != "chat.error" else f["code"] for f in answers]
    # Exactly LIMIT pass in total, although each process saw only half of them.
    assert kinds == ["chat.accepted"] * LIMIT + ["rate_limited", "rate_limited"]
    assert all(1 <= f["retry_after"] <= 3600 for f in answers[LIMIT:])
