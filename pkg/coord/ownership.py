"""Fenced ownership records: which replica holds an entity (e.g. a node's control stream).

Key ``<prefix>:owner:<entity>`` holds ``replica|address|fence`` with a TTL. Fences come from one
Redis counter (``<prefix>:fence``) and only grow. The rules, all enforced by Lua in Redis:

- acquire: take a fresh fence from the counter and store the record only if the current record
  (if any) carries a strictly lower fence;
- refresh (on each report): extend our own record; if it expired and no higher fence was ever
  issued for the entity (``<prefix>:fencehw:<entity>``), restore it; if a record with a higher
  fence is there, report ``SUPERSEDED`` so the caller drops the stream;
- release / evict: delete only when the record is exactly the one the caller holds or saw.

After Redis loses its data (restart without persistence), a live owner's refresh restores its
record and raises the counter back to at least its fence, so fences keep growing. After a
Sentinel failover to a replica that lacked the last increments, acquire issues fences above the
new primary's failover-epoch floor (``pkg.coord.era``), so no fence is ever issued twice.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis

from pkg.common import redisconn
from pkg.coord.era import ERA_KEY, ERA_LUA
from pkg.coord.scripts import DELETE_IF_EQUALS

# KEYS: record, counter, high-water, failover-epoch record (pkg.coord.era).
_ACQUIRE = (
    ERA_LUA
    + """
local fence = redis.call('INCR', KEYS[2])
local floor = tonumber(ARGV[4]) or 0
local hw = tonumber(redis.call('GET', KEYS[3])) or 0
if hw > floor then floor = hw end
local era = era_floor(KEYS[4])
if era > floor then floor = era end
if fence <= floor then
  -- the counter was lost (Redis restart) or lacks increments (a promoted replica) while fences
  -- survived elsewhere (in another key, in the caller's memory, or below this primary's
  -- failover epoch): jump past them so fences keep growing
  fence = floor + 1
  redis.call('SET', KEYS[2], fence)
end
local cur = redis.call('GET', KEYS[1])
if cur then
  local f = tonumber(string.match(cur, '|(%d+)$')) or 0
  if f >= fence then return {0, cur} end
end
local rec = ARGV[1] .. '|' .. fence
redis.call('SET', KEYS[1], rec, 'PX', ARGV[2])
redis.call('SET', KEYS[3], fence, 'PX', ARGV[3])
return {1, rec, cur or ''}
"""
)

_REFRESH = """
local fence = tonumber(ARGV[2])
local cur = redis.call('GET', KEYS[1])
if cur == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[3])
  redis.call('PEXPIRE', KEYS[3], ARGV[4])
  return {1, cur}
end
if cur then
  local f = tonumber(string.match(cur, '|(%d+)$')) or 0
  if f >= fence then return {0, cur} end
end
local hw = tonumber(redis.call('GET', KEYS[3])) or 0
if hw > fence then return {0, ''} end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[3])
redis.call('SET', KEYS[3], fence, 'PX', ARGV[4])
local c = tonumber(redis.call('GET', KEYS[2])) or 0
if c < fence then redis.call('SET', KEYS[2], fence) end
return {2, ARGV[1]}
"""


@dataclass(frozen=True)
class OwnerRecord:
    """Who owns an entity: replica id, the address others relay to, and the fence."""

    replica: str
    address: str
    fence: int

    def encode(self) -> str:
        return f"{self.replica}|{self.address}|{self.fence}"

    @classmethod
    def decode(cls, raw: str | bytes) -> OwnerRecord:
        """Parse ``replica|address|fence``; raises ValueError on anything else."""
        text = raw.decode() if isinstance(raw, bytes) else raw
        replica, address, fence = text.rsplit("|", 2)
        if not replica:
            raise ValueError(f"ownership record without replica: {text!r}")
        return cls(replica=replica, address=address, fence=int(fence))


class RefreshOutcome(enum.Enum):
    """What a refresh found."""

    EXTENDED = "extended"  # our record was there and got a new TTL
    RESTORED = "restored"  # our record had expired (or Redis lost it) and nobody took over
    SUPERSEDED = "superseded"  # a higher fence exists: we no longer own the entity


@dataclass(frozen=True)
class Acquired:
    """Result of an acquire: ``record`` is ours if ``ok``, else the record that won;
    ``replaced`` is the unexpired record ours replaced (the previous owner never released it:
    it died, hangs, or lost the entity to us mid-stream)."""

    ok: bool
    record: OwnerRecord | None
    replaced: OwnerRecord | None = None


class Ownership:
    """Fenced ownership records under one key prefix."""

    def __init__(
        self,
        redis: aioredis.Redis,
        prefix: str,
        ttl_ms: int,
        history_ttl_ms: int = 24 * 3600 * 1000,
        batch_linger_s: float = 0.0,
    ) -> None:
        if ttl_ms <= 0:
            raise ValueError("ttl_ms must be positive")
        self._redis = redis
        self.prefix = prefix
        self.ttl_ms = ttl_ms
        # How long the per-entity high-water fence outlives activity: it is what stops an
        # expired zombie from restoring a record after someone else held a newer fence.
        self.history_ttl_ms = max(history_ttl_ms, ttl_ms * 4)
        self._acquire = redis.register_script(_ACQUIRE)
        # Acquisitions come in herds (a fleet registering, a dead replica's nodes moving):
        # concurrent ones share round trips on held connections instead of a pooled call each.
        # (``batch_linger_s``: see ``BatchedCalls``; a herd spread over seconds trickles in.)
        self._calls = redisconn.BatchedCalls(redis, linger_s=batch_linger_s)
        self._refresh = redis.register_script(_REFRESH)
        self._delete_if = redis.register_script(DELETE_IF_EQUALS)

    def key(self, entity: str) -> str:
        return f"{self.prefix}:owner:{entity}"

    @property
    def counter_key(self) -> str:
        return f"{self.prefix}:fence"

    def high_water_key(self, entity: str) -> str:
        return f"{self.prefix}:fencehw:{entity}"

    def _keys(self, entity: str) -> list[str]:
        return [self.key(entity), self.counter_key, self.high_water_key(entity)]

    async def acquire(self, entity: str, replica: str, address: str, at_least: int = 0) -> Acquired:
        """Take ownership with a fresh, strictly higher fence (also above ``at_least``, the
        highest fence the caller has seen for the entity, in case Redis lost its counter)."""
        if "|" in replica or "|" in address:
            raise ValueError("replica and address must not contain '|'")
        raw: Any = await self._calls.evalsha(
            self._acquire,
            [*self._keys(entity), ERA_KEY],
            [
                f"{replica}|{address}",
                str(self.ttl_ms),
                str(self.history_ttl_ms),
                str(max(0, at_least)),
            ],
        )
        record = OwnerRecord.decode(raw[1])
        replaced = OwnerRecord.decode(raw[2]) if len(raw) > 2 and raw[2] else None
        return Acquired(ok=int(raw[0]) == 1, record=record, replaced=replaced)

    async def refresh(self, entity: str, record: OwnerRecord) -> RefreshOutcome:
        """Extend ``record``'s TTL, restore it if it lapsed unclaimed, or report it superseded."""
        raw: Any = await self._refresh(
            keys=self._keys(entity),
            args=[record.encode(), str(record.fence), str(self.ttl_ms), str(self.history_ttl_ms)],
        )
        code = int(raw[0])
        if code == 1:
            return RefreshOutcome.EXTENDED
        if code == 2:
            return RefreshOutcome.RESTORED
        return RefreshOutcome.SUPERSEDED

    async def get(self, entity: str) -> OwnerRecord | None:
        """The current owner record, or None."""
        raw = await self._redis.get(self.key(entity))
        return OwnerRecord.decode(raw) if raw is not None else None

    async def release(self, entity: str, record: OwnerRecord) -> bool:
        """Delete the record only if it is still exactly ``record`` (ours)."""
        return int(await self._delete_if(keys=[self.key(entity)], args=[record.encode()])) == 1

    async def evict(self, entity: str, seen: OwnerRecord) -> bool:
        """Remove a dead owner's record, only if it is still the one we saw (match-checked)."""
        return await self.release(entity, seen)


class OwnershipTaken(Exception):
    """Another owner holds the resource with a fence at least as high."""


class OwnerClaims:
    """``pkg.coord.protocols.FencedOwnership`` for one replica over ``Ownership`` records."""

    def __init__(self, ownership: Ownership, replica: str, address: str) -> None:
        self.ownership = ownership
        self.replica = replica
        self.address = address
        self._held: dict[str, OwnerRecord] = {}

    async def acquire_fenced(self, resource: str) -> int:
        got = await self.ownership.acquire(resource, self.replica, self.address)
        if not got.ok or got.record is None:
            raise OwnershipTaken(f"{resource!r} is owned by {got.record}")
        self._held[resource] = got.record
        return got.record.fence

    async def release_resource(self, resource: str) -> None:
        record = self._held.pop(resource, None)
        if record is not None:
            await self.ownership.release(resource, record)
