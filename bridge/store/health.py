"""Whether the shared Redis is usable, with a probe that brings it back automatically.

While Redis is marked down, store calls fail fast with ``StoreUnavailable`` instead of each
request waiting for a socket timeout; a background probe (PING) marks it up again and runs the
recovery hooks (e.g. dropping the in-process cache tier, whose tag versions may be from a Redis
that restarted empty).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import redis.asyncio as aioredis
import structlog
from redis.exceptions import RedisError

from pkg.common.clock import SYSTEM_CLOCK, Clock

log = structlog.get_logger("bridge.redis")


class RedisHealth:
    """Up/down state of one Redis, shared by every store that uses it."""

    def __init__(self, client: aioredis.Redis, clock: Clock = SYSTEM_CLOCK) -> None:
        self._client = client
        self._clock = clock
        self.up = True
        self.last_error = ""
        self.outages = 0
        self._on_recover: list[Callable[[], Awaitable[None] | None]] = []

    def on_recover(self, hook: Callable[[], Awaitable[None] | None]) -> None:
        """Run ``hook`` each time Redis comes back after an outage."""
        self._on_recover.append(hook)

    def mark_down(self, error: BaseException) -> None:
        if self.up:
            self.outages += 1
            log.warning("redis_down", error=repr(error))
        self.up = False
        self.last_error = repr(error)

    async def probe(self) -> bool:
        """PING once; on success after an outage, mark up and run the recovery hooks."""
        try:
            await self._client.ping()
        except (RedisError, OSError) as exc:
            self.mark_down(exc)
            return False
        if not self.up:
            self.up = True
            self.last_error = ""
            log.info("redis_recovered")
            for hook in self._on_recover:
                result = hook()
                if result is not None:
                    await result
        return True

    async def run(self, interval_s: float = 0.5) -> None:
        """Probe forever (while down, every ``interval_s``; while up, every 4x that)."""
        while True:
            await self.probe()
            await self._clock.asleep(interval_s if not self.up else interval_s * 4)
