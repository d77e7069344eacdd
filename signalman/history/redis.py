"""Redis Streams history shared by every replica: one stream per tenant, fenced idempotent appends.

Keys (``p`` = key prefix): ``p:t:{tenant}:h`` the stream (IDs ``<offset>-0``, each entry with the
epoch it was appended in), ``p:t:{tenant}:seq`` the last offset, ``p:t:{tenant}:epoch``;
``p:part:{topic}:{partition}`` a hash with the highest ``fence`` and the appended ``wm``
(watermark) of a Kafka partition; ``p:tenants`` a set.

The append is one Lua script, so check-fence, check-watermark, allocate offsets and XADD happen
atomically: a stale owner (lower fence) is rejected and a replay after a rebalance is skipped.

Behind Sentinel each append is followed, on the same connection, by ``WAIT <replicas> <timeout>``
(``WAIT`` does not block inside a script): the processor, and so the Kafka commit, goes on only
once a replica holds the entries, or once the wait timed out. A timed-out wait is counted
(``Replication``) and the history reports itself degraded; it never stalls delivery: the tails
read the entries from the primary at once, and while replicas lag, appends wait at most 1 ms
until one acknowledges again. See docs/rfcs/signalman-scaling.md, "History across a Redis
failover".
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
import structlog
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.typing import StreamRangeResponse

from pkg.common import redisconn
from pkg.common.metrics import Metrics, Sample
from pkg.events.sink import Event
from signalman import wire
from signalman.history import (
    TAIL_COUNT,
    AppendResult,
    Entry,
    Expected,
    Fences,
    HistoryInfo,
    SourcePos,
    fence_of,
    load_event,
)

log = structlog.get_logger("signalman.history.redis")

# Appends a whole fetched batch in one call (one round trip, one command to encode): KEYS are the
# tenants set, then each source partition's hash, then (stream, seq, epoch) of each tenant. ARGV:
# a new-epoch candidate, maxlen, the records as one JSON array of [partition key index, index of
# the tenant's stream key, source offset, source, tenant, [channel, body index, ...], fence,
# traceparent ("" for none: the field is then left out), the offset the caller last appended
# of the partition (-1: unknown; a lower stored watermark answers 'behind', History.append_many)],
# then the events' bodies (binary: they cannot travel inside the JSON), each ARGV[body index].
# Each record is checked on its own, in order (its partition's fence, then watermark), exactly as
# if appended alone.
# A tenant's epoch belongs to the primary it was created on (``<epoch key>:rid`` holds that
# primary's ``master_replid``). A different replid means Redis failed over (or restarted) since:
# the promoted replica may lack entries, and its offsets may continue below ones subscribers saw,
# so the epoch changes and resuming subscribers get an explicit gap instead of reused offsets.
_TENANT_EPOCH = """
local replid_now = nil
local function tenant_epoch(ekey, rkey, candidate)
  if not replid_now then
    replid_now = string.match(redis.call('INFO', 'replication'), 'master_replid:(%x+)') or ''
  end
  local epoch = redis.call('GET', ekey)
  local rid = redis.call('GET', rkey)
  if not epoch or (rid and rid ~= replid_now) then
    epoch = candidate
    redis.call('SET', ekey, epoch)
  end
  if rid ~= replid_now then redis.call('SET', rkey, replid_now) end
  return epoch
end
"""

_APPEND = (
    _TENANT_EPOCH
    + """
local maxlen = tonumber(ARGV[2])
local records = cjson.decode(ARGV[3])
local fences, wms, epochs, seen, behind = {}, {}, {}, {}, {}
local out = {}
for r = 1, #records do
  local rec = records[r]
  local pk, tk = KEYS[rec[1]], rec[2]
  local fence = tonumber(rec[7])
  if not fences[pk] then
    local cur = tonumber(redis.call('HGET', pk, 'fence') or '0')
    if fence > cur then
      redis.call('HSET', pk, 'fence', fence)
      cur = fence
    end
    fences[pk] = cur
    wms[pk] = tonumber(redis.call('HGET', pk, 'wm') or '-1')
    local want = tonumber(rec[9])
    behind[pk] = wms[pk] >= 0 and wms[pk] < want
  end
  local koff = tonumber(rec[3])
  if fence < fences[pk] then
    out[r] = {'fenced', tostring(fences[pk])}
  elseif behind[pk] then
    out[r] = {'behind', tostring(wms[pk])}
  elseif koff <= wms[pk] then
    out[r] = {'duplicate', tostring(fence)}
  else
    wms[pk] = koff
    redis.call('HSET', pk, 'wm', rec[3])
    local hkey, skey, ekey, rkey = KEYS[tk], KEYS[tk + 1], KEYS[tk + 2], KEYS[tk + 3]
    local epoch = epochs[ekey]
    if not epoch then
      epoch = tenant_epoch(ekey, rkey, ARGV[1] .. rec[2])
      epochs[ekey] = epoch
    end
    if not seen[ekey] then
      redis.call('SADD', KEYS[1], rec[5])
      seen[ekey] = true
    end
    local items = rec[6]
    local n = #items / 2
    local last = redis.call('INCRBY', skey, n)
    local first = last - n + 1
    local tp = rec[8]
    for i = 0, n - 1 do
      if tp and tp ~= '' then
        redis.call('XADD', hkey, 'MAXLEN', '~', maxlen, tostring(first + i) .. '-0',
                   'c', items[1 + 2 * i], 'b', ARGV[items[2 + 2 * i]], 's', rec[4], 'p', epoch,
                   't', tp)
      else
        redis.call('XADD', hkey, 'MAXLEN', '~', maxlen, tostring(first + i) .. '-0',
                   'c', items[1 + 2 * i], 'b', ARGV[items[2 + 2 * i]], 's', rec[4], 'p', epoch)
      end
    end
    out[r] = {'appended', tostring(first), tostring(n), epoch}
  end
end
return out
"""
)

# Where a tenant's history stands, rotating its epoch first if Redis changed primary since it
# was created (see _TENANT_EPOCH; a tenant without an epoch keeps none: nothing to rotate).
# KEYS: stream, seq, epoch, epoch:rid; ARGV: a new-epoch candidate.
_INFO = """
local epoch = redis.call('GET', KEYS[3])
if epoch then
  local rid = redis.call('GET', KEYS[4])
  local now = string.match(redis.call('INFO', 'replication'), 'master_replid:(%x+)') or ''
  if rid and rid ~= now then
    epoch = ARGV[1]
    redis.call('SET', KEYS[3], epoch)
    redis.call('SET', KEYS[4], now)
  end
end
local first = redis.call('XRANGE', KEYS[1], '-', '+', 'COUNT', 1)
local first_id = ''
if first[1] then first_id = first[1][1] end
return {epoch or '', redis.call('GET', KEYS[2]) or '0', first_id}
"""

_CLAIM = """
local cur = tonumber(redis.call('HGET', KEYS[1], 'fence') or '0')
if tonumber(ARGV[1]) > cur then
  redis.call('HSET', KEYS[1], 'fence', ARGV[1])
  return tonumber(ARGV[1])
end
return cur
"""


# Connections of the shared pool (the tail has its own), and how long a command waits for one.
POOL_CONNECTIONS = 64
POOL_WAIT_S = 30.0

# After an append, how long ``WAIT`` may block for a replica's acknowledgement (normally one
# loopback or LAN round trip). While replicas lag (an append was not acknowledged in time),
# appends wait ``LAGGING_WAIT_MS`` (0 would mean "forever" to Redis) except one full wait per
# ``PROBE_EVERY_S``, which notices the replicas are back. The history reports itself lagging
# until an append is acknowledged again.
WAIT_TIMEOUT_MS = 100
OP_TIMEOUT_S = 5.0  # how long an append may wait for its reply (normally milliseconds)
LAGGING_WAIT_MS = 1
PROBE_EVERY_S = 1.0


@dataclass
class Replication:
    """How the appends' ``WAIT`` went: appends (script calls) acknowledged by enough replicas,
    and those that were not (``unreplicated``: their events, if the primary died before its
    replicas caught up, are lost from the history and resuming subscribers get an explicit gap,
    the epoch having changed with the primary)."""

    wanted: int = 0
    acknowledged: int = 0
    unreplicated: int = 0
    unreplicated_events: int = 0
    lagging: bool = False  # the last append was not acknowledged in time
    next_probe_at: float = 0.0  # (monotonic) when a lagging history next waits in full

    def wait_ms(self, full_ms: int) -> int:
        """How long the next append's ``WAIT`` may block."""
        if not self.lagging:
            return full_ms
        now = time.monotonic()
        if now < self.next_probe_at:
            return LAGGING_WAIT_MS
        self.next_probe_at = now + PROBE_EVERY_S
        return full_ms

    def as_dict(self) -> dict[str, Any]:
        return {
            "wait_replicas": self.wanted,
            "acknowledged_appends": self.acknowledged,
            "unreplicated_appends": self.unreplicated,
            "unreplicated_events": self.unreplicated_events,
            "status": "lagging" if self.lagging else "ok",
        }


_encode_payload = json.JSONEncoder(separators=(",", ":"), check_circular=False).encode
_FIRST_BODY = 4  # ARGV index of the first body: after the epoch, maxlen and the records


def register(registry: Metrics, history: RedisHistory) -> None:
    """Report the appends' replication on /metrics (read at scrape time; held weakly)."""
    for name, attr, text in (
        ("signalman_history_replicated_appends_total", "acknowledged",
         "history appends a replica acknowledged (WAIT) in time"),
        ("signalman_history_unreplicated_appends_total", "unreplicated",
         "history appends no replica acknowledged in time (lost if the primary dies first)"),
        ("signalman_history_unreplicated_events_total", "unreplicated_events",
         "events in history appends no replica acknowledged in time"),
    ):  # fmt: skip
        registry.counter(name, text, _replication(attr), (), history)


def _replication(attr: str) -> Callable[[RedisHistory], Iterable[Sample]]:
    def read(h: RedisHistory) -> Iterable[Sample]:
        return [({}, getattr(h.replication, attr))]

    return read


class RedisHistory:
    """``History`` on Redis Streams. Blocking reads use their own pooled connections."""

    def __init__(
        self,
        url: str,
        *,
        prefix: str = "sm",
        max_len: int = 10_000,
        client: aioredis.Redis | None = None,
        wait_replicas: int | None = None,
        wait_timeout_ms: int = WAIT_TIMEOUT_MS,
        op_timeout_s: float = OP_TIMEOUT_S,
    ) -> None:
        self.prefix = prefix
        self.max_len = max_len
        # ``url``: a plain Redis URL or a ``redis+sentinel://`` spec (pkg.common.redisconn).
        # The pool blocks: a burst of subscribers (a failover moving a replica's subscribers
        # here) waits for a connection; redis-py's default pool raises once 100 are in use.
        self._redis: aioredis.Redis = client or redisconn.connect(
            url,
            name="signalman-history",
            max_connections=POOL_CONNECTIONS,
            blocking_timeout=POOL_WAIT_S,
            decode_responses=False,
            health_check_interval=10,
            socket_timeout=None,
            hiredis_packing=True,  # an append carries dozens of arguments: packed in C
        )
        # ``wait_replicas``: replicas that must acknowledge each append (``WAIT``); by default 1
        # behind Sentinel (a primary with replicas), 0 (no WAIT) for a plain Redis URL.
        if wait_replicas is None:
            wait_replicas = 1 if redisconn.is_sentinel(self._redis) else 0
        if wait_replicas < 0 or wait_timeout_ms < 1:
            raise ValueError("wait_replicas must be >= 0 and wait_timeout_ms >= 1")
        self.replication = Replication(wanted=wait_replicas)
        self._wait_timeout_ms = wait_timeout_ms
        self._op_timeout_s = op_timeout_s
        self._append = self._redis.register_script(_APPEND)
        # Used only if the tenant has no epoch yet (new or lost history); unique per call without
        # paying for os.urandom on every append.
        self._epoch_prefix = uuid.uuid4().hex[:6]
        self._claim = self._redis.register_script(_CLAIM)
        self._info_script = self._redis.register_script(_INFO)
        # Appends go straight through a connection held from the pool (one batch per fetch, in
        # order): redis-py's script call cost ~200 us of CPU around each, ~110 us here.
        self._writer = redisconn.HeldConnection(self._redis)
        self._checker = redisconn.HeldConnection(self._redis)  # the tail's epoch checks
        self._tail_conn: Any = None  # wait_many's own connection (made on first use)
        self._tail_lock = asyncio.Lock()

    def _k(self, tenant: str, suffix: str) -> str:
        return f"{self.prefix}:t:{{{tenant}}}:{suffix}"

    def _append_call(
        self,
        records: list[tuple[str, list[tuple[str, Event]], SourcePos]],
        fence: Fences,
        expect: Expected | None = None,
    ) -> tuple[list[str], list[Any]]:
        keys = [f"{self.prefix}:tenants"]
        part_index: dict[tuple[str, int], int] = {}
        for _, _, source in records:
            part = (source.topic, source.partition)
            if part not in part_index:
                part_index[part] = len(keys) + 1  # Lua's KEYS are 1-based
                keys.append(f"{self.prefix}:part:{source.topic}:{source.partition}")
        tenant_index: dict[str, int] = {}
        payload = []
        bodies: list[bytes] = []
        for tenant, items, source in records:
            ti = tenant_index.get(tenant)
            if ti is None:
                ti = tenant_index[tenant] = len(keys) + 1
                keys += [
                    self._k(tenant, "h"),
                    self._k(tenant, "seq"),
                    self._k(tenant, "epoch"),
                    self._k(tenant, "epoch:rid"),
                ]
            flat: list[str | int] = []
            for channel, event in items:
                bodies.append(wire.encode_body(event))
                flat += [channel, _FIRST_BODY + len(bodies) - 1]  # its ARGV index (1-based)
            where = f"{source.topic}/{source.partition}/{source.offset}"
            pi = part_index[(source.topic, source.partition)]
            tp = items[0][1].trace if items else ""  # one record's events share its context
            want = expect.get((source.topic, source.partition), -1) if expect else -1
            payload.append([pi, ti, str(source.offset), where, tenant, flat,
                            fence_of(fence, source), tp, want])  # fmt: skip
        args: list[Any] = [
            f"{self._epoch_prefix}{time.time_ns() & 0xFFFFFFFFFFF:011x}",
            self.max_len,
            _encode_payload(payload),
            *bodies,
        ]
        return keys, args

    @staticmethod
    def _result(raw: Any, fence: int) -> AppendResult:
        status = _s(raw[0])
        if status == "fenced":
            return AppendResult("fenced", current_fence=int(raw[1]))
        if status == "duplicate":
            return AppendResult("duplicate", current_fence=int(raw[1]))
        if status == "behind":
            return AppendResult("behind", current_fence=fence, watermark=int(raw[1]))
        first, n = int(raw[1]), int(raw[2])
        return AppendResult("appended", tuple(range(first, first + n)), _s(raw[3]), fence)

    async def append(
        self, tenant: str, items: list[tuple[str, Event]], source: SourcePos, fence: int
    ) -> AppendResult:
        (result,) = await self.append_many([(tenant, items, source)], fence)
        return result

    async def append_many(
        self,
        records: list[tuple[str, list[tuple[str, Event]], SourcePos]],
        fence: Fences,
        expect: Expected | None = None,
    ) -> list[AppendResult]:
        # One EVALSHA for the whole fetched batch: a pipeline of one script call per record cost
        # ~60 us of client CPU per record to encode, plus a SCRIPT EXISTS round trip per batch.
        if not records:
            return []
        keys, args = self._append_call(records, fence, expect)
        replicated = True
        try:
            # Bounded: an append waiting on a frozen primary (SIGSTOP, a black-holed network)
            # fails instead of holding the partition until +switch-master, if that ever comes;
            # the cancelled command's connection is dropped, the next one asks the Sentinels,
            # and the consumer appends the batch again (the watermark skips what landed).
            async with asyncio.timeout(self._op_timeout_s):
                if self.replication.wanted:
                    raws, replicated = await self._append_replicated(keys, args)
                else:
                    raws = (await self._append_call_direct(keys, args))[0]
        except TimeoutError as exc:
            raise RedisTimeoutError(
                f"history append got no reply within {self._op_timeout_s:g} s"
            ) from exc
        results = [self._result(raw, fence_of(fence, src))
                   for raw, (_, _, src) in zip(raws, records, strict=True)]  # fmt: skip
        if not replicated:
            self.replication.unreplicated_events += sum(len(r.offsets) for r in results)
        return results

    async def _append_call_direct(
        self, keys: list[str], args: list[Any], *after: tuple[Any, ...]
    ) -> list[Any]:
        """The append script (and ``after``, e.g. ``WAIT``, on the same connection) through the
        writer's held connection; the script's reply raised when it is an error."""
        for attempt in (1, 2):
            call = ("EVALSHA", self._append.sha, len(keys), *keys, *args)
            replies = await self._writer.execute([call, *after])
            if isinstance(replies[0], NoScriptError) and attempt == 1:
                # A promoted replica or a restarted server has an empty script cache.
                self._append.sha = _s(await self._redis.script_load(_APPEND))
                continue
            break
        if isinstance(replies[0], Exception):
            raise replies[0]
        return replies

    async def _append_replicated(self, keys: list[str], args: list[Any]) -> tuple[Any, bool]:
        """The append script, then ``WAIT`` on the same connection (one write: one round trip
        plus the replica's acknowledgement); whether enough replicas acknowledged."""
        rep = self.replication
        timeout = rep.wait_ms(self._wait_timeout_ms)
        raws, acked = await self._append_call_direct(keys, args, ("WAIT", rep.wanted, timeout))
        if isinstance(acked, int) and acked >= rep.wanted:
            rep.acknowledged += 1
            rep.lagging = False
            return raws, True
        rep.unreplicated += 1
        if not rep.lagging:
            rep.lagging = True
            rep.next_probe_at = time.monotonic() + PROBE_EVERY_S
            log.warning("history_replicas_lagging", wanted=rep.wanted, acknowledged=acked)
        return raws, False

    async def claim(self, topic: str, partition: int, fence: int) -> int:
        raw = await self._claim(keys=[f"{self.prefix}:part:{topic}:{partition}"], args=[fence])
        return int(raw)

    async def check_fence(self, resource: str, fence: int) -> bool:
        """``pkg.coord.protocols.FenceCheck``: whether appends for ``resource``
        (``topic/partition``) carrying ``fence`` pass the fence check now."""
        topic, _, partition = resource.rpartition("/")
        stored = await self._redis.hget(f"{self.prefix}:part:{topic}:{partition}", "fence")
        return stored is None or int(stored) <= fence

    async def sources(self, tenant: str) -> list[str]:
        """The source position of every retained entry, in order (audits and tests)."""
        rows = _rows(await self._redis.xrange(self._k(tenant, "h")))
        return [_s(fields[b"s"]) for _, fields in rows]

    async def info(self, tenant: str) -> HistoryInfo:
        try:
            epoch, seq, first = await self._info(tenant)
        except RedisConnectionError:
            # After a Redis restart or failover the first call on a pooled connection to the old
            # server fails; the read is safe to repeat.
            epoch, seq, first = await self._info(tenant)
        first_offset = _offset(first) if first else 0
        return HistoryInfo(_s(epoch) if epoch else "", first_offset, int(seq or 0))

    async def info_many(self, tenants: Sequence[str]) -> list[HistoryInfo]:
        # One write of a script call per tenant on the checker's held connection: one call each
        # through redis-py was ~28% of the tail task's CPU in the fan-out benchmark.
        if not tenants:
            return []
        for attempt in (1, 2):
            candidate = f"{self._epoch_prefix}{time.time_ns() & 0xFFFFFFFFFFF:011x}i"
            calls = [
                ("EVALSHA", self._info_script.sha, 4,
                 *(self._k(t, s) for s in ("h", "seq", "epoch", "epoch:rid")), candidate)
                for t in tenants
            ]  # fmt: skip
            replies = await self._checker.execute(calls)
            if attempt == 1 and any(isinstance(r, NoScriptError) for r in replies):
                # A restarted or promoted server has an empty script cache.
                self._info_script.sha = _s(await self._redis.script_load(_INFO))
                continue
            break
        out = []
        for reply in replies:
            if isinstance(reply, Exception):
                raise reply
            epoch, seq, first = reply
            first_offset = _offset(first) if first else 0
            out.append(HistoryInfo(_s(epoch) if epoch else "", first_offset, int(seq or 0)))
        return out

    async def _info(self, tenant: str) -> list[Any]:
        keys = [self._k(tenant, s) for s in ("h", "seq", "epoch", "epoch:rid")]
        candidate = f"{self._epoch_prefix}{time.time_ns() & 0xFFFFFFFFFFF:011x}i"
        return list(await self._info_script(keys=keys, args=[candidate]))

    def _entries(self, rows: StreamRangeResponse | None) -> list[Entry]:
        # The hot path of every replica's tail: no parsing beyond the stream entry itself.
        out = []
        for entry_id, fields in rows or ():
            if entry_id is None or fields is None:
                continue  # a deleted entry: only XCLAIM returns those, never XRANGE or XREAD
            body = fields.get(b"b")
            if not isinstance(body, bytes):  # (the client never decodes: always bytes or None)
                body = _legacy_body(fields)
            out.append(Entry(_offset(entry_id), _s(fields[b"c"]), body, _s(fields.get(b"p", b"")),
                             _s(fields.get(b"t", b""))))  # fmt: skip
        return out

    async def read_after(self, tenant: str, after: int, limit: int) -> list[Entry]:
        rows = await self._redis.xrange(
            self._k(tenant, "h"), min=f"({after}-0" if after else "-", count=limit
        )
        return self._entries(rows)

    async def wait_many(self, after: Mapping[str, int], wait_s: float) -> dict[str, list[Entry]]:
        # One XREAD BLOCK over every tenant's stream: a replica's tail costs one round trip per
        # wake-up whatever the number of tenants it serves (one per tenant cost a command, a
        # task wake-up and a Redis wake-up each, for every append). It runs on a connection of
        # its own, straight through redis-py's connection (no pool, retry or reply-callback
        # layers: a third of the tail's client CPU): the tail retries with its own backoff, and
        # the connection reconnects on the next read after an error or a cancelled read.
        if not after:
            return {}
        streams = [self._k(t, "h") for t in after]
        tenants = dict(zip((k.encode() for k in streams), after, strict=True))
        async with self._tail_lock:
            conn = self._tail_conn
            if conn is None:
                pool: Any = self._redis.connection_pool  # (redis-py leaves it untyped)
                conn = self._tail_conn = pool.make_connection()
            await conn.send_command(
                "XREAD", "COUNT", TAIL_COUNT, "BLOCK", max(1, int(wait_s * 1000)), "STREAMS",
                *streams, *(f"{pos}-0" for pos in after.values()),
            )  # fmt: skip
            reply = await conn.read_response()
        # RESP3 (redis-py's default) answers {stream: [[id, [field, value, ...]], ...]}, RESP2
        # [[stream, [...]], ...]; nothing (a timeout) is nil in both.
        streams_rows = reply.items() if isinstance(reply, dict) else reply or ()
        out: dict[str, list[Entry]] = {}
        for stream, rows in streams_rows:
            tenant = tenants.get(stream)
            if tenant is not None and rows:
                out[tenant] = self._entries([(i, _pairs(f)) for i, f in rows])
        return out

    async def trim(self, tenant: str, max_len: int, min_time: float) -> int:
        key = self._k(tenant, "h")
        # The length trim and a look at the oldest entry in one round trip: in the usual run
        # (every 5 s, every tenant) nothing is old enough and that is all. Reading 100 entries
        # and a no-op MINID trim per tenant was ~4% of a replica's CPU with 200 tenants.
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.xtrim(key, maxlen=max_len, approximate=False)
            pipe.xrange(key, count=1)
            trimmed, oldest = await pipe.execute()
        dropped = int(trimmed)
        oldest_rows = _rows(oldest)
        if not oldest_rows or _entry_time(oldest_rows[0][1]) >= min_time:
            return dropped
        # Age trimming cuts a prefix only (MINID), so history never gets holes in the middle.
        while True:
            rows = _rows(await self._redis.xrange(key, count=100))
            young = next((r for r in rows if _entry_time(r[1]) >= min_time), None)
            if young is not None:
                cut = _offset(young[0])
            elif rows:
                cut = _offset(rows[-1][0]) + 1
            else:
                break
            dropped += int(await self._redis.xtrim(key, minid=f"{cut}-0", approximate=False))
            if young is not None:
                break
        return dropped

    async def tenants(self) -> list[str]:
        return sorted(_s(t) for t in await self._redis.smembers(f"{self.prefix}:tenants"))

    async def watermark(self, topic: str, partition: int) -> int:
        raw = await self._redis.hget(f"{self.prefix}:part:{topic}:{partition}", "wm")
        return int(raw) if raw is not None else -1

    async def ping(self) -> bool:
        return bool(await self._redis.ping())

    async def close(self) -> None:
        if self._tail_conn is not None:
            await self._tail_conn.disconnect()
        await self._redis.aclose()


# A stream entry as XRANGE returns it: its ID and its fields.
_Row = tuple[bytes | str, dict[bytes | str, bytes | str]]


def _rows(raw: StreamRangeResponse | None) -> list[_Row]:
    """The entries of an XRANGE reply (redis-py types a deleted entry's ID and fields as
    possibly None: only XCLAIM returns such an entry, so none is dropped here in practice)."""
    return [(i, f) for i, f in raw or () if i is not None and f is not None]


def _pairs(flat: list[Any]) -> dict[Any, Any]:
    """A stream entry's flat [field, value, ...] list as a dict."""
    return dict(zip(flat[::2], flat[1::2], strict=True))


def _legacy_body(fields: dict[Any, Any]) -> bytes:
    """The body of an entry an older version stored as JSON (event ``e`` and data ``d``)."""
    return wire.encode_body(load_event(fields[b"e"], json.loads(fields[b"d"])))


def _entry_time(fields: dict[Any, Any]) -> float:
    body = fields.get(b"b")
    return wire.body_time(body) if body is not None else float(load_event(fields[b"e"]).time)


def _s(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _offset(entry_id: Any) -> int:
    raw = entry_id if isinstance(entry_id, bytes) else str(entry_id).encode()
    return int(raw[: raw.index(b"-")])
