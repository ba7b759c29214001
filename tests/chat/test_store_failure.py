"""A finished reply that cannot be stored: tried again, and if it never is,
the user is told, the socket never hangs, and the reaper keeps the text."""

from __future__ import annotations

import logging

import pytest
from channels.db import database_sync_to_async
from django.conf import settings as django_settings
from django.db import OperationalError

from chat import pipeline, services
from chat.models import Message
from monitoring import tasks
from tests.chat.helpers import delta_text, recv, recv_until_done, send, send_frame
from tests.chat.test_response_cache import reload, user_cookie

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def failing_store(monkeypatch):
    """Make storing a finished reply fail the next `times` tries (every try by default)."""
    monkeypatch.setattr(pipeline, "FINISH_RETRY_DELAYS_S", (0.01, 0.01, 0.01))
    real = services.reply_finish
    left = {"times": 10**6}

    def reply_finish(**kwargs):
        if left["times"] > 0:
            left["times"] -= 1
            raise OperationalError("database is locked")
        return real(**kwargs)

    monkeypatch.setattr(services, "reply_finish", reply_finish)
    return left


async def test_a_store_that_fails_for_a_moment_costs_the_reply_nothing(
    ws, make_user, failing_store, caplog
):
    failing_store["times"] = 2
    comm = await ws(await user_cookie(make_user, "alice"))
    await send(comm, send_frame("Tell me about circuit breakers"))
    accepted = await recv(comm)
    frames = await recv_until_done(comm)

    assert [f["type"] for f in frames if f["type"] == "chat.error"] == []
    assert frames[-1]["finish_reason"] == "stop"
    reply = await reload(accepted["message"])
    assert reply.status == Message.Status.FINISHED and reply.finish_reason == "stop"
    assert reply.content == delta_text(frames)
    tries = [r for r in caplog.records if "not stored yet" in r.getMessage()]
    assert len(tries) == 2 and all(r.levelno == logging.WARNING for r in tries)


async def test_a_reply_that_is_never_stored_is_said_and_reaped_with_its_text(
    ws, make_user, failing_store, caplog, settings, monkeypatch
):
    reported: list[BaseException] = []
    monkeypatch.setattr(pipeline, "report_exception", reported.append)
    comm = await ws(await user_cookie(make_user, "alice"))
    await send(comm, send_frame("Tell me about circuit breakers"))
    accepted = await recv(comm)
    frames = await recv_until_done(comm)

    shown = delta_text(frames)
    assert shown
    error, done = frames[-2], frames[-1]
    assert error["type"] == "chat.error" and error["code"] == "internal"
    assert error["message"] == "Your reply could not be saved. Please try again."
    assert done["finish_reason"] == "error" and done["cost_usd"] == 0.0
    # The socket still serves: the next message is answered.
    failing_store["times"] = 0
    await send(comm, send_frame("And what is a bulkhead?"))
    assert (await recv(comm))["type"] == "chat.accepted"
    assert (await recv_until_done(comm))[-1]["finish_reason"] == "stop"

    reply = await reload(accepted["message"])
    assert reply.status == Message.Status.PENDING
    (logged,) = [r for r in caplog.records if "could not be stored" in r.getMessage()]
    assert logged.levelno == logging.ERROR
    assert str(accepted["message"]) in logged.getMessage()
    assert not any(shown in r.getMessage() for r in caplog.records)
    # Sentry hears of it by the error's type, never a database message that may quote the row.
    assert [repr(e) for e in reported] == ["ReplyNotStored('OperationalError')"]

    if django_settings.REDIS_URL:  # the replay stream outlives a reply by minutes only
        await _expire_replay_stream(accepted["message"])
    settings.MONITORING_REAP_AFTER_S = 0
    await database_sync_to_async(tasks.replies_reap.apply)()
    reply = await reload(accepted["message"])
    assert reply.status == Message.Status.FINISHED
    assert (reply.finish_reason, reply.error_code) == ("error", "unavailable")
    assert reply.content == shown


async def _expire_replay_stream(reply_id: int) -> None:
    """Delete the reply's replay stream once its end is written, as its TTL would."""
    import redis.asyncio as aioredis

    key = f"chat:replay:{reply_id}"
    client = aioredis.from_url(django_settings.REDIS_URL)
    try:
        last, ended = "0-0", False
        while not ended:  # the flusher writes it every CHAT_REPLAY_FLUSH_MS
            batches = await client.xread({key: last}, block=10_000)
            assert batches, "the reply's stream never got its end"
            for entry_id, fields in batches[0][1]:
                last, ended = entry_id, ended or b"done" in fields
        assert await client.delete(key) == 1
    finally:
        await client.aclose()
