"""Redis stores: what makes Bridge replicas share one cache and one set of rate limits.

Keys (``prefix`` defaults to ``bridge``):

- ``{prefix}:c:{key}``    cache entry (opaque bytes), PX = the entry's whole life
- ``{prefix}:t:{tag}``    tag version counter (INCR on invalidation; never scanned)
- ``{prefix}:l:{name}``   short lock (SET NX PX; released by compare-and-delete)
- ``{prefix}:rl:{key}``   token bucket hash {tokens, ts}, updated by one Lua script
- ``{prefix}:a:{key}``    whole answer hash {b: entry, t: tag keys, v: their versions}, PX = the
  answer's fresh life; read by the same script that charges the caller's bucket

Every Redis error becomes ``StoreUnavailable`` and marks Redis down in ``RedisHealth``; while it
is down calls fail fast, and the caller degrades.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, RedisError

from bridge.store import StoreUnavailable
from bridge.store.health import RedisHealth
from bridge.token_bucket import Decision, Limit
from pkg.common import redisconn
from pkg.coord.scripts import DELETE_IF_EQUALS, EXPIRE_IF_EQUALS

T = TypeVar("T")

# The same maths as bridge.token_bucket.take, atomic in Redis and timed by Redis' own clock, so
# every replica sees one bucket and one time: the limit is exact across replicas.
_BUCKET = """
local cap = tonumber(ARGV[1])
local rate = tonumber(ARGV[2])
local cost = tonumber(ARGV[3])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local b = redis.call('HMGET', KEYS[1], 'tokens', 'ts')
local tokens = tonumber(b[1])
local ts = tonumber(b[2])
if tokens == nil or ts == nil then
  tokens = cap
  ts = now
end
if now > ts then
  tokens = math.min(cap, tokens + (now - ts) * rate / 1000.0)
  ts = now
end
local allowed = 0
local retry_ms = 0
if tokens >= cost then
  tokens = tokens - cost
  allowed = 1
else
  retry_ms = math.ceil((cost - tokens) * 1000.0 / rate)
end
local full_ms = math.ceil((cap - tokens) * 1000.0 / rate)
redis.call('HSET', KEYS[1], 'tokens', string.format('%.6f', tokens), 'ts', ts)
redis.call('PEXPIRE', KEYS[1], full_ms + 1000)
"""
_TOKEN_BUCKET = (
    _BUCKET
    + """
return {allowed, string.format('%.6f', tokens), full_ms, retry_ms}
"""
)

# The bucket, then (only when granted) the answer under KEYS[2] if each tag key it names still
# holds the version it was written with (a missing counter is version 0). One round trip for a
# repeated query. The tag keys are read from the entry, not passed in KEYS: fine on one Redis
# (Sentinel included), not on Redis Cluster, whose slots would need them declared.
_ADMIT_AND_READ = (
    _BUCKET
    + """
local answer = false
if allowed == 1 then
  local e = redis.call('HMGET', KEYS[2], 't', 'v', 'b')
  if e[3] then
    local same = true
    if e[1] ~= '' then
      local keys = {}
      for k in string.gmatch(e[1], '[^\\n]+') do keys[#keys + 1] = k end
      local cur = redis.call('MGET', unpack(keys))
      for i = 1, #cur do
        if not cur[i] then cur[i] = '0' end
      end
      same = table.concat(cur, ',') == e[2]
    end
    if same then answer = e[3] end
  end
end
return {allowed, string.format('%.6f', tokens), full_ms, retry_ms, answer}
"""
)


def connect(url: str, timeout_s: float = 0.5) -> aioredis.Redis:
    """A client that fails fast: short socket timeouts, one immediate retry on a dropped socket.

    redis-py's default (3 retries with backoff) would stall every request for seconds during an
    outage; the retry covers a pooled connection that a Redis restart (or a Sentinel failover:
    ``url`` may be a ``redis+sentinel://`` spec, see ``pkg.common.redisconn``) closed.
    """
    return redisconn.connect(
        url,
        name="bridge",
        # Commands packed in C: redis-py's Python packer was ~5% of a kept answer's CPU.
        hiredis_packing=True,
        socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s,
        retry=Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)),
        health_check_interval=0,
    )


class _RedisBase:
    def __init__(self, client: aioredis.Redis, health: RedisHealth, prefix: str) -> None:
        self.client = client
        self.health = health
        self.prefix = prefix

    async def _call(self, fn: Callable[[], Awaitable[T]]) -> T:
        if not self.health.up:
            raise StoreUnavailable(self.health.last_error or "redis down")
        try:
            return await fn()
        except (RedisError, OSError, RuntimeError) as exc:
            # RuntimeError: asyncio's "unable to perform operation on <TCPTransport closed=True>"
            # from a pooled connection whose socket died during a network partition (seen in the
            # isolate-replica drill); redis-py drops that connection, so the next call is clean.
            self.health.mark_down(exc)
            raise StoreUnavailable(repr(exc)) from exc


class RedisCacheStore(_RedisBase):
    """``CacheStore`` on Redis: entries, tag versions and locks shared by all replicas."""

    def __init__(self, client: aioredis.Redis, health: RedisHealth, prefix: str = "bridge") -> None:
        super().__init__(client, health, prefix)
        # Compare-and-delete: a lock whose TTL ran out and was taken by another replica is not
        # ours to delete (the same script as pkg.coord's leases and ownership records).
        self._release = client.register_script(DELETE_IF_EQUALS)
        self._extend = client.register_script(EXPIRE_IF_EQUALS)

    def _tag_keys(self, tags: Sequence[str]) -> list[str]:
        return [f"{self.prefix}:t:{t}" for t in tags]

    async def read(self, key: str, tags: Sequence[str]) -> tuple[bytes | None, list[int]]:
        async def go() -> tuple[bytes | None, list[int]]:
            # One round trip: the entry and its tags' current versions together.
            keys = [f"{self.prefix}:c:{key}", *self._tag_keys(tags)]
            values: list[Any] = await self.client.mget(keys)
            return values[0], [int(v) if v is not None else 0 for v in values[1:]]

        return await self._call(go)

    async def tag_versions(self, tags: Sequence[str]) -> list[int]:
        if not tags:
            return []

        async def go() -> list[int]:
            values: list[Any] = await self.client.mget(self._tag_keys(tags))
            return [int(v) if v is not None else 0 for v in values]

        return await self._call(go)

    async def write(self, key: str, raw: bytes, ttl_ms: int) -> None:
        async def go() -> None:
            await self.client.set(f"{self.prefix}:c:{key}", raw, px=max(1, ttl_ms))

        await self._call(go)

    async def bump(self, tags: Sequence[str]) -> list[int]:
        async def go() -> list[int]:
            async with self.client.pipeline(transaction=True) as pipe:
                for k in self._tag_keys(tags):
                    pipe.incr(k)
                return [int(v) for v in await pipe.execute()]

        return await self._call(go)

    async def acquire(self, name: str, token: str, ttl_ms: int) -> bool:
        async def go() -> bool:
            ok = await self.client.set(f"{self.prefix}:l:{name}", token, nx=True, px=ttl_ms)
            return bool(ok)

        return await self._call(go)

    async def release(self, name: str, token: str) -> None:
        async def go() -> None:
            await self._release(keys=[f"{self.prefix}:l:{name}"], args=[token])

        await self._call(go)

    async def extend(self, name: str, token: str, ttl_ms: int) -> bool:
        async def go() -> bool:
            done = await self._extend(keys=[f"{self.prefix}:l:{name}"], args=[token, ttl_ms])
            return bool(done)

        return await self._call(go)


class RedisBucketStore(_RedisBase):
    """``BucketStore`` on Redis: one Lua script per take, exact across replicas."""

    def __init__(self, client: aioredis.Redis, health: RedisHealth, prefix: str = "bridge") -> None:
        super().__init__(client, health, prefix)
        self._script = client.register_script(_TOKEN_BUCKET)

    async def take(self, key: str, limit: Limit, cost: int = 1) -> Decision:
        async def go() -> Decision:
            reply = await self._script(
                keys=[f"{self.prefix}:rl:{key}"], args=[limit.capacity, limit.rate, cost]
            )
            return _decision(reply, limit)

        return await self._call(go)


def _decision(reply: list[Any], limit: Limit) -> Decision:
    allowed, tokens, full_ms, retry_ms = reply[:4]
    return Decision(
        allowed=bool(allowed),
        limit=limit.capacity,
        remaining=max(0, int(float(tokens))),
        reset_s=-(-int(full_ms) // 1000),
        retry_after_s=-(-int(retry_ms) // 1000) if not allowed else 0,
    )


class RedisAnswerStore(_RedisBase):
    """``AnswerStore`` on Redis: the bucket of ``RedisBucketStore`` and the answer, one script.

    The scripts of the requests that reach it while a batch is being sent go to Redis together
    (each script still atomic on its own, so the limit stays exact), on connections this store
    holds from the client's pool (``LANES`` of them, a batch in flight on each; see
    ``redisconn.HeldConnection``): redis-py's pipeline object spent ~300 us of CPU around a lone
    script call against ~110 us for the same command on a held connection, and that was most of
    what a kept answer cost. A lone request waits for nothing: its batch is sent at once.
    """

    LANES = 2

    def __init__(self, client: aioredis.Redis, health: RedisHealth, prefix: str = "bridge") -> None:
        super().__init__(client, health, prefix)
        self._script = client.register_script(_ADMIT_AND_READ)
        self._pending: list[tuple[list[Any], asyncio.Future[list[Any]]]] = []
        self._flushing: asyncio.Handle | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._idle = [redisconn.HeldConnection(client) for _ in range(self.LANES)]

    async def admit_and_read(
        self, bucket: str, limit: Limit, cost: int, key: str
    ) -> tuple[Decision, bytes | None]:
        args = [
            f"{self.prefix}:rl:{bucket}", f"{self.prefix}:a:{key}",
            limit.capacity, limit.rate, cost,
        ]  # fmt: skip

        async def go() -> tuple[Decision, bytes | None]:
            loop = asyncio.get_running_loop()
            done: asyncio.Future[list[Any]] = loop.create_future()
            self._pending.append((args, done))
            if self._flushing is None and self._idle:
                self._flushing = loop.call_soon(self._flush)
            reply = await done
            return _decision(reply, limit), reply[4]

        return await self._call(go)

    def _flush(self) -> None:
        self._flushing = None
        if not self._pending or not self._idle:
            return  # every lane busy: the first one back sends what waits, as one batch
        batch, self._pending = self._pending, []
        lane = self._idle.pop()
        task = asyncio.ensure_future(self._send(lane, batch))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _send(
        self,
        lane: redisconn.HeldConnection,
        batch: list[tuple[list[Any], asyncio.Future[list[Any]]]],
    ) -> None:
        try:
            replies = await self._run(lane, batch)
            if any(isinstance(r, NoScriptError) for r in replies):
                # A Redis that restarted (or failed over) lost its script cache: load, resend.
                await self.client.script_load(_ADMIT_AND_READ)
                replies = await self._run(lane, batch)
        except BaseException as exc:  # every waiter gets the failure, none is left hanging
            redisconn.fail_waiters([done for _, done in batch], exc)
            if not isinstance(exc, Exception):
                raise
            return
        finally:
            self._idle.append(lane)
            if self._pending and self._flushing is None:
                self._flushing = asyncio.get_running_loop().call_soon(self._flush)
        # A waiter whose client went away is skipped.
        redisconn.settle_waiters([done for _, done in batch], replies)

    async def _run(
        self,
        lane: redisconn.HeldConnection,
        batch: list[tuple[list[Any], asyncio.Future[list[Any]]]],
    ) -> list[Any]:
        """The batch's replies in order (a script's error reply as its exception)."""
        sha = self._script.sha
        return await lane.execute([("EVALSHA", sha, 2, *args) for args, _ in batch])

    async def write_answer(
        self, key: str, raw: bytes, tags: Sequence[str], versions: Sequence[int], ttl_ms: int
    ) -> None:
        name = f"{self.prefix}:a:{key}"
        fields: list[bytes | str] = [
            "b", raw,
            "t", "\n".join(f"{self.prefix}:t:{t}" for t in tags),
            "v", ",".join(str(v) for v in versions),
        ]  # fmt: skip

        async def go() -> None:
            async with self.client.pipeline(transaction=True) as pipe:
                pipe.delete(name)  # a previous answer's fields must not outlive it
                pipe.hset(name, items=fields)
                pipe.pexpire(name, max(1, ttl_ms))
                await pipe.execute()

        await self._call(go)
