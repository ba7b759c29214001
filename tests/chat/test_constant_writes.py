"""A reply costs the same database work whatever its length (no per-token writes)."""

from __future__ import annotations

import threading

import pytest
from channels.db import database_sync_to_async
from django.db.backends.utils import CursorWrapper

from tests.chat.helpers import recv, recv_until_done, send, send_frame
from tests.conftest import session_cookie_for

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def statements(monkeypatch):
    """Record every SQL statement Django runs, from any thread."""
    seen: list[str] = []
    lock = threading.Lock()
    original = CursorWrapper.execute

    def execute(self, sql, params=None):
        with lock:
            seen.append(sql.split(None, 1)[0].upper())
        return original(self, sql, params)

    monkeypatch.setattr(CursorWrapper, "execute", execute)
    return seen


async def one_reply(comm, content: str) -> dict:
    await send(comm, send_frame(content))
    assert (await recv(comm))["type"] == "chat.accepted"
    return (await recv_until_done(comm))[-1]


async def test_a_5000_token_reply_costs_as_many_queries_as_a_10_token_one(
    ws, make_user, settings, statements
):
    settings.CHAT_RESPONSE_CACHE = False
    cookie = await database_sync_to_async(lambda: session_cookie_for(make_user("alice")))()
    comm = await ws(cookie)
    await one_reply(comm, "warm up the connection")

    counts = {}
    for tokens in (10, 5000):
        settings.CHAT_DEMO_REPLY_TOKENS = tokens
        statements.clear()
        done = await one_reply(comm, f"a reply of {tokens} tokens")
        assert done["usage"]["completion_tokens"] == tokens
        counts[tokens] = sorted(statements)
    assert counts[10] == counts[5000]
    writes = [s for s in counts[5000] if s in ("INSERT", "UPDATE", "DELETE")]
    assert 0 < len(writes) <= 6, counts[5000]
