"""The circuit breaker per provider:model: closed -> open -> half-open -> closed."""

from __future__ import annotations

import pytest
from asgiref.sync import sync_to_async
from channels.db import database_sync_to_async

from chat.breaker import breaker_states
from tests.chat.callpath_support import *  # noqa: F403
from tests.chat.callpath_support import FALLBACK, PRIMARY, ask, cookie_for, reload
from tests.chat.helpers import recv, recv_until_done, send
from tests.fakevendor import Fault
from tests.monitoring.helpers import TOKEN, scrape

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def circuit_gauge(settings):
    """Read ai_circuit_open for a model from /metrics (its series must be there)."""
    settings.METRICS_TOKEN = TOKEN

    async def read(model: str) -> float:
        samples = await database_sync_to_async(scrape)()
        return samples[("ai_circuit_open", (("model", model),))]

    return read


@pytest.fixture
def tight(settings, wired):
    settings.CHAT_BREAKER_FAILURES = 2
    settings.CHAT_BREAKER_COOLDOWN_S = 30.0
    settings.CHAT_BREAKER_PROBES = 1
    settings.CHAT_RETRY_MAX_ATTEMPTS = 1
    return wired


async def one_reply(comm, content):
    accepted = await ask(comm, content)
    frames = await recv_until_done(comm)
    return await reload(accepted["message"]), frames


async def test_breaker_opens_skips_the_vendor_then_probes_and_closes(
    ws, make_user, tight, clock, circuit_gauge
):
    tight.default = Fault.server_error(500)
    comm = await ws(await cookie_for(make_user))

    await one_reply(comm, "one")
    assert breaker_states()[PRIMARY] == "closed"
    assert await circuit_gauge(PRIMARY) == 0
    await one_reply(comm, "two")
    assert breaker_states()[PRIMARY] == "open"
    assert await circuit_gauge(PRIMARY) == 1
    assert len(tight.requests) == 2

    reply, frames = await one_reply(comm, "three")
    assert len(tight.requests) == 2  # the vendor was not called
    [error] = [f for f in frames if f["type"] == "chat.error"]
    assert error["code"] == "unavailable" and error["retry_after"] == 30
    assert reply.call_path == [{"model": PRIMARY, "outcome": "circuit_open"}]
    assert clock.sleeps == []

    clock.advance(29)
    assert breaker_states()[PRIMARY] == "open"
    clock.advance(1.5)
    assert breaker_states()[PRIMARY] == "half_open"
    assert await circuit_gauge(PRIMARY) == 1  # still refused, but for the probes

    tight.default = Fault.ok()
    reply, frames = await one_reply(comm, "four")
    assert frames[-1]["finish_reason"] == "stop"
    assert len(tight.requests) == 3
    assert breaker_states()[PRIMARY] == "closed"
    assert await circuit_gauge(PRIMARY) == 0


async def test_a_failed_probe_opens_the_breaker_again(ws, make_user, tight, clock):
    tight.default = Fault.server_error(503)
    comm = await ws(await cookie_for(make_user))
    for content in ("one", "two"):
        await one_reply(comm, content)
    clock.advance(31)
    reply, _ = await one_reply(comm, "probe")
    assert reply.call_path == [{"model": PRIMARY, "outcome": "server", "status": 503}]
    assert breaker_states()[PRIMARY] == "open"
    reply, _ = await one_reply(comm, "after")
    assert reply.call_path == [{"model": PRIMARY, "outcome": "circuit_open"}]
    assert len(tight.requests) == 3


async def test_half_open_lets_only_the_allowed_number_of_probes_through(
    ws, make_user, tight, clock
):
    tight.default = Fault.server_error(500)
    alice = await ws(await cookie_for(make_user, "alice"))
    bob = await ws(await cookie_for(make_user, "bob"))
    for content in ("one", "two"):
        await one_reply(alice, content)
    clock.advance(31)
    tight.default = Fault.ok()
    tight.script([Fault.stall(after=1)])

    probe = await ask(alice, "probe")
    await tight.wait_for_requests_async(3)
    reply, _ = await one_reply(bob, "not a probe")
    assert reply.call_path == [{"model": PRIMARY, "outcome": "circuit_open"}]
    await send(alice, {"type": "chat.stop", "message": probe["message"]})
    while (await recv(alice))["type"] != "chat.done":
        pass
    assert len(tight.requests) == 3


async def test_failure_rate_over_the_window_opens_the_breaker(
    ws, make_user, tight, clock, settings
):
    settings.CHAT_BREAKER_FAILURES = 100
    settings.CHAT_BREAKER_MIN_VOLUME = 4
    settings.CHAT_BREAKER_FAILURE_RATE = 0.5
    tight.script([Fault.ok(), Fault.server_error(500), Fault.ok()])
    tight.default = Fault.server_error(500)
    comm = await ws(await cookie_for(make_user))
    for n in range(3):
        await one_reply(comm, f"question {n}")
        assert breaker_states()[PRIMARY] == "closed"
    await one_reply(comm, "the fourth")  # 2 of 4 failed
    assert breaker_states()[PRIMARY] == "open"


async def test_an_open_breaker_goes_straight_to_the_fallback(ws, make_user, tight, clock, settings):
    settings.CHAT_FALLBACK_MODELS = [FALLBACK]
    tight.script([Fault.server_error(500), Fault.ok()] * 2)
    comm = await ws(await cookie_for(make_user))
    for content in ("one", "two"):
        await one_reply(comm, content)  # the primary fails twice, the fallback answers
    assert breaker_states() == {PRIMARY: "open", FALLBACK: "closed"}
    before = len(tight.requests)

    reply, frames = await one_reply(comm, "three")
    assert frames[-1]["model"] == FALLBACK and frames[-1]["finish_reason"] == "stop"
    assert [r.path for r in tight.requests[before:]] == ["/v1/messages"]
    assert reply.call_path == [
        {"model": PRIMARY, "outcome": "circuit_open"},
        {"model": FALLBACK, "outcome": "ok"},
    ]
    assert clock.sleeps == []


async def test_successes_are_counted_in_a_batch_and_a_failure_sees_them(settings):
    from django.core.cache import cache

    from chat import breaker

    settings.CHAT_BREAKER_FAILURES = 100
    settings.CHAT_BREAKER_MIN_VOLUME = 4
    settings.CHAT_BREAKER_FAILURE_RATE = 0.5
    model, now = "openai:batched", 1000.0
    calls = f"breaker:{model}:calls:{int(now // 10)}"
    assert await breaker.acheck_allowed(model=model, now=now) == (True, "closed")
    # Another process's failure left a consecutive count behind.
    await sync_to_async(cache.set)(f"breaker:{model}:consecutive", 1, None)
    for _ in range(2):
        assert await breaker.arecord_result(model=model, ok=True, now=now) == "closed"
    assert await sync_to_async(cache.get)(calls) is None  # not written per reply
    await breaker.aflush()
    assert await sync_to_async(cache.get)(calls) == 2
    assert await sync_to_async(cache.get)(f"breaker:{model}:consecutive") == 0

    # A failure first adds the batch: 1 success + 2 earlier, 1 failure = 25 %.
    assert await breaker.arecord_result(model=model, ok=True, now=now) == "closed"
    assert await breaker.arecord_result(model=model, ok=False, now=now) == "closed"
    assert await sync_to_async(cache.get)(calls) == 4
    # Now 2 of 5 ... and 3 of 6 failed: the rate opens it, with every success counted.
    assert await breaker.arecord_result(model=model, ok=False, now=now) == "closed"
    assert await breaker.arecord_result(model=model, ok=False, now=now) == "open"


async def test_a_success_after_the_trust_ran_out_renews_it(settings):
    """Long replies outlive the trust; the first success to end renews it for the rest."""
    from django.core.cache import cache

    from chat import breaker

    model, now = "openai:long-replies", 1000.0
    assert await breaker.acheck_allowed(model=model, now=now) == (True, "closed")
    later = now + 5 * breaker.LOCAL_TRUST_S  # the replies took five seconds
    assert await breaker.arecord_result(model=model, ok=True, now=later) == "closed"
    calls = f"breaker:{model}:calls:{int(later // 10)}"
    assert await sync_to_async(cache.get)(calls) == 1  # past the trust: the full path
    for _ in range(3):  # ... which renewed the trust: these wait for nothing
        assert await breaker.arecord_result(model=model, ok=True, now=later + 0.5) == "closed"
    assert await sync_to_async(cache.get)(calls) == 1
    await breaker.aflush()
    assert await sync_to_async(cache.get)(calls) == 4


async def test_replies_ending_together_after_the_trust_ran_out_make_one_trip(settings):
    """A burst of successes past the trust waits for one trip, then is counted in a batch."""
    import asyncio

    from django.core.cache import cache

    from chat import breaker

    model, now = "openai:burst-end", 1000.0
    assert await breaker.acheck_allowed(model=model, now=now) == (True, "closed")
    later = now + 5 * breaker.LOCAL_TRUST_S
    calls = f"breaker:{model}:calls:{int(later // 10)}"
    states = await asyncio.gather(
        *(breaker.arecord_result(model=model, ok=True, now=later) for _ in range(20))
    )
    assert states == ["closed"] * 20
    assert await sync_to_async(cache.get)(calls) == 1  # one trip; not twenty
    await breaker.aflush()
    assert await sync_to_async(cache.get)(calls) == 20  # every success counted


async def test_calls_starting_together_share_one_look_at_a_closed_breaker(settings, monkeypatch):
    import asyncio

    from chat import breaker

    trips: list[str] = []
    real = breaker._check_in_thread

    async def counted(*, model: str, now: float) -> tuple[bool, str]:
        trips.append(model)
        return await real(model=model, now=now)

    monkeypatch.setattr(breaker, "_check_in_thread", counted)
    model, now = "openai:burst-start", 1000.0
    results = await asyncio.gather(
        *(breaker.acheck_allowed(model=model, now=now) for _ in range(20))
    )
    assert results == [(True, "closed")] * 20
    assert trips == [model]


async def test_calls_starting_together_at_a_half_open_breaker_get_one_probe_slot_each(settings):
    """Waiting for a trip shares only a closed verdict: each probe still takes its own slot."""
    import asyncio

    from django.core.cache import cache

    from chat import breaker

    settings.CHAT_BREAKER_COOLDOWN_S = 30.0
    settings.CHAT_BREAKER_PROBES = 1
    model, now = "openai:half-open-burst", 1000.0
    await sync_to_async(cache.set)(f"breaker:{model}:opened_at", now - 60, None)
    results = await asyncio.gather(
        *(breaker.acheck_allowed(model=model, now=now) for _ in range(5))
    )
    assert sorted(results) == [(False, "half_open")] * 4 + [(True, "half_open")]


async def test_a_success_waiting_behind_a_failure_still_resets_the_count(settings):
    """Successes queued behind a failure's trip record the reset, not a silent batch."""
    import asyncio

    from django.core.cache import cache

    from chat import breaker

    settings.CHAT_BREAKER_FAILURES = 100
    model, now = "openai:fail-then-ok", 1000.0
    consecutive = f"breaker:{model}:consecutive"
    states = await asyncio.gather(
        breaker.arecord_result(model=model, ok=False, now=now),
        *(breaker.arecord_result(model=model, ok=True, now=now) for _ in range(3)),
    )
    assert states == ["closed"] * 4
    assert await sync_to_async(cache.get)(consecutive) == 0
    await breaker.aflush()
    calls = f"breaker:{model}:calls:{int(now // 10)}"
    assert await sync_to_async(cache.get)(calls) == 4


async def test_the_last_words_do_not_wait_for_the_breakers_bookkeeping(
    ws, make_user, wired, settings, monkeypatch
):
    """The whole text is shown while the success is still being counted; done follows it."""
    import asyncio

    from chat import breaker
    from tests.chat.helpers import delta_text
    from tests.fakevendor import reply_text

    # Windows that hold text back until the stream ends (20 tokens: 1 + 8 + 8 + 3 held).
    settings.CHAT_MODERATION_WINDOW_TOKENS = 8
    settings.CHAT_MODERATION_MAX_HOLD_MS = 60_000
    counting = asyncio.Event()
    counted = asyncio.Event()
    real = breaker.arecord_result

    async def slow_count(*, model: str, ok: bool, now: float) -> str:
        counting.set()
        await counted.wait()  # a slow trip to the shared cache
        return await real(model=model, ok=ok, now=now)

    monkeypatch.setattr(breaker, "arecord_result", slow_count)
    comm = await ws(await cookie_for(make_user))
    accepted = await ask(comm, "Tell me about tests")
    frames = []
    while delta_text(frames) != reply_text(20):
        frames.append(await recv(comm))
        assert frames[-1]["type"] == "chat.delta", frames[-1]
    await asyncio.wait_for(counting.wait(), timeout=10)
    counted.set()
    done = await recv(comm)
    assert (done["type"], done["finish_reason"]) == ("chat.done", "stop")
    reply = await reload(accepted["message"])
    assert reply.content == reply_text(20)
    assert reply.call_path == [{"model": PRIMARY, "outcome": "ok"}]


async def test_a_delivered_reply_is_not_failed_by_the_breakers_bookkeeping(
    ws, make_user, wired, monkeypatch, caplog
):
    from chat import breaker
    from tests.chat.helpers import delta_text
    from tests.fakevendor import reply_text

    async def store_down(*, model: str, ok: bool, now: float) -> str:
        raise ConnectionError("redis://:secret@cache:6379 unreachable")

    monkeypatch.setattr(breaker, "arecord_result", store_down)
    comm = await ws(await cookie_for(make_user))
    accepted = await ask(comm, "Tell me about tests")
    frames = await recv_until_done(comm)
    assert delta_text(frames) == reply_text(20)
    assert [f["type"] for f in frames if f["type"] == "chat.error"] == []
    assert frames[-1]["finish_reason"] == "stop"
    reply = await reload(accepted["message"])
    assert (reply.status, reply.finish_reason, reply.error_code) == ("finished", "stop", "")
    assert "could not count a success of openai:gpt-fake in the breaker" in caplog.text
    assert "secret" not in caplog.text
