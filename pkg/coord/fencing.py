"""Fencing tokens and fenced writes checked by Redis itself.

A lease or ownership record alone cannot stop a process that was paused (GC, SIGSTOP) and wakes
up believing it still owns something: only the storage can, by comparing the token each write
carries with the newest one it has seen. ``FencedHash`` keeps an entity's state in a Redis hash
whose ``_fence`` field is the token of its last writer; a Lua script rejects any write whose
token is lower than that field or lower than the fence in the entity's ownership record, and,
in the same atomic step, announces the accepted change on a changelog stream.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis

from pkg.common import redisconn
from pkg.coord.changelog import APPEND_LUA, seq_key
from pkg.coord.era import ERA_KEY, ERA_LUA

FENCE_FIELD = "_fence"

# Fence of an ownership record "replica|address|fence" is its last '|'-separated part.
_LUA_HELPERS = (
    APPEND_LUA
    + """
local function record_fence(rec)
  if not rec then return nil end
  local f = string.match(rec, '|(%d+)$')
  if f then return tonumber(f) end
  return nil
end
"""
)

# One fenced write. KEYS: hash, owner record, stream, stream counter (any keys when maxlen is 0).
# ARGV: fence, ttl_ms, maxlen (0: no announce), exact_trim (0/1), npairs, pairs..., entry fields...
# The entry lists its fields before the fence (an announce puts ``origin`` first, so readers
# skip their own entries before decoding them).
_WRITE = (
    _LUA_HELPERS
    + """
local fence = tonumber(ARGV[1])
local owner_fence = record_fence(redis.call('GET', KEYS[2]))
if owner_fence and owner_fence > fence then
  return {0, 'owner', owner_fence}
end
local stored = tonumber(redis.call('HGET', KEYS[1], '_fence'))
if stored and stored > fence then
  return {0, 'state', stored}
end
local last_pair = 5 + 2 * tonumber(ARGV[5])
local hset = {KEYS[1], '_fence', ARGV[1]}
for i = 6, last_pair do hset[#hset + 1] = ARGV[i] end
redis.call('HSET', unpack(hset))
local ttl = tonumber(ARGV[2])
if ttl > 0 then redis.call('PEXPIRE', KEYS[1], ttl) end
local id = ''
local maxlen = tonumber(ARGV[3])
if maxlen > 0 then
  local fields = {}
  for i = last_pair + 1, #ARGV do fields[#fields + 1] = ARGV[i] end
  fields[#fields + 1] = 'fence'
  fields[#fields + 1] = ARGV[1]
  id = changelog_append(KEYS[3], KEYS[4], maxlen, ARGV[4] == '1', fields)
end
return {1, id, 0}
"""
)

# Announced puts of whole entity states, many in one script call. What every put of a batch
# shares is sent once; each put adds two keys and five args:
# KEYS: stream, stream counter, then per put: hash, owner record.
# ARGV: ttl_ms, maxlen, exact_trim (0/1), touch_ttl_ms, origin, state field, version field,
#   then per put: fence, touch ('' : none), entity id, state, version.
# Each put is checked and applied on its own, exactly like ``_WRITE`` (owner fence, then
# stored fence; HSET + PEXPIRE + numbered changelog entry; touch when the record is ours), and
# announced with ``origin`` first so readers can skip their own entries before decoding them.
# Returns only the exceptions, as (1-based index, reason, fence) triples: the rejected puts
# (reason 'owner' or 'state', with the newer fence) and the accepted puts whose touch found
# another record, or none, in place of the writer's (reason 'untouched').
_PUT_BATCH = (
    _LUA_HELPERS
    + """
local ttl = tonumber(ARGV[1])
local maxlen = tonumber(ARGV[2])
local exact = ARGV[3] == '1'
local origin, state_field, version_field = ARGV[5], ARGV[6], ARGV[7]
local out = {}
local k = 3
local i = 0
for a = 8, #ARGV, 5 do
  i = i + 1
  local hash, owner = KEYS[k], KEYS[k + 1]
  k = k + 2
  local fence = tonumber(ARGV[a])
  local record = redis.call('GET', owner)
  local reason, newer = nil, nil
  local owner_fence = record_fence(record)
  if owner_fence and owner_fence > fence then
    reason, newer = 'owner', owner_fence
  else
    local stored = tonumber(redis.call('HGET', hash, '_fence'))
    if stored and stored > fence then reason, newer = 'state', stored end
  end
  if reason then
    out[#out + 1] = i
    out[#out + 1] = reason
    out[#out + 1] = newer
  else
    local state, version = ARGV[a + 3], ARGV[a + 4]
    redis.call('HSET', hash, '_fence', ARGV[a], state_field, state, version_field, version)
    if ttl > 0 then redis.call('PEXPIRE', hash, ttl) end
    if maxlen > 0 then
      changelog_append(KEYS[1], KEYS[2], maxlen, exact, {
        'origin', origin, 'op', 'put', 'id', ARGV[a + 2], 'fence', ARGV[a],
        state_field, state, version_field, version})
    end
    if ARGV[a + 1] ~= '' then
      if record == ARGV[a + 1] then
        redis.call('PEXPIRE', owner, ARGV[4])
      else
        out[#out + 1] = i
        out[#out + 1] = 'untouched'
        out[#out + 1] = 0
      end
    end
  end
end
return out
"""
)

# KEYS: hash, owner record, stream, guard key (any key when no guard), stream counter
# ARGV: fence (-1: no fence check), expect field ('' : none), expect value, guard value
#       ('' : no guard), maxlen, exact_trim, entry...
_DELETE = (
    _LUA_HELPERS
    + """
local fence = tonumber(ARGV[1])
if ARGV[4] ~= '' and redis.call('GET', KEYS[4]) ~= ARGV[4] then
  return {0, 'guard', 0}
end
local stored = tonumber(redis.call('HGET', KEYS[1], '_fence'))
local exists = redis.call('EXISTS', KEYS[1]) == 1
if exists and ARGV[2] ~= '' and redis.call('HGET', KEYS[1], ARGV[2]) ~= ARGV[3] then
  return {0, 'changed', stored or 0}
end
if fence >= 0 then
  local owner_fence = record_fence(redis.call('GET', KEYS[2]))
  if owner_fence and owner_fence > fence then return {0, 'owner', owner_fence} end
  if stored and stored > fence then return {0, 'state', stored} end
end
redis.call('DEL', KEYS[1])
local id = ''
local maxlen = tonumber(ARGV[5])
if maxlen > 0 then
  local fields = {}
  for i = 7, #ARGV do fields[#fields + 1] = ARGV[i] end
  fields[#fields + 1] = 'fence'
  fields[#fields + 1] = tostring(stored or math.max(fence, 0))
  id = changelog_append(KEYS[3], KEYS[5], maxlen, ARGV[6] == '1', fields)
end
return {1, id}
"""
)


class FencedWriteRejected(Exception):
    """Redis refused a write because a newer fence exists (``reason``: owner/state/guard)."""

    def __init__(self, reason: str, newer_fence: int) -> None:
        super().__init__(f"write rejected by fence check: {reason} holds fence {newer_fence}")
        self.reason = reason
        self.newer_fence = newer_fence


@dataclass(frozen=True)
class WriteResult:
    """An accepted fenced write and the changelog entry that announced it ('' if none)."""

    entry_id: str


@dataclass(frozen=True)
class Announce:
    """Where and how an accepted change is appended: stream key, bound, and entry fields.

    The entry is numbered like ``Changelog.append`` does (counter ``<stream>:seq``), so
    changelog readers detect gaps across both kinds of writers.
    """

    stream: str
    maxlen: int
    fields: Mapping[str, str]
    exact_trim: bool = False


class PutBatch:
    """Announced fenced puts laid out for one ``FencedHash.put_batch`` call.

    A put replaces an entity's state (one string) and version in its hash, under the fence
    checks of ``FencedHash.write``, and announces both on the changelog as an ``op=put`` entry
    from ``origin``. What the puts of a batch share (stream, bounds, TTLs, origin, field names)
    is laid out once; ``add`` appends two keys and five args, so a put on a hot path builds no
    objects beyond its strings.
    """

    __slots__ = ("args", "keys")

    def __init__(
        self,
        stream: str,
        *,
        origin: str,
        maxlen: int,
        exact_trim: bool = False,
        ttl_ms: int = 0,
        touch_ttl_ms: int = 0,
        state_field: str = "state",
        version_field: str = "ver",
    ) -> None:
        self.keys: list[str] = [stream, seq_key(stream)]
        self.args: list[str] = [
            str(ttl_ms),
            str(maxlen),
            "1" if exact_trim else "0",
            str(touch_ttl_ms),
            origin,
            state_field,
            version_field,
        ]

    def add(
        self,
        key: str,
        owner_key: str,
        fence: int,
        entity_id: str,
        state: str,
        version: int,
        touch: str = "",
    ) -> None:
        """Queue one put; ``touch``: the writer's owner record, whose TTL the put extends if
        the record in Redis is still exactly it ('' : none)."""
        self.keys += (key, owner_key)
        self.args += (str(fence), touch, entity_id, state, str(version))

    def __len__(self) -> int:
        return (len(self.keys) - 2) // 2


@dataclass(frozen=True)
class BatchOutcome:
    """What a ``PutBatch`` came to: the rejected puts by index, and the indexes of accepted
    puts whose ``touch`` did not extend anything (the writer's owner record is gone or was
    replaced: the writer should check its ownership now rather than at its next refresh)."""

    rejected: Mapping[int, FencedWriteRejected]
    untouched: frozenset[int] = frozenset()


# KEYS: counter, failover-epoch record. INCR, lifted above this primary's failover-epoch
# floor (a promoted replica may lack the last increments).
_NEXT = (
    ERA_LUA
    + """
local n = redis.call('INCR', KEYS[1])
local floor = era_floor(KEYS[2])
if n <= floor then
  n = floor + 1
  redis.call('SET', KEYS[1], n)
end
return n
"""
)


class FenceCounter:
    """A strictly increasing token source (Redis INCR), shared by every replica, that keeps
    growing across Sentinel failovers (``pkg.coord.era``)."""

    def __init__(self, redis: aioredis.Redis, key: str) -> None:
        self._redis = redis
        self.key = key
        self._next = redis.register_script(_NEXT)

    async def next(self) -> int:
        """A token higher than every token issued before by this counter."""
        return int(await self._next(keys=[self.key, ERA_KEY]))

    async def current(self) -> int:
        """The last issued token (0 when none)."""
        raw = await self._redis.get(self.key)
        return int(raw) if raw is not None else 0

    async def ensure_at_least(self, value: int) -> None:
        """Raise the counter to ``value`` (after Redis lost data, tokens must keep growing)."""
        await self._redis.eval(
            "local c = tonumber(redis.call('GET', KEYS[1])) or 0 "
            "if c < tonumber(ARGV[1]) then redis.call('SET', KEYS[1], ARGV[1]) end return 1",
            1,
            self.key,
            str(value),
        )


def _flatten(mapping: Mapping[str, str]) -> list[str]:
    out: list[str] = []
    for key, value in mapping.items():
        out.extend((key, value))
    return out


def _outcome(raw: Sequence[Any]) -> WriteResult:
    if int(raw[0]) == 1:
        return WriteResult(entry_id=_text(raw[1]))
    raise FencedWriteRejected(_text(raw[1]), int(raw[2]))


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


_ALL_DONE = BatchOutcome({})


class FencedHash:
    """Entity state in Redis hashes, written only by the holder of the newest fence."""

    def __init__(self, redis: aioredis.Redis) -> None:
        self._redis = redis
        self._write = redis.register_script(_WRITE)
        self._put_batch = redis.register_script(_PUT_BATCH)
        # A write-through replica keeps two batches on the wire: each goes on a held connection
        # (redis-py's pooled call cost ~200 us of CPU around every batch, most of it when a
        # steady trickle of reports makes batches of one).
        self._batches = redisconn.BatchedCalls(redis)
        self._delete = redis.register_script(_DELETE)

    async def write(
        self,
        key: str,
        owner_key: str,
        fence: int,
        fields: Mapping[str, str],
        *,
        ttl_ms: int = 0,
        announce: Announce | None = None,
    ) -> WriteResult:
        """Set ``fields`` on ``key`` if ``fence`` is not below the owner's or the stored fence.

        Raises ``FencedWriteRejected`` when Redis saw a newer fence; the write had no effect.
        """
        args: list[Any] = [
            str(fence),
            str(ttl_ms),
            str(announce.maxlen if announce else 0),
            "1" if announce and announce.exact_trim else "0",
            str(len(fields)),
            *_flatten(fields),
            *(_flatten(announce.fields) if announce else []),
        ]
        stream = announce.stream if announce else key
        keys = [key, owner_key, stream, seq_key(stream)]
        return _outcome(await self._write(keys=keys, args=args))

    async def check_fence(self, resource: str, fence: int) -> bool:
        """``FenceCheck``: whether a write of ``resource`` (a hash key) carrying ``fence``
        would pass the stored-fence check now (the owner record is checked by the write)."""
        stored = await self._redis.hget(resource, FENCE_FIELD)
        return stored is None or int(stored) <= fence

    async def put_batch(self, batch: PutBatch) -> BatchOutcome:
        """Apply every put of ``batch`` in one script call (each checked on its own, in order,
        all in one atomic step).

        Connection errors raise for the whole batch (it may or may not have been applied, like
        a single write).
        """
        if not len(batch):
            return _ALL_DONE
        raw = await self._batches.evalsha(self._put_batch, batch.keys, batch.args)
        if not raw:
            return _ALL_DONE
        rejected: dict[int, FencedWriteRejected] = {}
        untouched: set[int] = set()
        for i in range(0, len(raw), 3):
            index, reason = int(raw[i]) - 1, _text(raw[i + 1])
            if reason == "untouched":
                untouched.add(index)
            else:
                rejected[index] = FencedWriteRejected(reason, int(raw[i + 2]))
        return BatchOutcome(rejected, frozenset(untouched))

    async def delete(
        self,
        key: str,
        owner_key: str,
        *,
        fence: int | None = None,
        expect: tuple[str, str] | None = None,
        guard: tuple[str, str] | None = None,
        announce: Announce | None = None,
    ) -> WriteResult:
        """Delete ``key`` under checks, announcing it in the same atomic step.

        ``fence``: the writer's fence (rejected when a newer one exists). ``expect``: only
        delete if field ``expect[0]`` still holds ``expect[1]`` (nobody wrote since the state was
        judged deletable). ``guard``: only while ``GET guard[0] == guard[1]`` (e.g. while a
        leader lease is still ours). A missing key is still announced, so every reader drops
        its copy (after Redis lost data, copies can outlive the key).
        """
        args: list[Any] = [
            str(-1 if fence is None else fence),
            expect[0] if expect else "",
            expect[1] if expect else "",
            guard[1] if guard else "",
            str(announce.maxlen if announce else 0),
            "1" if announce and announce.exact_trim else "0",
            *(_flatten(announce.fields) if announce else []),
        ]
        stream = announce.stream if announce else key
        guard_key = guard[0] if guard else key
        raw = await self._delete(
            keys=[key, owner_key, stream, guard_key, seq_key(stream)], args=args
        )
        return _outcome(raw)
