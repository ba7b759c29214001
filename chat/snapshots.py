"""Per-process copies of rarely changing rows, checked against a shared change token.

Every `chat.send` needs the active model version (and a running split) and
the active abuse blocks. Reading them from the database costs three queries a
message, for rows that change a few times a day. A `Snapshot` keeps what its
loader returned together with the token it was loaded under; whoever changes
the rows calls `changed()`, which sets a new token in the shared cache (the
SQLite cache file in the embedded mode, Redis when scaled), so every process
reloads at its next read.

Each process checks the shared token at most once every `RECHECK_S` (50 ms):
a burst of messages costs one cache get, not two a message (one Redis round
trip each when scaled), and a change made in another process shows within
50 ms. A change made in this process shows at once.

`changed()` sets a token at once and again when the transaction commits: a
process that reloads between the two would otherwise keep rows from before
the commit under the newest token. When the cache cannot be read, every read
goes to the database, as if there were no snapshot.

`from_settings` is the same for what settings alone decide: built once per
process, and again after a settings change.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
import uuid
import weakref
from collections.abc import Callable
from typing import Generic, TypeVar

from django.core.cache import cache
from django.core.signals import setting_changed
from django.db import transaction

logger = logging.getLogger(__name__)

T = TypeVar("T")

RECHECK_S = 0.05
_every: weakref.WeakSet[Snapshot[object]] = weakref.WeakSet()


def forget_local_state() -> None:
    """Make every snapshot of this process check the shared token at its next read."""
    for snapshot in list(_every):
        with snapshot._lock:
            snapshot._token = None


class Snapshot(Generic[T]):
    def __init__(
        self, name: str, load: Callable[[], T], *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.key = f"snapshot:{name}"
        self._load = load
        self._clock = clock
        self._lock = threading.Lock()
        self._token: str | None = None
        self._value: T | None = None
        self._fresh_until = 0.0  # the token was checked this recently
        _every.add(self)  # type: ignore[arg-type]

    def get(self) -> T:
        now = self._clock()
        if self._token is not None and now < self._fresh_until:
            return self._value  # type: ignore[return-value]
        token = self._shared_token()
        if token is not None and token == self._token:
            self._fresh_until = now + RECHECK_S
            return self._value  # type: ignore[return-value]
        value = self._load()
        if token is not None:
            with self._lock:
                self._token, self._value = token, value
                self._fresh_until = now + RECHECK_S
        return value

    def changed(self) -> None:
        """Make every process reload: now, and once more when the transaction commits."""
        self._bump()
        transaction.on_commit(self._bump, robust=True)

    def _bump(self) -> None:
        with self._lock:
            self._token = None
        try:
            cache.set(self.key, uuid.uuid4().hex, None)
        except Exception:
            logger.warning("could not publish a change of %s", self.key)

    def _shared_token(self) -> str | None:
        try:
            token = cache.get(self.key)
            if token is None:
                # First reader since the cache was emptied: agree on one token.
                cache.add(self.key, uuid.uuid4().hex, None)
                token = cache.get(self.key)
        except Exception:
            return None
        return token if isinstance(token, str) else None


def from_settings(build: Callable[[], T]) -> Callable[[], T]:
    """Return `build` made once, and made again after any settings change.

    For stateless objects that only settings decide and that every message
    asks for (a read of a setting is ~0.7 us through Django's lazy proxy).
    """
    cached = functools.cache(build)
    setting_changed.connect(lambda **_: cached.cache_clear(), weak=False)
    return cached
