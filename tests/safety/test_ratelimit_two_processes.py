"""Limits, blocks and versions hold across two real server processes (`make run` twice).

Embedded: both share the data dir, so the SQLite cache file holds the
counters. Scaled: both point at the same Redis and PostgreSQL. Blocks and the
active version are kept per process (chat/snapshots.py); a change made in a
third process must still reach both at their next message.
"""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import websockets

from tests.e2e.conftest import REPO, RunningServer, server_env, start_server, stop_server
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


def _in_a_third_process(server: RunningServer, code: str) -> None:
    """Run Django code in another process on the same data, as a staff shell would."""
    result = subprocess.run(
        [sys.executable, "manage.py", "shell", "-c", code],
        cwd=REPO,
        env=server_env(server.data_dir, server.port),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


async def test_a_version_activated_elsewhere_answers_the_next_message_in_both(two_servers):
    a, b = two_servers
    cookie = cookie_header(signed_up_client(a, f"versioned-{uuid.uuid4().hex[:6]}"))
    before = [await _send(server, cookie) for server in (a, b)]
    assert {f["model"] for f in before} == {"demo:demo"}
    _in_a_third_process(
        a,
        "from feedback import versions; versions.version_create(actor_id=None, "
        "model='demo:alpha', fallbacks=[], system_prompt='', temperature=None, "
        "max_tokens=None, activate=True)",
    )
    after = [await _send(server, cookie) for server in (b, a)]
    assert [f["model"] for f in after] == ["demo:alpha", "demo:alpha"]


async def test_a_block_made_elsewhere_refuses_the_next_message_in_both(two_servers):
    a, b = two_servers
    name = f"blocked-{uuid.uuid4().hex[:6]}"
    cookie = cookie_header(signed_up_client(a, name))
    assert [(await _send(server, cookie))["type"] for server in (a, b)] == ["chat.accepted"] * 2
    _in_a_third_process(
        a,
        "from django.contrib.auth import get_user_model; "
        "from chat.safety.limits import abuse_block_create; "
        f"user = get_user_model().objects.get(username='{name}'); "
        "abuse_block_create(subject=f'u:{user.pk}', reason='staff test', seconds=600)",
    )
    refused = [await _send(server, cookie) for server in (b, a)]
    assert [(f["type"], f.get("code")) for f in refused] == [("chat.error", "forbidden")] * 2
    assert "temporarily blocked" in refused[0]["message"]
