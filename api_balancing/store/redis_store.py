"""The HA store: local memory for reads, write-through to Redis, a changelog for the others.

Every write is checked against the writer's fence and written by one Lua script that stores
the record in its Redis hash (the rehydration source) and appends it to the cluster's
changelog stream in the same atomic step. ``put`` (identity and lifecycle writes) waits for
that and then updates the local copy and runs listeners; ``stage`` (load reports) updates the
local copy at once and writes behind, per node one write in flight and one staged, newest
wins (``store.staging``); Redis refusing a staged write closes the node's stream (refusal hook).
Other replicas' changes arrive through ``store.sync`` (a changelog reader) and are
applied in order, newer-token-only (``store.merge``). Reads (``get``/``snapshot``) never touch the
network.

When Redis is unreachable the store is *degraded*: writes land in memory only and are kept as
dirty; the sync loop reconnects, re-converges (tail-first rehydration) and re-publishes them.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import redis.asyncio as aioredis
import structlog
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from api_balancing.model import NodeRecord, evolve
from api_balancing.store import merge, redis_codec
from api_balancing.store.base import StaleWriteError, StoreListener
from api_balancing.store.health import REDIS_ERRORS, SyncHealth
from api_balancing.store.keys import Keys
from api_balancing.store.staging import NodeWrites, StagingCounters
from api_balancing.store.sync import SyncLoop
from pkg.common import history, redisconn
from pkg.common.clock import SYSTEM_CLOCK, Clock
from pkg.coord import Announce, Entry, FencedHash, FencedWriteRejected, PutBatch, Watermarks

log = structlog.get_logger("foghorn.store.redis")

OwnedFence = Callable[[str], int | None]
OwnerTouch = Callable[[str], str | None]
TouchOutcome = Callable[[str, bool], None]
RefusalHook = Callable[[str, int], None]
DeleteGuard = Callable[[], tuple[str, str] | None]

__all__ = ["REDIS_ERRORS", "RedisNodeStore", "RedisStoreSettings", "connect"]


@dataclass
class RedisStoreSettings:
    """Knobs of the Redis store (filled from FOGHORN_* config by the HA runtime)."""

    replica_id: str
    cluster: str = "default"
    changelog_maxlen: int = 10_000
    exact_trim: bool = False
    record_ttl_s: float = 3600.0
    op_timeout_s: float = 2.0
    read_block_ms: int = 1000
    linger_s: float = 0.005  # see LINGER_S


@dataclass
class StoreCounters:
    writes: int = 0
    writes_rejected: int = 0
    writes_deferred: int = 0
    remote_applied: int = 0
    remote_stale: int = 0
    remote_malformed: int = 0
    republished: int = 0
    batches: int = 0  # script calls that carried puts (group commit)


MAX_CONNECTIONS = 16
# Batches on the wire at once: while one runs in Redis, the replica prepares the next.
MAX_IN_FLIGHT = 2
# Puts per script call: bigger batches cost less per put, but Redis runs a script alone, so a
# bound keeps every other client's wait short (about 20 us of Redis time per put).
MAX_BATCH = 500
# Passes of re-publication after an outage (writes deferred during one go out in the next).
REPUBLISH_PASSES = 4
# Under sustained traffic, batches leave at most this often (see _schedule_launch): a bound on
# the extra sync lag a write can see under load, none for a lone write. When the event loop's
# turns are short (a quiet machine), batches would otherwise carry ~10 puts, and the script
# call costs the process more than the puts in it (measured: 45 -> 30 us per report).
LINGER_S = 0.005  # the default of RedisStoreSettings.linger_s (FOGHORN_WRITE_LINGER_MS)


def connect(url: str, op_timeout_s: float, extra_timeout_s: float = 0.0) -> aioredis.Redis:
    """A client that fails fast (no hidden retries): our own loops decide when to retry.

    ``url``: a plain Redis URL or a ``redis+sentinel://`` spec (``pkg.common.redisconn``).
    The pool is bounded: hundreds of node streams writing at once would otherwise open a
    connection each (with its handshake); bounded, they queue briefly and share connections
    while writes of one loop turn already travel as one pipeline. Commands are packed by
    hiredis (redis-py's asyncio connection packs them in pure Python).
    """
    return redisconn.connect(
        url,
        name="foghorn",
        max_connections=MAX_CONNECTIONS,
        blocking_timeout=op_timeout_s,
        hiredis_packing=True,
        decode_responses=True,
        socket_timeout=op_timeout_s + extra_timeout_s,
        socket_connect_timeout=op_timeout_s,
        retry=Retry(NoBackoff(), 0),
    )


class RedisNodeStore:
    """``NodeStore`` shared through Redis; see the module docstring."""

    def __init__(
        self,
        redis_url: str,
        settings: RedisStoreSettings,
        *,
        clock: Clock = SYSTEM_CLOCK,
        health: SyncHealth | None = None,
    ) -> None:
        self.settings = settings
        self.keys = Keys(settings.cluster)
        # This replica's own changelog stream: it appends there, and reads only the others'.
        self.log_key = self.keys.log(settings.replica_id)
        self.redis = connect(redis_url, settings.op_timeout_s)
        # The changelog reader blocks up to read_block_ms: it gets its own client and timeout.
        self.redis_reader = connect(
            redis_url, settings.op_timeout_s, extra_timeout_s=settings.read_block_ms / 1000
        )
        self.health = health or SyncHealth(clock)
        self.counters = StoreCounters()
        self._clock = clock
        self._fenced = FencedHash(self.redis)
        self._records: dict[str, NodeRecord] = {}
        self._marks: Watermarks[str] = Watermarks()
        self._max_version: dict[str, int] = {}
        self._dirty: dict[str, NodeRecord] = {}  # accepted while degraded, not in Redis yet
        self._dirty_deletes: set[str] = set()
        self._listeners: list[StoreListener] = []
        self._owned_fence: OwnedFence = lambda _node_id: None
        self._owner_touch: OwnerTouch = lambda _node_id: None
        self._touch_outcome: TouchOutcome = lambda _node_id, _ok: None
        self._touch_ttl_ms = 0
        self._data_loss_hooks: list[Callable[[], Awaitable[None]]] = []
        self._delete_guard: DeleteGuard | None = None
        self._sync: asyncio.Task[None] | None = None
        self.sync_loop: SyncLoop | None = None  # set by start()
        self._synced = asyncio.Event()
        # Group commit: writes go to Redis in batches, one script call each (each write still
        # fenced and atomic on its own), with at most MAX_IN_FLIGHT batches on the wire. Writes
        # made while they travel wait for the next one, so under load batches grow by themselves
        # (the per-call cost is paid once for many writes) and an idle store still sends a
        # lone write at once. Per node, at most one write is in flight and one staged behind
        # it, the newest replacing an unsent one (``store.staging``).
        self._writes: NodeWrites[NodeRecord] = NodeWrites()
        self._refused_at: dict[str, int] = {}  # nodes whose write Redis refused: newer fence
        self._on_refused: RefusalHook = lambda _node_id, _fence: None
        self._in_flight = 0
        self._last_batch = 0  # puts in the last batch launched, and when (loop time)
        self._last_launch = 0.0
        self._launch_scheduled = False
        self._flushes: set[asyncio.Task[None]] = set()
        # Per node: its hash and owner-record keys, built on its first write.
        self._node_keys: dict[str, tuple[str, str]] = {}

    # -- wiring by the HA runtime ------------------------------------------------------------
    def set_ownership_view(
        self,
        owned_fence: OwnedFence,
        owner_touch: OwnerTouch | None = None,
        touch_ttl_s: float = 0.0,
        touch_outcome: TouchOutcome | None = None,
    ) -> None:
        """``owned_fence(node_id)``: the fence this replica holds for the node, or None;
        ``owner_touch(node_id)``: our owner record, whose TTL each write extends to
        ``touch_ttl_s`` while it is still the one in Redis (None: nothing to extend);
        ``touch_outcome(node_id, ok)``: told after each write that carried a touch whether
        the record was still ours and got extended (False: gone or replaced)."""
        self._owned_fence = owned_fence
        if owner_touch is not None:
            self._owner_touch = owner_touch
            self._touch_ttl_ms = int(touch_ttl_s * 1000)
        if touch_outcome is not None:
            self._touch_outcome = touch_outcome

    def set_refusal_hook(self, hook: RefusalHook) -> None:
        """``hook(node_id, fence)``: Redis refused a staged write of the node made with
        ``fence`` (a newer owner exists) and no caller waited for it; the owner side closes
        the node's stream."""
        self._on_refused = hook

    @property
    def staging(self) -> StagingCounters:
        """Staged, coalesced and backpressured writes (for /health and the benchmark)."""
        return self._writes.counters

    def add_data_loss_hook(self, hook: Callable[[], Awaitable[None]]) -> None:
        """Awaited after a rehydration that found Redis had lost its data (restart)."""
        self._data_loss_hooks.append(hook)

    async def run_data_loss_hooks(self) -> None:
        for hook in self._data_loss_hooks:
            try:
                await hook()
            except REDIS_ERRORS:
                raise
            except Exception:
                log.exception("data-loss hook failed")

    def set_delete_guard(self, guard: DeleteGuard) -> None:
        """Deletes (evictions) happen only while ``guard()`` gives the leader lease's value."""
        self._delete_guard = guard

    # -- lifecycle ---------------------------------------------------------------------------
    async def start(self) -> None:
        """Rehydrate from Redis (if reachable) and start the sync loop; never fails on Redis."""
        loop = SyncLoop(self, clock=self._clock)
        self.sync_loop = loop
        self._sync = asyncio.create_task(loop.run(), name="foghorn-sync")
        # Serve as soon as the first rehydration is done, or degraded if Redis is not there.
        with_timeout = asyncio.wait_for(self._synced.wait(), self.settings.op_timeout_s * 2)
        try:
            await with_timeout
        except TimeoutError:
            log.warning("starting degraded: Redis not reachable", reason=self.health.status.reason)

    async def pause_sync(self) -> None:
        """Stop reading the changelog, keeping the cursor (a slow reader, for drills/tests)."""
        if self._sync is not None and self.sync_loop is not None:
            self.sync_loop.stopping = True
            self._sync.cancel()
            await asyncio.gather(self._sync, return_exceptions=True)
            self._sync = None

    def resume_sync(self) -> None:
        """Read again from where ``pause_sync`` stopped."""
        if self._sync is None and self.sync_loop is not None:
            self._sync = asyncio.create_task(self.sync_loop.run(resume=True), name="foghorn-sync")

    async def flush(self, timeout_s: float | None = None) -> None:
        """Send every staged write now, without lingering, and wait for the batches on the
        wire (a graceful stop: the last reports land before ownership is released). Bounded
        by ``timeout_s`` (default: two Redis timeouts); what is left stays in memory only."""
        limit = timeout_s if timeout_s is not None else self.settings.op_timeout_s * 2
        try:
            async with asyncio.timeout(limit):
                while self._writes or self._flushes:
                    if self._writes and self._in_flight < MAX_IN_FLIGHT:
                        self._launch()
                    if not self._flushes:
                        break  # nothing could be sent (unencodable records were dropped)
                    await asyncio.wait(set(self._flushes), return_when=asyncio.FIRST_COMPLETED)
        except TimeoutError:
            log.warning("staged writes not flushed in time", staged=len(self._writes))

    async def close(self) -> None:
        await self.flush()
        if self._sync is not None and self.sync_loop is not None:
            self.sync_loop.stopping = True
            self._sync.cancel()
            await asyncio.gather(self._sync, return_exceptions=True)
            self._sync = None
        await self.redis.aclose()
        await self.redis_reader.aclose()

    def healthy(self) -> bool:
        return self.health.ok

    # -- reads -------------------------------------------------------------------------------
    def get(self, node_id: str) -> NodeRecord | None:
        return self._records.get(node_id)

    def snapshot(self) -> list[NodeRecord]:
        return list(self._records.values())

    def add_listener(self, listener: StoreListener) -> None:
        self._listeners.append(listener)

    # -- writes ------------------------------------------------------------------------------
    def _prepare(self, record: NodeRecord) -> NodeRecord:
        """The record as it will be stored: the writer's fence checked locally, next version."""
        node_id = record.node_id
        current = self._records.get(node_id)
        held = self._owned_fence(node_id)
        fence = record.owner_fence
        if held is not None and record.owner == self.settings.replica_id:
            if current is not None and current.owner_fence > held:
                self.counters.writes_rejected += 1
                raise StaleWriteError(
                    f"node {node_id!r}: owned with fence {held}, "
                    f"but fence {current.owner_fence} was seen since"
                )
            fence = held
        elif current is not None and fence < current.owner_fence:
            self.counters.writes_rejected += 1
            raise StaleWriteError(f"node {node_id!r}: fence {fence} < stored {current.owner_fence}")
        refused = self._refused_at.get(node_id) if self._refused_at else None
        if refused is not None and fence < refused:
            self.counters.writes_rejected += 1
            raise StaleWriteError(f"node {node_id!r}: Redis refused fence {fence} ({refused} seen)")
        version = max(self._max_version.get(node_id, 0), current.version if current else 0) + 1
        self._max_version[node_id] = version
        return evolve(record, version=version, owner_fence=fence)

    async def put(self, record: NodeRecord) -> NodeRecord:
        """Write ``record`` and return once Redis accepted it (or, degraded, once it is kept
        for re-publication); only then is it applied locally. For identity and lifecycle
        writes (registration, mode, disconnect), where acceptance must mean "in Redis"."""
        stored = self._prepare(record)
        node_id = stored.node_id
        if self.health.ok:
            try:
                await self._confirmed(stored)
            except FencedWriteRejected as exc:
                raise StaleWriteError(f"node {node_id!r}: {exc}") from None
            except REDIS_ERRORS:
                pass  # the batch failed: the store is degraded and the record kept as dirty
        else:
            self._defer(stored)
        self.counters.writes += 1
        # A newer record of the node may have been applied while this one travelled.
        if self._marks.is_newer(node_id, merge.token(stored)):
            self._apply(stored)
        return stored

    async def stage(self, record: NodeRecord) -> NodeRecord:
        """Apply ``record`` locally at once (routing sees it) and stage it for the writer; for
        load reports. Returns without waiting for Redis unless the node already has a write in
        flight and one staged (then it waits for the in-flight one: backpressure). A staged
        write Redis refuses (newer fence) is reported to the refusal hook, which closes the
        node's stream. See ``store.staging`` for the rules."""
        stored = self._prepare(record)
        self.counters.writes += 1
        self._apply(stored)
        if self.health.ok:
            wait = self._send(stored, confirm=False)
            if wait is not None:
                await wait
        else:
            self._defer(stored)
        return stored

    async def delete(self, node_id: str) -> None:
        current = self._records.get(node_id)
        if current is None:
            return
        guard = None
        if self._delete_guard is not None:
            guard = self._delete_guard()
            if guard is None:
                log.info("eviction skipped: not the leader", node_id=node_id)
                return
        if self.health.ok:
            try:
                await self._fenced.delete(
                    self.keys.node(node_id),
                    self.keys.owner(node_id),
                    expect=("ver", str(current.version)),
                    guard=guard,
                    announce=self._announce_delete(node_id, current.version),
                )
            except FencedWriteRejected as exc:
                log.info("eviction refused by Redis", node_id=node_id, reason=exc.reason)
                return
            except REDIS_ERRORS as exc:
                self.health.degrade(f"redis delete failed: {type(exc).__name__}: {exc}")
                self._dirty_deletes.add(node_id)
        else:
            self._dirty_deletes.add(node_id)
        self._dirty.pop(node_id, None)
        self._drop(node_id, (current.owner_fence, current.version))

    def _defer(self, record: NodeRecord) -> None:
        """Keep ``record`` for re-publication, unless a newer one of the node is kept already
        (a staged record sent after the outage began fails after newer ones were deferred)."""
        self.counters.writes_deferred += 1
        kept = self._dirty.get(record.node_id)
        if kept is not None and kept.version > record.version:
            return
        self._dirty[record.node_id] = record
        self._dirty_deletes.discard(record.node_id)

    def _announce_delete(self, node_id: str, version: int) -> Announce:
        # origin first: readers skip their own entries by it before decoding anything else
        fields = {
            "origin": self.settings.replica_id,
            "op": "del",
            "id": node_id,
            "ver": str(version),
        }
        return Announce(
            stream=self.log_key,
            maxlen=self.settings.changelog_maxlen,
            fields=fields,
            exact_trim=self.settings.exact_trim,
        )

    def _new_batch(self) -> PutBatch:
        settings = self.settings
        return PutBatch(
            self.log_key,
            origin=settings.replica_id,
            maxlen=settings.changelog_maxlen,
            exact_trim=settings.exact_trim,
            ttl_ms=int(settings.record_ttl_s * 1000),
            touch_ttl_ms=self._touch_ttl_ms,
            state_field="rec",
            version_field="ver",
        )

    def _send(self, record: NodeRecord, *, confirm: bool) -> asyncio.Future[None] | None:
        """Stage ``record`` for the writer (see ``store.staging``) and make sure a batch goes
        out soon; returns what the caller must await, if anything."""
        wait = self._writes.stage(record.node_id, record, confirm=confirm)
        if not self._launch_scheduled and self._in_flight < MAX_IN_FLIGHT:
            self._schedule_launch()
        return wait

    def _schedule_launch(self) -> None:
        """Launch on the next loop turn, so the writes of this turn join the batch; under
        sustained traffic (the last batch carried several puts) no sooner than ``linger_s``
        after the last launch, so batches stay large when the loop turns are short (each
        script call costs the process far more than a put in it). A lone write is sent at once:
        holding a trickle of writes for the linger too (tried for a herd's registrations)
        raised the sync lag to peers from 1.4 to 4.0 ms p99 (``./dev bench foghorn-ha``,
        sync_lag_ratio 2.09 -> 5.68 against a target of 3).
        """
        self._launch_scheduled = True
        loop = asyncio.get_running_loop()
        if self._last_batch > 1:
            wait = self._last_launch + self.settings.linger_s - loop.time()
            if wait > 0:
                loop.call_later(wait, self._launch)
                return
        loop.call_soon(self._launch)

    def _confirmed(self, record: NodeRecord) -> asyncio.Future[None]:
        """Stage ``record``; the future ends with the write that carries it."""
        wait = self._send(record, confirm=True)
        assert wait is not None  # a confirmation is always handed out
        return wait

    def _launch(self) -> None:
        """Send ready records in batches while fewer than ``MAX_IN_FLIGHT`` are on the wire.

        Records are encoded here, when sent: a record replaced while staged is never encoded.
        """
        self._launch_scheduled = False
        writes = self._writes
        while writes and self._in_flight < MAX_IN_FLIGHT:
            batch = self._new_batch()
            sent: list[tuple[str, NodeRecord]] = []
            touches: list[bool] = []
            for node_id, record in writes.take(MAX_BATCH):
                try:
                    state = redis_codec.encode(record)
                except ValueError as exc:  # never written, so never half-applied anywhere
                    log.error("record not encodable: not written", node_id=node_id, error=str(exc))
                    writes.finish(node_id, exc)
                    continue
                keys = self._node_keys.get(node_id)
                if keys is None:
                    keys = self._node_keys[node_id] = (
                        self.keys.node(node_id),
                        self.keys.owner(node_id),
                    )
                touch = self._owner_touch(node_id)
                fence, version = record.owner_fence, record.version
                batch.add(keys[0], keys[1], fence, node_id, state, version, touch or "")
                sent.append((node_id, record))
                touches.append(touch is not None)
            if not sent:
                continue
            self._in_flight += 1
            self.counters.batches += 1
            self._last_batch = len(sent)
            self._last_launch = asyncio.get_running_loop().time()
            task = asyncio.get_running_loop().create_task(self._flush(batch, sent, touches))
            self._flushes.add(task)
            task.add_done_callback(self._flushed)

    def _flushed(self, task: asyncio.Task[None]) -> None:
        self._flushes.discard(task)
        self._in_flight -= 1
        if self._writes and not self._launch_scheduled:
            self._schedule_launch()

    async def _flush(
        self, batch: PutBatch, sent: list[tuple[str, NodeRecord]], touches: list[bool]
    ) -> None:
        writes = self._writes
        sent_at = time.time() if history.enabled() else 0.0
        try:
            async with asyncio.timeout(self.settings.op_timeout_s * 2):  # no task per batch
                outcome = await self._fenced.put_batch(batch)
        except BaseException as exc:
            # The batch may or may not have landed: every record of it is kept as dirty and
            # re-published after the sync loop re-converged (a newer staged record, if any,
            # is tried next and deferred the same way if Redis is still away).
            # Waiting writers get the error (``put`` then returns as deferred; ``republish``
            # keeps its dirty records and the sync loop tries again).
            if not isinstance(exc, REDIS_ERRORS):
                log.error("write batch failed", error=repr(exc))
            self.health.degrade(f"redis write failed: {type(exc).__name__}: {exc}")
            error = exc if isinstance(exc, Exception) else RedisError("write batch cancelled")
            for node_id, record in sent:
                self._defer(record)
                writes.finish(node_id, error)
            if not isinstance(exc, Exception):
                raise
            return
        rejected, untouched = outcome.rejected, outcome.untouched
        for i, (node_id, record) in enumerate(sent):
            refusal = rejected.get(i) if rejected else None
            if refusal is not None:
                self._refused(node_id, record, refusal)
                continue
            if touches[i]:
                self._touch_outcome(node_id, not untouched or i not in untouched)
            if sent_at and record.owner == self.settings.replica_id and record.owner_fence:
                history.record("ownership", node_id, "write", record.owner_fence, record.owner,
                               t_sent=round(sent_at, 6))  # fmt: skip
            writes.finish(node_id)

    def _refused(self, node_id: str, record: NodeRecord, refusal: FencedWriteRejected) -> None:
        """Redis refused the node's write: a newer fence exists. Nothing more of this writer's
        is written for the node; a waiting writer gets the refusal, and when none waits (a
        staged report) the refusal hook closes the node's stream at once."""
        self.counters.writes_rejected += 1
        self._refused_at[node_id] = max(refusal.newer_fence, self._refused_at.get(node_id, 0))
        staged = self._writes.staged(node_id)
        if staged is not None and staged.owner_fence <= record.owner_fence:
            self._writes.drop_staged(node_id, refusal)
        if not self._writes.finish(node_id, refusal):
            self._on_refused(node_id, record.owner_fence)

    # -- local state -------------------------------------------------------------------------
    def _apply(self, record: NodeRecord) -> None:
        node_id = record.node_id
        self._marks.advance(node_id, merge.token(record))
        self._max_version[node_id] = max(self._max_version.get(node_id, 0), record.version)
        self._records[node_id] = record
        self._notify(node_id, record)

    def _drop(self, node_id: str, token: tuple[int, int]) -> None:
        self._marks.advance(node_id, token)
        self._node_keys.pop(node_id, None)  # evicted nodes must not pin memory
        self._refused_at.pop(node_id, None)
        if self._records.pop(node_id, None) is not None:
            self._notify(node_id, None)

    def _notify(self, node_id: str, record: NodeRecord | None) -> None:
        for listener in self._listeners:
            try:
                listener(node_id, record)
            except Exception:  # a broken listener must not break writes or sync
                log.exception("store listener failed", node_id=node_id)

    # -- the sync side (called by store.sync) ----------------------------------------------------
    def apply_entry(self, entry: Entry) -> None:
        """Apply one changelog entry written by another replica, if it is newer."""
        fields = entry.fields
        try:
            op, node_id = fields["op"], fields["id"]
            tok = (int(fields["fence"]), int(fields["ver"]))
        except (KeyError, ValueError):
            self.counters.remote_malformed += 1
            log.warning("malformed changelog entry skipped", entry_id=entry.id)
            return
        if op == "del":
            local = self._records.get(node_id)
            if local is not None and merge.token(local) > tok:
                self.counters.remote_stale += 1
                return
            self._dirty.pop(node_id, None)
            self._drop(node_id, tok)
            self.counters.remote_applied += 1
            return
        if op != "put" or not self._marks.is_newer(node_id, tok):
            self.counters.remote_stale += 1
            return
        try:
            remote = redis_codec.decode(fields["rec"])
        except (KeyError, ValueError):
            self.counters.remote_malformed += 1
            log.warning("malformed record in changelog skipped", entry_id=entry.id)
            return
        self.apply_remote(remote)

    def apply_remote(self, remote: NodeRecord) -> bool:
        """Take ``remote`` if its token is above the local watermark; True when applied."""
        node_id = remote.node_id
        if not self._marks.is_newer(node_id, merge.token(remote)):
            self.counters.remote_stale += 1
            return False
        self._dirty.pop(node_id, None)  # a newer write exists: ours is obsolete
        self.counters.remote_applied += 1
        self._apply(merge.merge(self._records.get(node_id), remote))
        return True

    def local_ids(self) -> set[str]:
        return set(self._records)

    def is_dirty(self, node_id: str) -> bool:
        return node_id in self._dirty or node_id in self._dirty_deletes

    def forget_unconfirmed(self, node_id: str) -> None:
        """Drop a local record that Redis no longer has (deleted while we were not reading)."""
        current = self._records.get(node_id)
        if current is not None and not self.is_dirty(node_id):
            self._drop(node_id, merge.token(current))

    async def republish(self) -> int:
        """Write what was accepted while degraded; returns how many records were published."""
        published = 0
        for node_id in list(self._dirty_deletes):
            current_guard = self._delete_guard() if self._delete_guard else None
            if self._delete_guard is not None and current_guard is None:
                self._dirty_deletes.discard(node_id)  # the next leader re-judges it
                continue
            await self._fenced.delete(
                self.keys.node(node_id),
                self.keys.owner(node_id),
                guard=current_guard,
                announce=self._announce_delete(node_id, self._max_version.get(node_id, 0)),
            )
            self._dirty_deletes.discard(node_id)
        # Writes keep being deferred while this runs (the store is not healthy until it is
        # done): those are published by the next pass, so none is left dirty once healthy.
        for _ in range(REPUBLISH_PASSES):
            if not self._dirty:
                break
            sent: list[tuple[str, NodeRecord, asyncio.Future[None]]] = []
            for node_id, record in list(self._dirty.items()):
                latest = self._records.get(node_id)
                if latest is None or latest.version != record.version:
                    self._dirty.pop(node_id, None)  # superseded by a newer record
                    continue
                sent.append((node_id, record, self._confirmed(record)))  # batched together
            results = await asyncio.gather(*(f for _, _, f in sent), return_exceptions=True)
            failure: BaseException | None = None
            for (node_id, record, _), result in zip(sent, results, strict=True):
                if isinstance(result, FencedWriteRejected):
                    log.info("deferred write superseded", node_id=node_id, reason=result.reason)
                elif isinstance(result, BaseException):
                    failure = failure or result  # still dirty: the sync loop tries again
                    continue
                else:
                    published += 1
                if self._dirty.get(node_id) is record:
                    del self._dirty[node_id]
            if failure is not None:
                self.counters.republished += published
                raise failure
        self.counters.republished += published
        return published

    def mark_owned_dirty(self) -> None:
        """Redis lost its data: every record this replica owns must be written again."""
        for node_id, record in self._records.items():
            if record.owner == self.settings.replica_id and self._owned_fence(node_id) is not None:
                self._dirty.setdefault(node_id, record)

    def mark_synced(self) -> None:
        self._synced.set()
