"""The sync loop: apply other replicas' changes from their changelogs; re-converge after a gap.

Every replica appends to a changelog stream of its own (``foghorn:{c}:log:<replica>``) and
registers it in the cluster's registry (``foghorn:{c}:logs``, replica -> last heartbeat); it
reads only the *other* replicas' streams, so it never receives its own writes. Normal operation
is one blocking ``XREAD`` over those streams (each with its own cursor and gap check) plus a
small wake-up stream (``foghorn:{c}:logs:new``) where a replica new to the registry announces
itself before its first write, so readers start reading its stream from its first entry.

A gap (a stream trimmed past its cursor, a stream lost, the connection lost) or a failed write
triggers tail-first rehydration:

1. register our own stream (heartbeat), then take the wake-up stream's tail, the registry, and
   the tail position of every other replica's stream (before anything else);
2. scan every node hash and merge each record that is newer than the local copy;
3. drop local records Redis no longer has (deleted while we were not reading), unless they
   are our own unpublished writes or Redis itself lost its data (new ``run_id``);
4. re-publish writes accepted while degraded (and, after a data loss, every record this
   replica owns), then resume reading *from the tails of step 1*: whatever was written during
   the scan is replayed, and watermarks make the replay idempotent.

Redis errors mark the store degraded and back off; the loop never exits on its own. Streams of
replicas silent for ``record_ttl_s`` expire (heartbeats extend them) and leave the registry.
"""

from __future__ import annotations

import asyncio
import time
from typing import Protocol

import redis.asyncio as aioredis
import structlog
from opentelemetry import metrics

from api_balancing.latency import LatencyWindow
from api_balancing.model import NodeRecord
from api_balancing.store import redis_codec
from api_balancing.store.health import REDIS_ERRORS, SyncHealth
from api_balancing.store.keys import Keys
from pkg.clients.backoff import Backoff
from pkg.common.clock import SYSTEM_CLOCK, Clock
from pkg.coord import ChangelogSet, Entry, GapDetected
from pkg.coord.changelog import seq_key

log = structlog.get_logger("foghorn.ha.sync")

SCAN_BATCH = 500
HEARTBEAT_S = 5.0  # registry heartbeat (the stream's TTL is record_ttl_s, so plenty of margin)
SYNC_LAG_BOUNDS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip
# Exported with the HA runtime's figures (``ha.telemetry``) on /metrics.
sync_lag = metrics.get_meter("foghorn.ha").create_histogram(
    "foghorn_ha_sync_lag_seconds",
    unit="s",
    description="Time from a change's append on another replica to its apply here",
    # In seconds: the SDK's default bounds (0, 5, 10, 25 ... 10000) are meant for milliseconds,
    # which put every normal lag (a few ms) in the first bucket and made its p99 read 4.95 s.
    explicit_bucket_boundaries_advisory=SYNC_LAG_BOUNDS,
)
WATCH_MAXLEN = 100  # wake-ups only: readers re-read the whole registry on any of them
MIN_RETRY_S = 0.05  # even with instant backoff (pkg.clients testing switch): never spin


class SyncSettings(Protocol):
    @property
    def replica_id(self) -> str: ...
    @property
    def record_ttl_s(self) -> float: ...
    @property
    def read_block_ms(self) -> int: ...


class SyncCounters(Protocol):
    remote_malformed: int


class SyncedStore(Protocol):
    """What the loop needs of the store it keeps converged (``RedisNodeStore``): its Redis
    clients and keys, and the local-state operations of rehydration and replay."""

    @property
    def settings(self) -> SyncSettings: ...
    @property
    def keys(self) -> Keys: ...
    @property
    def log_key(self) -> str: ...
    @property
    def redis(self) -> aioredis.Redis: ...
    @property
    def redis_reader(self) -> aioredis.Redis: ...
    @property
    def health(self) -> SyncHealth: ...
    @property
    def counters(self) -> SyncCounters: ...
    def apply_entry(self, entry: Entry) -> None: ...
    def apply_remote(self, remote: NodeRecord) -> bool: ...
    def local_ids(self) -> set[str]: ...
    def is_dirty(self, node_id: str) -> bool: ...
    def forget_unconfirmed(self, node_id: str) -> None: ...
    def mark_owned_dirty(self) -> None: ...
    def mark_synced(self) -> None: ...
    async def republish(self) -> int: ...
    async def run_data_loss_hooks(self) -> None: ...


class SyncLoop:
    """Keeps one ``RedisNodeStore`` converged with the cluster."""

    def __init__(self, store: SyncedStore, *, clock: Clock = SYSTEM_CLOCK) -> None:
        self._errors = REDIS_ERRORS
        self.store = store
        settings = store.settings
        self.reader = ChangelogSet(store.redis_reader, watch=store.keys.logs_watch)
        self._retention_s = settings.record_ttl_s
        # Several heartbeats per retention, so a live replica's stream never expires between two.
        self._beat_every_s = min(HEARTBEAT_S, settings.record_ttl_s / 3)
        self._beat_at = float("-inf")
        self._clock = clock
        self._backoff = Backoff(base=0.05, cap=2.0, clock=clock)
        self._run_id: str | None = None
        self.rehydrations = 0
        self.last_gap = ""
        # Recent lags (ms) for /health; the histogram metric keeps the full distribution.
        self.lag_ms = LatencyWindow(1000)
        self.last_rehydrate_s = 0.0
        self.stopping = False

    async def run(self, resume: bool = False) -> None:
        """Loop forever; ``resume`` continues from the current cursor instead of rehydrating."""
        pending: str | None = None if resume else "startup"
        self.stopping = False
        while not self.stopping:
            try:
                if pending is not None:
                    await self.rehydrate(pending)
                    pending = None
                    self._backoff.reset()
                entries = await self.reader.read(self.store.settings.read_block_ms, count=1000)
                for entry in entries:
                    self.store.apply_entry(entry)
                if self.reader.watch_fired:  # a replica new to the registry: read its stream
                    self.reader.watch_fired = False
                    for key in await self._other_logs():
                        self.reader.add(key)
                if self._clock.monotonic() - self._beat_at >= self._beat_every_s:
                    await self._heartbeat()
                if entries:
                    appended_ms = int(entries[-1].id.partition("-")[0])
                    lag = max(0.0, self._clock.time() - appended_ms / 1000)
                    sync_lag.record(lag)
                    self.lag_ms.add(lag * 1000)
                if not self.store.health.ok:
                    # Reads work but a write failed: re-converge and re-publish.
                    pending = self.store.health.status.reason
            except GapDetected as gap:
                log.warning("changelog gap: re-converging", reason=gap.reason)
                self.last_gap = gap.reason
                pending = gap.reason
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                # redis-py may turn a cancellation into a connection error: honour the stop.
                task = asyncio.current_task()
                if self.stopping or (task is not None and task.cancelling()):
                    raise asyncio.CancelledError from exc
                if not isinstance(exc, self._errors):
                    log.exception("sync loop error")
                    pending = "unexpected sync error"
                    await self._pause()
                    continue
                self.store.health.degrade(f"redis unreachable: {type(exc).__name__}: {exc}")
                pending = "reconnected after an outage"
                await self._pause()

    async def _pause(self) -> None:
        await self._clock.asleep(max(MIN_RETRY_S, self._backoff.next_delay()))

    async def rehydrate(self, reason: str) -> None:
        """Tail-first rehydration (see the module docstring), then back to healthy."""
        started = time.perf_counter()
        store = self.store
        info = await store.redis.info("server")
        run_id = str(info.get("run_id", ""))
        data_lost = self._run_id is not None and run_id != self._run_id
        self._run_id = run_id
        await self._heartbeat()
        watch = await store.redis.xrevrange(store.keys.logs_watch, "+", "-", count=1)
        watch_tail = str(watch[0][0]) if watch else "0-0"  # a decoding client: text
        tails = await ChangelogSet.tails(store.redis, await self._other_logs())
        seen: set[str] = set()
        applied = 0
        keys = store.keys
        batch: list[str] = []
        async for key in store.redis.scan_iter(match=keys.node_pattern, count=SCAN_BATCH):
            batch.append(key)
            if len(batch) >= SCAN_BATCH:
                applied += await self._merge_batch(batch, seen)
                batch = []
        if batch:
            applied += await self._merge_batch(batch, seen)
        dropped = 0
        for node_id in store.local_ids() - seen:
            if data_lost:
                continue  # the owner re-publishes it; staleness covers a dead owner
            if not store.is_dirty(node_id):
                store.forget_unconfirmed(node_id)
                dropped += 1
        if data_lost:
            store.mark_owned_dirty()
        republished = await store.republish()
        if data_lost:
            await store.run_data_loss_hooks()  # e.g. ownership records restored at once
        self.reader.reset(tails, watch_tail)
        self.rehydrations += 1
        self.last_rehydrate_s = time.perf_counter() - started
        store.health.recover()
        store.mark_synced()
        log.info(
            "rehydrated from Redis",
            reason=reason,
            records=len(seen),
            applied=applied,
            dropped=dropped,
            republished=republished,
            redis_data_lost=data_lost,
            seconds=round(self.last_rehydrate_s, 4),
        )

    async def _heartbeat(self) -> None:
        """Keep our stream in the registry and alive; announce it when the registry did not
        have it (first start, or Redis lost its data) so readers start reading it; prune
        replicas silent for the retention (their streams expired with them)."""
        store, keys = self.store, self.store.keys
        now = self._clock.time()
        ttl_ms = int(self._retention_s * 1000)
        pipe = store.redis.pipeline(transaction=False)
        pipe.zadd(keys.logs, {store.settings.replica_id: now})
        pipe.zremrangebyscore(keys.logs, "-inf", now - self._retention_s)
        pipe.pexpire(store.log_key, ttl_ms)
        pipe.pexpire(seq_key(store.log_key), ttl_ms)
        added = (await pipe.execute())[0]
        if added:
            await store.redis.xadd(
                keys.logs_watch,
                {"replica": store.settings.replica_id},
                maxlen=WATCH_MAXLEN,
                approximate=True,
            )
        self._beat_at = self._clock.monotonic()

    async def _other_logs(self) -> list[str]:
        """The changelog streams of the other replicas in the registry."""
        keys = self.store.keys
        since = self._clock.time() - self._retention_s
        me = self.store.settings.replica_id
        members = await self.store.redis.zrangebyscore(keys.logs, since, "+inf")
        return [keys.log(str(r)) for r in members if r != me]

    async def _merge_batch(self, keys: list[str], seen: set[str]) -> int:
        pipe = self.store.redis.pipeline(transaction=False)
        for key in keys:
            pipe.hget(key, "rec")
        applied = 0
        for key, raw in zip(keys, await pipe.execute(), strict=True):
            if raw is None:
                continue  # deleted between SCAN and HGET
            try:
                record = redis_codec.decode(raw)
            except ValueError:
                self.store.counters.remote_malformed += 1
                log.warning("malformed node record in Redis skipped", key=key)
                continue
            seen.add(record.node_id)
            if self.store.apply_remote(record):
                applied += 1
        return applied
