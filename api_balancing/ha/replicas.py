"""One live process per replica id: the id is claimed in Redis with the replica's address.

Replica ids name changelog streams (a replica appends to its own and reads only the others')
and ownership records, so two processes sharing one id would silently ignore each other's
changes. A replica therefore claims
``foghorn:{c}:replica:<id>`` (value: its address, TTL ``3 x interval``) at start and keeps it
fresh; a start-up that finds the id held by another live address fails with a clear error.
"""

from __future__ import annotations

import asyncio

import redis.asyncio as aioredis
import structlog

from api_balancing.store.redis_store import REDIS_ERRORS
from pkg.common.clock import SYSTEM_CLOCK, Clock
from pkg.coord.scripts import DELETE_IF_EQUALS

log = structlog.get_logger("foghorn.ha.replicas")

_CLAIM = """
local cur = redis.call('GET', KEYS[1])
if cur and cur ~= ARGV[1] then return cur end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return ''
"""


class ReplicaIdInUse(OSError):
    """Another live process runs with this replica id (like an address already in use)."""


class ReplicaClaim:
    """Claims and keeps this process's replica id."""

    def __init__(
        self,
        redis: aioredis.Redis,
        key: str,
        replica_id: str,
        interval_s: float,
        *,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        self.key = key
        self.replica_id = replica_id
        self.interval_s = interval_s
        self.ttl_s = 3 * interval_s  # how long a killed replica stays a member
        self.address = ""
        self.withdrawn = False
        self._clock = clock
        self._claim = redis.register_script(_CLAIM)
        self._release = redis.register_script(DELETE_IF_EQUALS)

    async def claim(self, address: str) -> None:
        """Take the id for ``address``; raises ReplicaIdInUse when another address holds it.

        With Redis unreachable the claim is skipped (start-up must not depend on Redis); the
        keeper loop claims it once Redis answers.
        """
        self.address = address
        try:
            holder = await self._claim(keys=[self.key], args=[address, str(int(self.ttl_s * 1000))])
        except REDIS_ERRORS as exc:
            log.warning("replica id not claimed yet (Redis unreachable)", error=str(exc))
            return
        if holder:
            raise ReplicaIdInUse(
                f"FOGHORN_REPLICA_ID={self.replica_id!r} is already used by the live replica at "
                f"{holder}: give every replica its own id"
            )

    async def run(self) -> None:
        """Keep the claim fresh; log loudly if another process took the id meanwhile."""
        while True:
            await self._clock.asleep(self.interval_s)
            if self.withdrawn:
                return
            try:
                holder = await self._claim(
                    keys=[self.key], args=[self.address, str(int(self.ttl_s * 1000))]
                )
            except REDIS_ERRORS:
                continue
            except asyncio.CancelledError:
                raise
            if holder:
                log.error(
                    "replica id used by another process", replica=self.replica_id, other=holder
                )

    async def release(self) -> None:
        """Give the id up (a stopping replica: peers drop it from their membership at once)."""
        self.withdrawn = True
        try:
            await self._release(keys=[self.key], args=[self.address])
        except REDIS_ERRORS:
            pass
