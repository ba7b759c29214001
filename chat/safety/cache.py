"""The cache that rate-limit counters, budgets and violation counts live in.

Django's Redis backend raises when Redis is unreachable, and django-ratelimit
does not catch that (it only catches `socket.gaierror`), so a Redis outage
would turn every rate-limited view into a 500. This backend answers like a
cache miss instead (`add` False, `get` the default, `incr` ValueError), which
is the "getting or setting the count failed" case django-ratelimit handles
with `RATELIMIT_FAIL_OPEN`, and which `chat.safety.limits` handles with its
per-process fallback. See docs/decisions/0004-ratelimit-when-redis-is-down.md.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from django.core.cache.backends.base import DEFAULT_TIMEOUT
from redis.exceptions import RedisError

from config.redis_cache import SharedRedisCache

logger = logging.getLogger(__name__)

# One warning per this many seconds per process, not one per request.
_WARN_EVERY_SECONDS = 30.0


class CacheUnavailable(ValueError):
    """The counter store could not be reached (a ValueError, like a missing key)."""


# Each counter: made with its expiry if absent, then incremented; in order,
# so a key that comes twice counts twice. A script runs atomically, as
# MULTI/EXEC did, and is one command: for 500 counters it took ~3-4.5 ms in
# a script against ~10-17 ms for a MULTI/EXEC of 1,000 commands, most of
# which was redis-py packing and parsing each command.
_COUNT_MANY = """
local counts = {}
for i, key in ipairs(KEYS) do
  redis.call('SET', key, 0, 'PX', ARGV[i], 'NX')
  counts[i] = redis.call('INCR', key)
end
return counts
"""


class FailSoftRedisCache(SharedRedisCache):
    _last_warning = 0.0
    _count_script: Any = None  # made with the first client; each call names its own

    def _failed(self, op: str, exc: Exception) -> None:
        now = time.monotonic()
        if now - FailSoftRedisCache._last_warning >= _WARN_EVERY_SECONDS:
            FailSoftRedisCache._last_warning = now
            logger.warning("rate-limit cache unavailable (%s): %s", op, type(exc).__name__)

    def add(
        self,
        key: Any,
        value: Any,
        timeout: float | object | None = DEFAULT_TIMEOUT,
        version: int | None = None,
    ) -> bool:
        try:
            return bool(super().add(key, value, timeout, version))  # type: ignore[arg-type]  # DEFAULT_TIMEOUT sentinel
        except RedisError as exc:
            self._failed("add", exc)
            return False

    def get(self, key: Any, default: Any = None, version: int | None = None) -> Any:
        try:
            return super().get(key, default, version)
        except RedisError as exc:
            self._failed("get", exc)
            return default

    def incr(self, key: Any, delta: int = 1, version: int | None = None) -> int:
        try:
            return int(super().incr(key, delta, version))
        except RedisError as exc:
            self._failed("incr", exc)
            raise CacheUnavailable(str(exc)) from None

    def delete(self, key: Any, version: int | None = None) -> bool:
        try:
            return bool(super().delete(key, version))
        except RedisError as exc:
            self._failed("delete", exc)
            return False

    def count_many(self, counters: list[tuple[str, float]]) -> list[int | None]:
        """Add one to each counter, made with its timeout if absent; one round trip for all.

        As SQLiteCache.count_many: a key may come more than once. On a Redis
        error every count is None (the store is down).
        """
        if not counters:
            return []
        keys = [self.make_and_validate_key(key) for key, _timeout in counters]
        expiries = [max(1, int(timeout * 1000)) for _key, timeout in counters]
        try:
            client = self._cache.get_client(None, write=True)
            if self._count_script is None:
                self._count_script = client.register_script(_COUNT_MANY)
            # EVALSHA; loaded first where the server does not know it yet.
            replies = self._count_script(keys=keys, args=expiries, client=client)
        except RedisError as exc:
            self._failed("count_many", exc)
            return [None] * len(counters)
        return [int(value) for value in replies]
