"""Django's Redis cache with one client, and so one connection pool, per process.

Django keeps a cache instance per async context, and its Redis backend builds
a client with its own connection pool per instance: every task that touched
the cache opened new connections to Redis. Here every instance in a process
shares one client per server list and options.
"""

from __future__ import annotations

import threading
from typing import Any

from django.core.cache.backends.redis import RedisCache, RedisCacheClient
from django.utils.functional import cached_property

_clients: dict[str, RedisCacheClient] = {}
_lock = threading.Lock()


class SharedRedisCache(RedisCache):
    def validate_key(self, key: str) -> None:
        """Accept any key: Redis has none of memcached's limits on them.

        Django's check warns about keys memcached would refuse, on every
        operation (~2 us, a rate-limit check makes two).
        """

    @cached_property
    def _cache(self) -> Any:
        own: Any = self  # RedisCache's private attributes are not in Django's stubs
        key = repr((own._servers, sorted(own._options.items())))
        with _lock:
            client = _clients.get(key)
            if client is None:
                client = _clients[key] = own._class(own._servers, **own._options)
        return client
