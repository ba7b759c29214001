"""Fair queueing in front of each `provider:model`, per process.

A call takes a slot when the model has fewer than `max_in_flight` calls
running and its user fewer than `max_in_flight_per_user`; otherwise it waits
in a FIFO. A freed slot goes to the first waiter whose user is under the
per-user cap, so one user's backlog never holds up anyone else, and each user
may hold at most `max_waiting_per_user` places, so one user cannot fill the
queue. Past `max_waiting` the call is refused with a retry-after.

The queue is per process on purpose: the caps protect the vendor's rate limits
roughly (N processes allow N times the cap) and the user's fairness exactly
within a process, without a cross-process lock on every reply. A queue lives
on one event loop; each loop gets its own.
"""

from __future__ import annotations

import asyncio
import collections
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from django.conf import settings

from monitoring import metrics

OnQueued = Callable[[int], Awaitable[None]]


class QueueFull(Exception):
    def __init__(self, retry_after: float) -> None:
        super().__init__("the queue is full")
        self.retry_after = retry_after


@dataclass(frozen=True, slots=True)
class Limits:
    max_in_flight: int  # 0 = no cap
    max_in_flight_per_user: int  # 0 = no cap
    max_waiting: int
    max_waiting_per_user: int
    retry_after: float


def limits_for(model: str) -> Limits:
    """Return the queue limits for `provider:model` from settings."""
    override = settings.CHAT_QUEUE_LIMITS.get(model) or {}
    return Limits(
        max_in_flight=int(override.get("max_in_flight", settings.CHAT_QUEUE_MAX_IN_FLIGHT)),
        max_in_flight_per_user=int(
            override.get("max_in_flight_per_user", settings.CHAT_QUEUE_MAX_IN_FLIGHT_PER_USER)
        ),
        max_waiting=int(override.get("max_waiting", settings.CHAT_QUEUE_MAX_WAITING)),
        max_waiting_per_user=int(
            override.get("max_waiting_per_user", settings.CHAT_QUEUE_MAX_WAITING_PER_USER)
        ),
        retry_after=float(override.get("retry_after", settings.CHAT_QUEUE_RETRY_AFTER_S)),
    )


@dataclass(eq=False)
class _Waiter:
    user: str
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    granted: bool = False


class FairQueue:
    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self.in_flight = 0
        self.user_in_flight: collections.Counter[str] = collections.Counter()
        self.waiters: list[_Waiter] = []

    def _may_run(self, user: str) -> bool:
        cap, user_cap = self.limits.max_in_flight, self.limits.max_in_flight_per_user
        return (cap <= 0 or self.in_flight < cap) and (
            user_cap <= 0 or self.user_in_flight[user] < user_cap
        )

    def _take(self, user: str) -> None:
        self.in_flight += 1
        self.user_in_flight[user] += 1

    def _release(self, user: str) -> None:
        self.in_flight -= 1
        self.user_in_flight[user] -= 1
        if self.user_in_flight[user] <= 0:
            del self.user_in_flight[user]
        self._grant()

    def _grant(self) -> None:
        """Hand free slots to the first eligible waiters; tell the rest they moved."""
        granted_any = False
        for waiter in list(self.waiters):
            if self._may_run(waiter.user):
                self.waiters.remove(waiter)
                self._take(waiter.user)
                waiter.granted = True
                waiter.changed.set()
                granted_any = True
        if granted_any:
            for waiter in self.waiters:
                waiter.changed.set()

    def position(self, waiter: _Waiter) -> int:
        return self.waiters.index(waiter) + 1

    @asynccontextmanager
    async def slot(self, *, user: str, on_queued: OnQueued) -> AsyncIterator[bool]:
        """Hold one slot for the body; yield whether the call had to wait."""
        # Everyone waiting is blocked by a cap (see _grant), so a caller the caps
        # allow overtakes no one who could have run.
        if self._may_run(user):
            self._take(user)
            queued = False
        else:
            waiting_for_user = sum(1 for w in self.waiters if w.user == user)
            if (
                len(self.waiters) >= self.limits.max_waiting
                or waiting_for_user >= self.limits.max_waiting_per_user
            ):
                raise QueueFull(self.limits.retry_after)
            await self._wait(user, on_queued)
            queued = True
        try:
            yield queued
        finally:
            self._release(user)

    async def _wait(self, user: str, on_queued: OnQueued) -> None:
        waiter = _Waiter(user)
        self.waiters.append(waiter)
        metrics.queue_depth_changed(1)
        try:
            told = self.position(waiter)
            await on_queued(told)
            while not waiter.granted:
                waiter.changed.clear()
                await waiter.changed.wait()
                if not waiter.granted and (now := self.position(waiter)) != told:
                    told = now
                    await on_queued(now)
        except BaseException:
            # Cancelled (Stop, a disconnect) or the socket failed: give the place back.
            if waiter.granted:
                self._release(user)
            else:
                self.waiters.remove(waiter)
                for other in self.waiters:
                    other.changed.set()
            raise
        finally:
            metrics.queue_depth_changed(-1)


_queues: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[str, FairQueue]] = (
    weakref.WeakKeyDictionary()
)


def queue_for(model: str) -> FairQueue:
    """Return this event loop's queue for `provider:model`."""
    per_loop = _queues.setdefault(asyncio.get_running_loop(), {})
    queue = per_loop.get(model)
    if queue is None:
        queue = per_loop[model] = FairQueue(limits_for(model))
    return queue


def queue_depths() -> dict[str, int]:
    """Return how many calls wait per model in this process's current loop."""
    try:
        per_loop = _queues.get(asyncio.get_running_loop(), {})
    except RuntimeError:
        return {}
    return {model: len(q.waiters) for model, q in per_loop.items()}
