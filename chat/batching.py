"""Database calls that many replies make at once, sharing trips to the database thread.

Every message makes two trips to Django's database thread: one to store it
with its pending reply, one to store the finished reply. A trip costs the
event loop a hand-off to the thread and back (asgiref's SyncToAsync, a
wake-up, a GIL hand-over), which adds up when a thousand messages arrive
together. A `Batched` function runs its first call at once, so a lone
message waits for nothing; calls made while that trip runs go together in
the next one. Each call keeps its own outcome (one failing call fails only
its caller) and its caller's context (the log ids of monitoring/logs.py stay
right).

`Batched(fn)` runs `fn` once for each call.
`Batched.grouped(run)` hands the whole batch to `run`, which can work phase
by phase over it (chat/pipeline.py stores a batch of messages in one
transaction, so they share one commit) and returns one outcome a call.

A caller may pass `then`, a function of its call's value that runs on the
event loop as soon as the trip is back, before any caller of that trip
resumes. Resuming a thousand callers takes the loop tens of milliseconds;
what `then` starts (a reply's model call) does not wait for them.
"""

from __future__ import annotations

import asyncio
import contextvars
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from channels.db import database_sync_to_async

from config import gc_idle

R = TypeVar("R")
# Calls per trip: a trip takes every call that waits, up to this many. A trip
# costs several turns of the event loop (hand-off, wake-up, each caller's
# resumption), and while a thousand replies stream a turn takes tens of
# milliseconds: at 32 calls a trip the last of 1,000 sends sent together
# waited ~30 trips, 8 s on a 2-core machine (make bench (c), docs/benchmarks.md),
# against ~1 s when one trip takes them all. The cap only bounds how long one
# trip holds the database thread (~1 ms a send there).
MAX_BATCH = 1024
# How long a trip may wait for a burst's calls that keep joining turn after turn.
SETTLE_S = 0.25


Outcome = tuple[bool, Any]  # (True, value) or (False, the exception)


@dataclass(frozen=True, slots=True)
class Call:
    """One caller's keyword arguments and context."""

    context: contextvars.Context
    kwargs: dict[str, Any]
    then: Callable[[Any], object] | None = None

    def run(self, fn: Callable[..., Any], /, **kwargs: Any) -> Outcome:
        """Run `fn` in the caller's context; return its outcome instead of raising."""
        try:
            return True, self.context.run(fn, **kwargs)
        except Exception as exc:
            return False, exc


@dataclass
class _Queue:
    pending: list[tuple[Call, asyncio.Future[Any]]] = field(default_factory=list)
    drainer: asyncio.Task[None] | None = None
    busy: bool = False  # a lone call's trip is in flight


class Batched(Generic[R]):
    def __init__(self, fn: Callable[..., R], *, settle: bool = False) -> None:
        self._setup(lambda calls: [call.run(fn, **call.kwargs) for call in calls], settle)

    @classmethod
    def grouped(
        cls, run: Callable[[list[Call]], list[Outcome]], *, settle: bool = False
    ) -> Batched[Any]:
        """Batch calls for `run`, which gets them all and returns an outcome each, in order."""
        batched: Batched[Any] = cls.__new__(cls)
        batched._setup(run, settle)
        return batched

    def _setup(self, run_batch: Callable[[list[Call]], list[Outcome]], settle: bool) -> None:
        # With settle, a trip waits while a burst's calls still arrive (_settle).
        self._settles = settle
        # Per event loop (each test has its own).
        self._queues: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Queue] = (
            weakref.WeakKeyDictionary()
        )
        self._run_in_thread = database_sync_to_async(run_batch)
        self.trips = 0  # trips to the database thread so far

    async def __call__(self, *, then: Callable[[R], object] | None = None, **kwargs: Any) -> R:
        loop = asyncio.get_running_loop()
        queue = self._queues.get(loop)
        if queue is None:
            queue = self._queues[loop] = _Queue()
        call = Call(contextvars.copy_context(), kwargs, then)
        if queue.drainer is None and not queue.busy:
            # Nothing in flight: this call goes at once, on its own.
            queue.busy = True
            self.trips += 1
            try:
                [(ok, value)] = await self._run_in_thread([call])
            finally:
                queue.busy = False
                if queue.pending and queue.drainer is None:
                    queue.drainer = loop.create_task(self._drain(queue))
            if not ok:
                raise value
            if then is not None:
                then(value)
            return value
        future: asyncio.Future[R] = loop.create_future()
        queue.pending.append((call, future))
        if queue.drainer is None and not queue.busy:
            queue.drainer = loop.create_task(self._drain(queue))
        return await future

    @staticmethod
    async def _settle(queue: _Queue) -> None:
        """Wait while calls still join turn after turn (a burst being read), up to SETTLE_S.

        A trip that starts while a burst's calls are still arriving leaves
        the rest to the next trip, which then runs while the first trip's
        replies stream, when every trip is slow (docs/benchmarks.md). Once
        two turns of the loop pass with no new call, the trip goes; a lone
        call's trip never waits.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + SETTLE_S
        seen = len(queue.pending)
        quiet = 0
        while quiet < 2 and seen < MAX_BATCH and loop.time() < deadline:
            await asyncio.sleep(0)
            quiet = quiet + 1 if len(queue.pending) == seen else 0
            seen = len(queue.pending)

    @staticmethod
    def _run_hooks(
        batch: list[tuple[Call, asyncio.Future[Any]]], outcomes: list[Outcome]
    ) -> list[Outcome]:
        """Run each waiting caller's `then` with its value; a hook that raises fails its call."""
        result = list(outcomes)
        for i, ((call, future), (ok, value)) in enumerate(zip(batch, outcomes, strict=True)):
            if not ok or call.then is None or future.done():  # failed, no hook, or cancelled
                continue
            try:
                call.context.run(call.then, value)
            except Exception as exc:
                result[i] = (False, exc)
        return result

    async def _drain(self, queue: _Queue) -> None:
        loop = asyncio.get_running_loop()
        batch: list[tuple[Call, asyncio.Future[Any]]] = []
        holding = False  # automatic collections held, and no release scheduled
        try:
            while queue.pending:
                if self._settles:
                    # A burst: the collector waits until its replies have
                    # started (config/gc_idle.py), then collects at once.
                    gc_idle.hold_collections()
                    holding = True
                    await self._settle(queue)
                batch = queue.pending[:MAX_BATCH]
                del queue.pending[:MAX_BATCH]
                self.trips += 1
                try:
                    outcomes = await self._run_in_thread([call for call, _ in batch])
                    if len(outcomes) != len(batch):
                        raise RuntimeError(f"{len(outcomes)} outcomes for {len(batch)} calls")
                except Exception as exc:  # the trip itself failed: so did every call in it
                    outcomes = [(False, exc)] * len(batch)
                outcomes = self._run_hooks(batch, outcomes)
                for (_call, future), (ok, value) in zip(batch, outcomes, strict=True):
                    if future.done():  # its caller was cancelled
                        continue
                    if ok:
                        future.set_result(value)
                    else:
                        future.set_exception(value)
                batch = []
                if holding:
                    # After what the hooks started, the callers' resumption,
                    # and what those first steps started in turn (a reply's
                    # chat.accepted, which would otherwise wait for the
                    # collection: 30-50 ms after a burst of 1,000).
                    loop.call_soon(loop.call_soon, gc_idle.release_collections)
                    holding = False
        finally:
            if holding:  # cancelled or failed before its release was scheduled
                gc_idle.release_collections()
            queue.drainer = None
            # Cancelled (the loop is closing): nobody may wait forever.
            for _call, future in batch + queue.pending:
                if not future.done():
                    future.cancel()
            if batch or queue.pending:
                queue.pending = []
