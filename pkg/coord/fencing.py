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
from redis.exceptions import NoScriptError

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

# KEYS: hash, owner record, stream, stream counter (any keys when maxlen == 0)
# ARGV: fence, ttl_ms, maxlen (0: no announce), exact_trim (0/1), include_written (0/1),
#       npairs, pairs..., entry...
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
local npairs = tonumber(ARGV[6])
local last_pair = 6 + 2 * npairs
local hset = {KEYS[1], '_fence', ARGV[1]}
for i = 7, last_pair do hset[#hset + 1] = ARGV[i] end
redis.call('HSET', unpack(hset))
local ttl = tonumber(ARGV[2])
if ttl > 0 then redis.call('PEXPIRE', KEYS[1], ttl) end
local id = ''
local maxlen = tonumber(ARGV[3])
if maxlen > 0 then
  local fields = {'fence', ARGV[1]}
  for i = last_pair + 1, #ARGV do fields[#fields + 1] = ARGV[i] end
  if ARGV[5] == '1' then
    for i = 7, last_pair do fields[#fields + 1] = ARGV[i] end
  end
  id = changelog_append(KEYS[3], KEYS[4], maxlen, ARGV[4] == '1', fields)
end
return {1, id}
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

    def keys_and_args(self) -> tuple[list[str], list[Any]]:
        announce = self.announce
        args: list[Any] = [
            str(self.fence),
            str(self.ttl_ms),
            str(announce.maxlen if announce else 0),
            "1" if announce and announce.exact_trim else "0",
            "1" if announce and announce.include_written else "0",
            str(len(self.fields)),
            *_flatten(self.fields),
            *(_flatten(announce.fields) if announce else []),
        ]
        stream = announce.stream if announce else self.key
        return [self.key, self.owner_key, stream, seq_key(stream)], args


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
        keys, args = FencedWrite(key, owner_key, fence, fields, ttl_ms, announce).keys_and_args()
        return _outcome(await self._write(keys=keys, args=args))

    async def write_many(
        self, writes: Sequence[FencedWrite]
    ) -> list[WriteResult | FencedWriteRejected]:
        """Several fenced writes in one round trip (pipelined, each atomic on its own).

        Returns, per write, its result or the rejection. Connection errors raise for the whole
        batch (any write may or may not have been applied, like a single write's).
        """
        results: list[WriteResult | FencedWriteRejected | None] = [None] * len(writes)
        todo = list(range(len(writes)))
        for _attempt in range(2):
            pipe = self._redis.pipeline(transaction=False)
            for index in todo:
                keys, args = writes[index].keys_and_args()
                pipe.evalsha(self._write.sha, len(keys), *keys, *args)
            replies = await pipe.execute(raise_on_error=False)
            missing = []
            for index, reply in zip(todo, replies, strict=True):
                if isinstance(reply, NoScriptError):
                    missing.append(index)  # not executed: safe to send again
                elif isinstance(reply, Exception):
                    raise reply
                else:
                    try:
                        results[index] = _outcome(reply)
                    except FencedWriteRejected as exc:
                        results[index] = exc
            if not missing:
                break
            await self._redis.script_load(_WRITE)  # Redis restarted: scripts are gone
            todo = missing
        return [r if r is not None else FencedWriteRejected("unexecuted", 0) for r in results]

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
