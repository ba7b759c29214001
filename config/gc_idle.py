"""Run the cyclic garbage collector's long scans while the server is idle.

A connection keeps a few hundred container objects alive for as long as it
is open (its consumer, scope, session, queues, protocol state). When a
thousand connections open together, those objects sit in the collector's
middle generation until a collection of it, which then scans them all: the
first burst of messages afterwards paid a 70-115 ms pause for it, right in
the replies' time to first token (make bench (c), docs/benchmarks.md). The
full collections that follow scan every open connection again.

This process checks its own CPU use every CHECK_S seconds. Below IDLE_SHARE
of a core, nothing is being served, so it runs those scans then: the middle
generation when it holds anything, a full collection at most every
FULL_EVERY_S seconds. A period looks idle after the fact, so a burst that
began in its last few milliseconds would get the scan (60-90 ms with 1,000
connections open) in its time to first token: before scanning, the process
looks again CONFIRM_S later and scans only if it is still idle. The
collector's own thresholds (config/asgi.py) stay in place for a server that
is never idle.

While a burst of sends is read and stored, automatic collections are held
(`hold_collections`, chat/batching.py): the burst's objects are alive then,
so a young collection only moves them along, ten of them about 15 ms of
the burst's time to first token. `release_collections`, once the burst's
replies have started, collects the young objects at once if they are due,
so every trip is followed by a collection however busy the server stays.
"""

from __future__ import annotations

import asyncio
import gc
import math
import time
import weakref
from collections.abc import Callable

CHECK_S = 0.5
CONFIRM_S = 0.02  # the second look before a scan
IDLE_SHARE = 0.05  # of one core, every thread of the process counted
FULL_EVERY_S = 10.0

_running: weakref.WeakSet[asyncio.AbstractEventLoop] = weakref.WeakSet()


class IdleCollector:
    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        *,
        cpu: Callable[[], float] = time.process_time,
        wall: Callable[[], float] = time.monotonic,
    ) -> None:
        self._loop = loop
        self._cpu_clock, self._wall_clock = cpu, wall
        self._cpu, self._at = cpu(), wall()
        self._full_at = -math.inf

    def start(self) -> None:
        self._loop.call_later(CHECK_S, self._check)

    def _check(self) -> bool:
        """Look at the last period; if it was idle and a scan is due, look again soon.

        Return whether the second look was scheduled.
        """
        again = False
        try:
            cpu, at = self._cpu_clock(), self._wall_clock()
            again = self._busy(cpu, at) < IDLE_SHARE and self._due(at) is not None
            # The second look measures only what happens from here on.
            self._cpu, self._at = cpu, at
        finally:
            if not self._loop.is_closed():
                if again:
                    self._loop.call_later(CONFIRM_S, self._confirm)
                else:
                    self._loop.call_later(CHECK_S, self._check)
        return again

    def _confirm(self) -> int | None:
        """Scan if the process stayed idle since the first look; return the generation."""
        try:
            return self.maybe_collect()
        finally:
            if not self._loop.is_closed():
                self._loop.call_later(CHECK_S, self._check)

    def _busy(self, cpu: float, at: float) -> float:
        """Return the share of a core used since the last look."""
        return (cpu - self._cpu) / max(at - self._at, 1e-6)

    def _due(self, at: float) -> int | None:
        if at - self._full_at >= FULL_EVERY_S and gc.get_count()[2] > 0:
            return 2
        if gc.get_count()[1] > 0:  # young objects were kept since its last scan
            return 1
        return None

    def maybe_collect(self) -> int | None:
        """Collect if the process was idle since the last look; return the generation."""
        cpu, at = self._cpu_clock(), self._wall_clock()
        generation = self._due(at) if self._busy(cpu, at) < IDLE_SHARE else None
        if generation is not None:
            gc.collect(generation)
            if generation == 2:
                self._full_at = at
        # The collection's own CPU does not count as the next period's work.
        self._cpu, self._at = self._cpu_clock(), self._wall_clock()
        return generation


def ensure_running() -> None:
    """Start the idle collector on the running loop, once."""
    loop = asyncio.get_running_loop()
    if loop in _running:
        return
    _running.add(loop)
    IdleCollector(loop).start()


_holding = False


def hold_collections() -> None:
    """Hold automatic collections until release_collections() (no-op if they are off)."""
    global _holding
    if not _holding and gc.isenabled():
        gc.disable()
        _holding = True


def release_collections() -> None:
    """Let automatic collections run again, and run the young one now if it is due."""
    global _holding
    if not _holding:
        return
    _holding = False
    gc.enable()
    if gc.get_count()[0] > gc.get_threshold()[0]:
        gc.collect(0)
