"""The garbage collector's long scans run while the server is idle, not while it serves."""

from __future__ import annotations

import asyncio
import gc
import weakref
from collections.abc import Iterator

import pytest

from config import gc_idle
from tests.monitoring.helpers import asgi_get


class Clocks:
    """A process's CPU time and the wall clock, moved by the test."""

    def __init__(self) -> None:
        self.cpu_s = 0.0
        self.wall_s = 0.0

    def cpu(self) -> float:
        return self.cpu_s

    def wall(self) -> float:
        return self.wall_s

    def period(self, seconds: float, busy_share: float) -> None:
        self.wall_s += seconds
        self.cpu_s += seconds * busy_share


class Node:
    def __init__(self) -> None:
        self.other: Node | None = None


@pytest.fixture
def collector() -> Iterator[tuple[gc_idle.IdleCollector, Clocks]]:
    clocks = Clocks()
    loop = asyncio.new_event_loop()
    try:
        yield gc_idle.IdleCollector(loop, cpu=clocks.cpu, wall=clocks.wall), clocks
    finally:
        loop.close()


def _cycle_in_the_middle_generation() -> weakref.ref[Node]:
    """An unreachable reference cycle that a young collection has already passed over."""
    a, b = Node(), Node()
    a.other, b.other = b, a
    gc.collect(0)  # still reachable: both move on to the middle generation
    return weakref.ref(a)


def test_an_idle_process_collects_what_young_collections_kept(collector):
    idle, clocks = collector
    gc.collect(1)
    assert idle.maybe_collect() == 2  # the first full collection is due at once
    clocks.period(0.5, busy_share=0.01)
    garbage = _cycle_in_the_middle_generation()
    assert garbage() is not None  # a young collection alone does not free it
    assert idle.maybe_collect() == 1
    assert garbage() is None


def test_a_busy_process_is_left_to_the_collectors_own_thresholds(collector):
    idle, clocks = collector
    garbage = _cycle_in_the_middle_generation()
    clocks.period(0.5, busy_share=0.6)
    assert idle.maybe_collect() is None
    assert garbage() is not None
    clocks.period(0.5, busy_share=0.0)  # then the burst ends
    assert idle.maybe_collect() in (1, 2)
    assert garbage() is None


def test_a_scan_waits_for_a_second_look_and_spares_a_burst_that_just_began(collector):
    idle, clocks = collector
    garbage = _cycle_in_the_middle_generation()
    clocks.period(0.5, busy_share=0.6)
    assert idle._check() is False  # busy: no second look, nothing scanned
    clocks.period(0.5, busy_share=0.0)
    assert idle._check() is True  # idle, and a scan is due: look again first
    assert garbage() is not None
    # Messages arrived right after the first look: the scan would have
    # landed in their time to first token.
    clocks.period(gc_idle.CONFIRM_S, busy_share=1.0)
    assert idle._confirm() is None
    assert garbage() is not None
    clocks.period(0.5, busy_share=0.0)  # the burst is over
    assert idle._check() is True
    clocks.period(gc_idle.CONFIRM_S, busy_share=0.0)
    assert idle._confirm() in (1, 2)
    assert garbage() is None


def test_full_collections_run_at_most_every_full_every_s(collector):
    idle, clocks = collector
    gc.collect(1)  # a middle-generation scan since the last full one
    clocks.period(0.5, busy_share=0.0)
    assert idle.maybe_collect() == 2
    for _ in range(3):
        gc.collect(1)
        clocks.period(0.5, busy_share=0.0)
        assert idle.maybe_collect() != 2
    clocks.period(gc_idle.FULL_EVERY_S, busy_share=0.0)
    gc.collect(1)
    assert idle.maybe_collect() == 2


def test_the_collection_itself_does_not_count_as_work(collector):
    idle, clocks = collector
    real = gc.collect

    def slow_collect(generation: int = 2) -> int:
        if generation > 0:
            clocks.period(0.3, busy_share=1.0)  # a long scan, all CPU
        return real(generation)

    gc.collect = slow_collect  # type: ignore[assignment]
    try:
        _cycle_in_the_middle_generation()
        clocks.period(0.5, busy_share=0.0)
        assert idle.maybe_collect() is not None
        _cycle_in_the_middle_generation()
        clocks.period(0.5, busy_share=0.0)
        assert idle.maybe_collect() is not None  # still idle, though the last scan was long
    finally:
        gc.collect = real


async def test_the_application_starts_one_collector_per_loop():
    loop = asyncio.get_running_loop()
    before = len(gc_idle._running)
    sent = [*await asgi_get("/health/live"), *await asgi_get("/health/live")]
    assert loop in gc_idle._running
    assert len(gc_idle._running) == before + 1
    assert [m["status"] for m in sent if m["type"] == "http.response.start"] == [200, 200]


@pytest.fixture
def collections_on() -> Iterator[None]:
    assert gc.isenabled()
    try:
        yield
    finally:
        gc_idle.release_collections()
        gc.enable()


def test_held_collections_wait_until_released_then_the_due_young_one_runs(collections_on):
    gc_idle.hold_collections()
    assert not gc.isenabled()
    # Well past the young generation's threshold, and nothing was collected.
    kept = [[] for _ in range(gc.get_threshold()[0] + 100)]
    assert gc.get_count()[0] > gc.get_threshold()[0]
    gc_idle.release_collections()
    assert gc.isenabled()
    assert gc.get_count()[0] < gc.get_threshold()[0]  # collected on release
    del kept


def test_holding_twice_needs_one_release_and_a_release_alone_does_nothing(collections_on):
    gc_idle.release_collections()
    assert gc.isenabled()
    gc_idle.hold_collections()
    gc_idle.hold_collections()
    gc_idle.release_collections()
    assert gc.isenabled()


def test_collections_switched_off_elsewhere_stay_off(collections_on):
    gc.disable()
    gc_idle.hold_collections()
    gc_idle.release_collections()
    assert not gc.isenabled()
