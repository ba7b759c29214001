"""Database calls made together share trips to the database thread, each with its own outcome."""

from __future__ import annotations

import asyncio
import math
import threading
from typing import Any

import pytest

from chat.batching import Batched, Call, Outcome
from monitoring.logs import _context, log_context

pytestmark = pytest.mark.django_db(transaction=True)


async def test_calls_made_during_a_trip_share_the_next_one():
    release = threading.Event()
    seen: list[tuple[int, str]] = []

    def store(*, n: int) -> int:
        if n == 0:
            release.wait(timeout=10)  # hold the first trip while the others arrive
        seen.append((n, threading.current_thread().name))
        return n * 10

    batched = Batched(store)
    first = asyncio.ensure_future(batched(n=0))
    await asyncio.sleep(0)  # the first trip starts at once, alone
    rest = [asyncio.ensure_future(batched(n=n)) for n in range(1, 50)]
    release.set()
    assert await asyncio.gather(first, *rest) == [n * 10 for n in range(50)]
    # The first alone, then the 49 that arrived meanwhile, all in one trip.
    assert batched.trips == 2
    assert [n for n, _ in seen] == list(range(50))
    assert {name for _, name in seen} != {threading.current_thread().name}


async def _drainer_started(batched: Batched[Any]) -> None:
    """Return once the first trip is back and the next one is about to gather its calls.

    Turn by turn, with no task of its own in between, so the calls that
    follow keep arriving one a turn.
    """
    loop = asyncio.get_running_loop()
    queue = batched._queues[loop]
    deadline = loop.time() + 10
    while queue.drainer is None:
        assert loop.time() < deadline, "the first trip never came back"
        await asyncio.sleep(0)


async def _sizes_of_a_burst_read_over_many_turns(*, settle: bool = True) -> list[int]:
    """40 calls, one each turn of the loop, as a burst being read arrives; return the trips' sizes.

    The first call's trip is held until 5 more have arrived; the others come
    once it is back. The second trip is held until the 40th has arrived.
    """
    first, second = threading.Event(), threading.Event()
    sizes: list[int] = []

    def run(calls: list[Call]) -> list[Outcome]:
        sizes.append(len(calls))
        if len(sizes) <= 2:
            (first if len(sizes) == 1 else second).wait(timeout=10)
        return [(True, call.kwargs["n"]) for call in calls]

    batched = Batched.grouped(run, settle=settle)
    calls = []
    for n in range(40):
        calls.append(asyncio.ensure_future(batched(n=n)))
        await asyncio.sleep(0)
        if n == 5:
            first.set()
            await _drainer_started(batched)
    second.set()
    assert await asyncio.gather(*calls) == list(range(40))
    return sizes


async def test_calls_still_arriving_turn_after_turn_join_the_same_trip():
    # The second trip waited until a turn passed with no new call.
    assert await _sizes_of_a_burst_read_over_many_turns() == [1, 39]


async def test_a_trip_waits_for_arriving_calls_at_most_settle_s(monkeypatch):
    monkeypatch.setattr("chat.batching.SETTLE_S", 0.0)
    sizes = await _sizes_of_a_burst_read_over_many_turns()
    # Without waiting, the second trip took what had arrived and left the rest.
    assert len(sizes) == 3 and sizes[0] == 1 and sizes[1] < 39 and sum(sizes) == 40


async def test_only_a_settling_batch_waits_for_arriving_calls():
    # The finished replies' batch does not settle: chat.done waits for nothing.
    sizes = await _sizes_of_a_burst_read_over_many_turns(settle=False)
    assert len(sizes) == 3 and sizes[1] < 39


async def test_a_trip_takes_at_most_max_batch_calls(monkeypatch):
    monkeypatch.setattr("chat.batching.MAX_BATCH", 8)
    release = threading.Event()
    sizes: list[int] = []

    def run(calls: list[Call]) -> list[Outcome]:
        if calls[0].kwargs["n"] == 0:
            release.wait(timeout=10)
        sizes.append(len(calls))
        return [(True, call.kwargs["n"]) for call in calls]

    batched = Batched.grouped(run)
    first = asyncio.ensure_future(batched(n=0))
    await asyncio.sleep(0)
    rest = [asyncio.ensure_future(batched(n=n)) for n in range(1, 21)]
    release.set()
    assert await asyncio.gather(first, *rest) == list(range(21))
    # In arrival order: the first alone, then the 20 waiting ones 8 at a time.
    assert sizes == [1, 8, 8, 4]
    assert batched.trips == 1 + math.ceil(20 / 8)


async def test_a_failing_call_fails_only_its_caller():
    def store(*, n: int) -> int:
        if n == 3:
            raise ValueError("bad row")
        return n

    batched = Batched(store)
    results = await asyncio.gather(*(batched(n=n) for n in range(6)), return_exceptions=True)
    assert results[:3] == [0, 1, 2] and results[4:] == [4, 5]
    assert isinstance(results[3], ValueError) and str(results[3]) == "bad row"


async def test_each_call_runs_with_its_callers_log_ids():
    def which(*, n: int) -> object:
        return _context.get().get("message_id")

    batched = Batched(which)

    async def call(n: int) -> object:
        with log_context(message_id=n):
            return await batched(n=n)

    assert await asyncio.gather(*(call(n) for n in range(5))) == list(range(5))


async def test_a_call_that_fails_in_a_batch_rolls_back_only_its_own_writes():
    from channels.db import database_sync_to_async
    from django.db import transaction

    from chat.models import Conversation

    release = threading.Event()

    def store(*, n: int) -> int:
        if n == 0:
            release.wait(timeout=10)  # the rest gather into one batch meanwhile
        with transaction.atomic():  # as the real callers do
            conversation = Conversation.objects.create(session_key=f"batch-{n}")
            if n == 3:
                raise ValueError("refused after writing")
        return conversation.pk

    batched = Batched(store)
    first = asyncio.ensure_future(batched(n=0))
    await asyncio.sleep(0)
    rest = [asyncio.ensure_future(batched(n=n)) for n in range(1, 6)]
    release.set()
    results = await asyncio.gather(first, *rest, return_exceptions=True)
    assert isinstance(results[3], ValueError)
    assert batched.trips == 2
    stored = await database_sync_to_async(
        lambda: sorted(
            Conversation.objects.filter(session_key__startswith="batch-").values_list(
                "session_key", flat=True
            )
        )
    )()
    assert stored == ["batch-0", "batch-1", "batch-2", "batch-4", "batch-5"]


async def _one_then_more(batched: Batched[object], release: threading.Event, more: int) -> list:
    """Call n=0, whose trip waits for `release`, then n=1..more meanwhile; return every result."""
    first = asyncio.ensure_future(batched(n=0))
    await asyncio.sleep(0)  # the first trip starts at once, alone
    rest = [asyncio.ensure_future(batched(n=n)) for n in range(1, more + 1)]
    release.set()
    return await asyncio.gather(first, *rest, return_exceptions=True)


async def test_a_grouped_function_gets_the_batch_and_answers_each_call():
    release = threading.Event()
    batches: list[list[int]] = []

    def run(calls: list[Call]) -> list[Outcome]:
        ns = [call.kwargs["n"] for call in calls]
        if ns == [0]:
            release.wait(timeout=10)  # the lone first trip, while the rest arrive
        batches.append(ns)
        return [
            call.run(lambda n: n * 10 if n != 3 else 1 / 0, n=n)
            for n, call in zip(ns, calls, strict=True)
        ]

    results = await _one_then_more(Batched.grouped(run), release, 5)
    assert batches == [[0], [1, 2, 3, 4, 5]]
    assert results[:3] + results[4:] == [0, 10, 20, 40, 50]
    assert isinstance(results[3], ZeroDivisionError)


async def test_a_grouped_function_that_loses_an_outcome_fails_its_whole_batch():
    release = threading.Event()

    def run(calls: list[Call]) -> list[Outcome]:
        if len(calls) == 1:
            release.wait(timeout=10)
            return [(True, "alone")]
        return [(True, "only one")]  # one outcome for several calls: a bug

    results = await _one_then_more(Batched.grouped(run), release, 3)
    assert results[0] == "alone"
    assert all(isinstance(r, RuntimeError) and "3 calls" in str(r) for r in results[1:])


def test_the_sends_batch_settles_and_the_finished_replies_batch_does_not():
    from chat import pipeline

    # A burst of sends goes in one trip; chat.done waits for no trickle.
    assert pipeline._admit_batched._settles is True
    assert pipeline._finish_batched._settles is False


async def test_every_hook_of_a_trip_runs_before_any_of_its_callers_resumes():
    release = threading.Event()
    events: list[tuple[str, int, object]] = []

    def store(*, n: int) -> int:
        if n == 0:
            release.wait(timeout=10)  # the rest gather into one batch meanwhile
        return n * 10

    batched = Batched(store)

    async def call(n: int) -> int:
        with log_context(message_id=n):
            value = await batched(
                n=n,
                then=lambda v: events.append(("then", v, _context.get().get("message_id"))),
            )
        events.append(("resumed", value, n))
        return value

    first = asyncio.ensure_future(call(0))
    await asyncio.sleep(0)  # the first trip starts at once, alone
    rest = [asyncio.ensure_future(call(n)) for n in range(1, 6)]
    release.set()
    assert await asyncio.gather(first, *rest) == [n * 10 for n in range(6)]
    # The lone call's hook ran before it returned; in the batch of five, every
    # hook ran (in its caller's context) before the first caller resumed.
    assert events[:2] == [("then", 0, 0), ("resumed", 0, 0)]
    assert events[2:7] == [("then", n * 10, n) for n in range(1, 6)]
    assert sorted(events[7:]) == [("resumed", n * 10, n) for n in range(1, 6)]


async def test_a_hook_that_raises_fails_only_its_own_call():
    release = threading.Event()
    hooked: list[int] = []

    def hook(value: int) -> None:
        if value == 30:
            raise LookupError("the reply could not start")
        hooked.append(value)

    def store(*, n: int) -> int:
        if n == 0:
            release.wait(timeout=10)
        return n * 10

    batched = Batched(store)
    first = asyncio.ensure_future(batched(n=0, then=hook))
    await asyncio.sleep(0)
    rest = [asyncio.ensure_future(batched(n=n, then=hook)) for n in range(1, 6)]
    release.set()
    results = await asyncio.gather(first, *rest, return_exceptions=True)
    assert results[:3] + results[4:] == [0, 10, 20, 40, 50]
    assert isinstance(results[3], LookupError)
    assert hooked == [0, 10, 20, 40, 50]


async def test_no_hook_runs_for_a_failed_or_cancelled_call():
    release = threading.Event()
    hooked: list[int] = []

    def store(*, n: int) -> int:
        if n == 0:
            release.wait(timeout=10)
        if n == 2:
            raise ValueError("not stored")
        return n

    batched = Batched(store)
    first = asyncio.ensure_future(batched(n=0, then=hooked.append))
    await asyncio.sleep(0)
    rest = [asyncio.ensure_future(batched(n=n, then=hooked.append)) for n in range(1, 4)]
    await asyncio.sleep(0)
    rest[2].cancel()  # n=3: its caller went away while the trip was out
    release.set()
    results = await asyncio.gather(first, *rest, return_exceptions=True)
    assert results[:2] == [0, 1]
    assert isinstance(results[2], ValueError)
    assert isinstance(results[3], asyncio.CancelledError)
    assert hooked == [0, 1]


async def test_a_settling_batch_holds_collections_until_its_callers_resumed():
    import gc

    assert gc.isenabled()
    release = threading.Event()
    seen: list[tuple[str, int, bool]] = []

    def run(calls: list[Call]) -> list[Outcome]:
        if calls[0].kwargs["n"] == 0:
            release.wait(timeout=10)
        for call in calls:
            seen.append(("trip", call.kwargs["n"], gc.isenabled()))
        return [(True, call.kwargs["n"]) for call in calls]

    batched = Batched.grouped(run, settle=True)
    started: list[asyncio.Task[None]] = []

    async def acknowledge(n: int) -> None:
        seen.append(("acknowledged", n, gc.isenabled()))

    async def reply(n: int) -> None:
        # As a reply does: its first step starts the task that sends chat.accepted.
        started.append(asyncio.get_running_loop().create_task(acknowledge(n)))
        seen.append(("reply", n, gc.isenabled()))

    def then(n: int) -> None:
        seen.append(("then", n, gc.isenabled()))
        started.append(asyncio.get_running_loop().create_task(reply(n)))

    async def call(n: int) -> int:
        value = await batched(n=n, then=then)
        seen.append(("resumed", n, gc.isenabled()))
        return value

    first = asyncio.ensure_future(call(0))
    await asyncio.sleep(0)
    rest = [asyncio.ensure_future(call(n)) for n in range(1, 4)]
    release.set()
    assert await asyncio.gather(first, *rest) == [0, 1, 2, 3]
    await asyncio.gather(*started)
    steps = ["trip", "then", "reply", "resumed", "acknowledged"]
    # The lone first trip held nothing.
    assert [(kind, enabled) for kind, n, enabled in seen if n == 0][:2] == [
        ("trip", True),
        ("then", True),
    ]
    # The burst's trip, its hooks, the replies they started, its callers and
    # the replies' acknowledgements all ran with collections held ...
    burst = sorted((kind, n, enabled) for kind, n, enabled in seen if n > 0)
    assert burst == sorted((kind, n, False) for kind in steps for n in range(1, 4))
    # ... and they run again afterwards.
    await asyncio.sleep(0)
    assert gc.isenabled()


async def test_a_cancelled_burst_lets_collections_run_again():
    import gc

    release, in_trip = threading.Event(), threading.Event()

    def run(calls: list[Call]) -> list[Outcome]:
        if calls[0].kwargs["n"] > 0:  # the burst's trip is held; the first is not
            in_trip.set()
            release.wait(timeout=10)
        return [(True, None) for _ in calls]

    batched = Batched.grouped(run, settle=True)
    first = asyncio.ensure_future(batched(n=0))
    await asyncio.sleep(0)
    second = asyncio.ensure_future(batched(n=1))
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, in_trip.wait, 10)
    assert not gc.isenabled()  # the burst's trip is out
    drainer = batched._queues[loop].drainer
    assert drainer is not None
    drainer.cancel()
    await asyncio.gather(drainer, return_exceptions=True)
    assert gc.isenabled()
    release.set()
    await asyncio.gather(first, second, return_exceptions=True)


async def test_a_batch_that_does_not_settle_leaves_collections_alone():
    import gc

    release = threading.Event()
    during: list[bool] = []

    def run(calls: list[Call]) -> list[Outcome]:
        if calls[0].kwargs["n"] == 0:
            release.wait(timeout=10)
        during.append(gc.isenabled())
        return [(True, None) for _ in calls]

    await _one_then_more(Batched.grouped(run), release, 3)
    assert during == [True, True]
