"""channels-redis's layer, whose `receive` waits out a Redis outage instead of raising.

Channels runs every consumer as one loop over two sources, the socket and
the layer's `receive`; an exception from either ends the consumer and so
closes the socket. channels-redis's `receive` raises as soon as Redis is
unreachable, so a Redis restart closed every chat socket of every process at
once (their replies ran on and were stored, but every page lost its stream
and sockets opened meanwhile were closed at once), though the layer carries
only rare control messages (tabs hearing of a new reply, a session that ended).

Here `receive` logs the failure (once per `_WARN_EVERY_S` per process) and
tries again, waiting 0.1 s, then twice as long each time up to 2 s, until
Redis answers. Control messages sent to a socket during the outage are lost,
as are group memberships if Redis comes back empty. Sending still raises:
callers decide (chat.consumers wraps it; the health check reports it).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from channels_redis.core import RedisChannelLayer
from redis.exceptions import RedisError

logger = logging.getLogger(__name__)

RETRY_FIRST_S = 0.1
RETRY_MAX_S = 2.0
_WARN_EVERY_S = 30.0


class SteadyRedisChannelLayer(RedisChannelLayer):
    _warned_at = float("-inf")

    async def receive(self, channel: str) -> Any:
        delay = RETRY_FIRST_S
        while True:
            try:
                return await super().receive(channel)
            except (RedisError, OSError) as exc:
                now = time.monotonic()
                if now - SteadyRedisChannelLayer._warned_at >= _WARN_EVERY_S:
                    SteadyRedisChannelLayer._warned_at = now
                    logger.warning(
                        "channel layer receive failed (%s); sockets stay open and it is "
                        "tried again until Redis answers",
                        type(exc).__name__,
                    )
                await asyncio.sleep(delay)
                delay = min(delay * 2, RETRY_MAX_S)
