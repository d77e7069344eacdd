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

from pkg.coord.changelog import APPEND_LUA, seq_key

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

# One fenced write. K: hash, owner record, stream, stream counter (any keys when maxlen == 0).
# A (from index o+1): fence, ttl_ms, maxlen (0: no announce), exact_trim (0/1),
#   include_written (0/1), touch value ('' : none), touch ttl_ms, npairs, pairs..., entry...;
#   the write's args end at index e. "touch": after the write, extend the owner record's TTL
#   if it is exactly the writer's (the ownership refresh rides along with every write).
_FENCED_WRITE_LUA = """
local function fenced_write(K, A, o, e)
  local fence = tonumber(A[o + 1])
  local owner_fence = record_fence(redis.call('GET', K[2]))
  if owner_fence and owner_fence > fence then
    return {0, 'owner', owner_fence}
  end
  local stored = tonumber(redis.call('HGET', K[1], '_fence'))
  if stored and stored > fence then
    return {0, 'state', stored}
  end
  local npairs = tonumber(A[o + 8])
  local last_pair = o + 8 + 2 * npairs
  local hset = {K[1], '_fence', A[o + 1]}
  for i = o + 9, last_pair do hset[#hset + 1] = A[i] end
  redis.call('HSET', unpack(hset))
  local ttl = tonumber(A[o + 2])
  if ttl > 0 then redis.call('PEXPIRE', K[1], ttl) end
  local id = ''
  local maxlen = tonumber(A[o + 3])
  if maxlen > 0 then
    local fields = {'fence', A[o + 1]}
    for i = last_pair + 1, e do fields[#fields + 1] = A[i] end
    if A[o + 5] == '1' then
      for i = o + 9, last_pair do fields[#fields + 1] = A[i] end
    end
    id = changelog_append(K[3], K[4], maxlen, A[o + 4] == '1', fields)
  end
  if A[o + 6] ~= '' and redis.call('GET', K[2]) == A[o + 6] then
    redis.call('PEXPIRE', K[2], A[o + 7])
  end
  return {1, id, 0}
end
"""

_WRITE = (
    _LUA_HELPERS
    + _FENCED_WRITE_LUA
    + """
return fenced_write(KEYS, ARGV, 0, #ARGV)
"""
)

# Several writes in one script call: KEYS are 4 per write in order; ARGV is, per write, the
# number of its args followed by them. Returns the three result fields of each write in a row.
# One call instead of one per write: the client packs and parses once (Python costs far more
# per command than Redis does), and Redis runs the writes back to back.
_WRITE_BATCH = (
    _LUA_HELPERS
    + _FENCED_WRITE_LUA
    + """
local out = {}
local o = 0
local w = 0
while o < #ARGV do
  local n = tonumber(ARGV[o + 1])
  local K = {KEYS[w * 4 + 1], KEYS[w * 4 + 2], KEYS[w * 4 + 3], KEYS[w * 4 + 4]}
  local r = fenced_write(K, ARGV, o + 1, o + 1 + n)
  out[#out + 1] = r[1]
  out[#out + 1] = r[2]
  out[#out + 1] = r[3]
  o = o + 1 + n
  w = w + 1
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
  local fields = {'fence', tostring(stored or math.max(fence, 0))}
  for i = 7, #ARGV do fields[#fields + 1] = ARGV[i] end
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
    include_written: bool = False  # the entry also carries the hash fields written (sent once)


@dataclass(frozen=True)
class FencedWrite:
    """One write of ``FencedHash.write_many`` (same meaning as ``FencedHash.write``'s args)."""

    key: str
    owner_key: str
    fence: int
    fields: Mapping[str, str]
    ttl_ms: int = 0
    announce: Announce | None = None
    touch: tuple[str, int] | None = None  # (owner record value, ttl_ms) to extend if ours

    def keys_and_args(self) -> tuple[list[str], list[Any]]:
        announce = self.announce
        args: list[Any] = [
            str(self.fence),
            str(self.ttl_ms),
            str(announce.maxlen if announce else 0),
            "1" if announce and announce.exact_trim else "0",
            "1" if announce and announce.include_written else "0",
            self.touch[0] if self.touch else "",
            str(self.touch[1]) if self.touch else "0",
            str(len(self.fields)),
            *_flatten(self.fields),
            *(_flatten(announce.fields) if announce else []),
        ]
        stream = announce.stream if announce else self.key
        return [self.key, self.owner_key, stream, seq_key(stream)], args


class PreparedWrite:
    """The constant part of repeated fenced writes to one key (a node written on every report).

    ``FencedWrite.keys_and_args`` rebuilds keys, announce fields and flags on every call; on a
    hot path that costs more than Redis spends on the write. This keeps the keys and the
    constant args once, and ``args`` lays out one write exactly like ``keys_and_args`` does
    (prefixed by its arg count, as ``FencedHash.write_prepared`` expects).
    """

    __slots__ = ("_exact", "_include", "_maxlen", "_tail", "_ttl", "keys")

    def __init__(
        self, key: str, owner_key: str, *, ttl_ms: int = 0, announce: Announce | None = None
    ) -> None:
        stream = announce.stream if announce else key
        self.keys: tuple[str, str, str, str] = (key, owner_key, stream, seq_key(stream))
        self._ttl = str(ttl_ms)
        self._maxlen = str(announce.maxlen if announce else 0)
        self._exact = "1" if announce and announce.exact_trim else "0"
        self._include = "1" if announce and announce.include_written else "0"
        self._tail = tuple(_flatten(announce.fields)) if announce else ()

    def args(self, fence: int, fields: Sequence[str], touch: tuple[str, int] | None) -> list[str]:
        """One write's args: ``fields`` is the flat ``name, value, ...`` list to HSET."""
        return [
            str(8 + len(fields) + len(self._tail)),
            str(fence),
            self._ttl,
            self._maxlen,
            self._exact,
            self._include,
            touch[0] if touch else "",
            str(touch[1]) if touch else "0",
            str(len(fields) // 2),
            *fields,
            *self._tail,
        ]


class FenceCounter:
    """A strictly increasing token source (Redis INCR), shared by every replica."""

    def __init__(self, redis: aioredis.Redis, key: str) -> None:
        self._redis = redis
        self.key = key

    async def next(self) -> int:
        """A token higher than every token issued before by this counter."""
        return int(await self._redis.incr(self.key))

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


class FencedHash:
    """Entity state in Redis hashes, written only by the holder of the newest fence."""

    def __init__(self, redis: aioredis.Redis) -> None:
        self._redis = redis
        self._write = redis.register_script(_WRITE)
        self._write_batch = redis.register_script(_WRITE_BATCH)
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
        touch: tuple[str, int] | None = None,
    ) -> WriteResult:
        """Set ``fields`` on ``key`` if ``fence`` is not below the owner's or the stored fence.

        Raises ``FencedWriteRejected`` when Redis saw a newer fence; the write had no effect.
        ``touch=(record, ttl_ms)`` extends the owner record's TTL if it is exactly ``record``.
        """
        write = FencedWrite(key, owner_key, fence, fields, ttl_ms, announce, touch)
        keys, args = write.keys_and_args()
        return _outcome(await self._write(keys=keys, args=args))

    async def write_many(
        self, writes: Sequence[FencedWrite]
    ) -> list[WriteResult | FencedWriteRejected]:
        """Several fenced writes in one script call (each write checked and applied on its own,
        in order; all of them in one atomic step).

        Returns, per write, its result or the rejection. Connection errors raise for the whole
        batch (it may or may not have been applied, like a single write).
        """
        if not writes:
            return []
        keys: list[str] = []
        args: list[Any] = []
        for write in writes:
            write_keys, write_args = write.keys_and_args()
            keys.extend(write_keys)
            args.append(str(len(write_args)))
            args.extend(write_args)
        return await self.write_prepared(keys, args)

    async def write_prepared(
        self, keys: Sequence[str], args: Sequence[Any]
    ) -> list[WriteResult | FencedWriteRejected]:
        """``write_many`` with the batch already laid out: 4 keys per write (``PreparedWrite.
        keys``) and, per write, ``PreparedWrite.args``; same checks, same results."""
        if not keys:
            return []
        raw = await self._write_batch(keys=keys, args=args)
        results: list[WriteResult | FencedWriteRejected] = []
        for i in range(0, len(raw), 3):
            try:
                results.append(_outcome(raw[i : i + 3]))
            except FencedWriteRejected as exc:
                results.append(exc)
        return results

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
