"""Ownership fenced by PostgreSQL advisory locks on one dedicated connection (the PostgreSQL
implementation of ``pkg.coord``'s fenced ownership; Signalman's partitions and singleton).

A session advisory lock belongs to the connection that took it: it is released when that
connection closes, and it does not survive PgBouncer transaction pooling. So every replica keeps
one dedicated asyncpg connection for its locks, and treats the loss of that connection as the loss
of every partition it owned.

Each acquisition bumps a fencing token per (topic, partition) in PostgreSQL; the history rejects
appends that carry an older token. A lock alone cannot stop a paused process from writing after it
wakes up; the token checked by the storage on every write does.

Fences survive a standby promotion: replication is asynchronous, so the promoted standby may
lack the last bumps of the fence table. Every bump is therefore at least
``(timeline - 1) * 2^32 + 1``, where ``timeline`` is the WAL timeline the server writes on
(``pg_current_wal_lsn``): a promotion starts a new, higher timeline, so fences issued after it
are above every fence of the old primary whatever it lost. The DSN may name several hosts
(``postgresql://u@a:5432,b:5432/db?target_session_attrs=read-write``): the connection goes to
the one that accepts writes, i.e. the promoted standby after a failover.
"""

from __future__ import annotations

import asyncio
import contextlib
import zlib
from typing import Any

import asyncpg
import structlog

from pkg.common.clock import SYSTEM_CLOCK, Clock

log = structlog.get_logger("pkg.coord.advisory")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS signalman_partition_fence (
    topic      text    NOT NULL,
    partition  integer NOT NULL,
    fence      bigint  NOT NULL,
    owner      text    NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (topic, partition)
)
"""
# Fences per WAL timeline: 2^32 bumps per partition and timeline (bigint holds 2^31 timelines).
TIMELINE_SPAN = 2**32
# The lowest fence the server may issue: (timeline - 1) * 2^32 + 1 (timeline 1: plain 1, 2, ...).
_FLOOR = (
    "((('x' || substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8))::bit(32)::bigint - 1)"
    f" * {TIMELINE_SPAN} + 1)"
)
# A consumer group's rows are keyed "<group>/<topic>" ($1), so two groups sharing a database
# never bump each other's fences. A group's first row starts above the group-less row of the
# same topic ($4, what replicas before the group was part of the key wrote): upgrading never
# issues a fence lower than one already recorded downstream.
_BUMP = f"""
INSERT INTO signalman_partition_fence AS f (topic, partition, fence, owner)
VALUES ($1, $2, GREATEST({_FLOOR}, COALESCE((SELECT g.fence + 1 FROM signalman_partition_fence g
                                             WHERE g.topic = $4 AND g.partition = $2), 0)), $3)
ON CONFLICT (topic, partition)
DO UPDATE SET fence = GREATEST(f.fence + 1, {_FLOOR}), owner = EXCLUDED.owner, updated_at = now()
RETURNING fence
"""
# The WAL timeline the server writes on: 1 on a fresh cluster, one more at each promotion.
_TIMELINE = "SELECT ('x' || substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8))::bit(32)::bigint"
# Holders of a lock key, and whether each is one of our group's lock sessions (by its
# application_name): only those may be terminated.
_HOLDER = """
SELECT l.pid, left(coalesce(a.application_name, ''), length($3)) = $3 AS ours
FROM pg_locks l LEFT JOIN pg_stat_activity a ON a.pid = l.pid
WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1
  AND l.classid = $1::bigint::oid AND l.objid = $2::bigint::oid AND l.pid <> pg_backend_pid()
"""
# PostgreSQL keeps the first 63 bytes of an application_name.
_APP_NAME_MAX = 63


class OwnershipLost(Exception):
    """The dedicated connection is gone: every lock it held may be held by someone else now."""


class LockBusy(Exception):
    """Someone else holds the lock and could not be evicted."""


def lock_key(name: str, partition: int) -> int:
    """A 64-bit advisory lock key: 32 bits of the name's hash, 16 bits of partition."""
    if not 0 <= partition < 1 << 16:
        raise ValueError(f"partition {partition} out of range")
    return (zlib.crc32(name.encode()) << 16) | partition


class PartitionLocks:
    """Advisory locks and fencing tokens of one replica."""

    def __init__(
        self,
        dsn: str,
        owner: str,
        *,
        group: str = "",
        grace_s: float = 2.0,
        clock: Clock = SYSTEM_CLOCK,
        connect_timeout_s: float = 5.0,
        query_timeout_s: float = 3.0,
        retry_interval_s: float = 0.05,
    ) -> None:
        self.dsn = dsn
        self.owner = owner
        # The consumer group is part of every lock key, fence row and session name: groups
        # sharing one PostgreSQL never lock, fence or evict each other ("" = the group-less
        # names of earlier releases).
        self.group = group
        self._scope = f"{group}:" if group else ""
        self.app_prefix = f"signalman-locks:{self._scope}"[:_APP_NAME_MAX]
        self.app_name = f"{self.app_prefix}{owner}"[:_APP_NAME_MAX]
        self.grace_s = grace_s
        self.clock = clock
        # Every round trip is bounded: a PostgreSQL that is starting, paused or behind a dead
        # network must never hang the consumer group's rebalance listener.
        self.connect_timeout_s = connect_timeout_s
        self.query_timeout_s = query_timeout_s
        self.retry_interval_s = retry_interval_s
        self._conn: Any = None
        self._held: set[int] = set()
        # lock key -> (first, last) time it was found held by someone else in a row of tries
        self._busy: dict[int, tuple[float, float]] = {}
        self._io = asyncio.Lock()  # one query at a time on the dedicated connection
        self.lost = asyncio.Event()
        self.evictions = 0
        self.connects = 0
        # The WAL timeline of the primary the dedicated connection reached last (0: not read):
        # a higher one than before means a standby was promoted (exported as a metric).
        self.timeline = 0

    @property
    def connected(self) -> bool:
        return self._conn is not None and not self._conn.is_closed()

    async def connect(self) -> None:
        """(Re)open the dedicated connection within ``connect_timeout_s``.

        Any lock held before is forgotten as lost. Raises (``OSError``, ``TimeoutError``, an
        asyncpg error) when PostgreSQL is unreachable, still starting or too slow: the caller
        retries with backoff.
        """
        await self.close()
        conn: Any = None
        try:
            async with asyncio.timeout(self.connect_timeout_s):
                conn = await asyncpg.connect(
                    self.dsn,
                    timeout=self.connect_timeout_s,
                    server_settings={"application_name": self.app_name},
                )
                await conn.execute(_SCHEMA)
                timeline = int(await conn.fetchval(_TIMELINE))
        except BaseException:
            if conn is not None:
                conn.terminate()
            raise
        conn.add_termination_listener(self._on_terminated)
        self._conn = conn
        self._held.clear()
        self.lost.clear()
        self.connects += 1
        if self.timeline and timeline != self.timeline:
            log.warning("postgres_timeline_changed", owner=self.owner, old=self.timeline,
                        new=timeline)  # fmt: skip
        self.timeline = timeline

    def _on_terminated(self, conn: Any) -> None:
        if conn is not self._conn:
            return  # a connection we replaced or closed ourselves: not news
        log.warning("ownership_connection_lost", owner=self.owner, locks=len(self._held))
        self.lost.set()

    def _abandon(self) -> None:
        """Drop the connection at once: nothing it held can be trusted any more."""
        conn, self._conn = self._conn, None
        self._held.clear()
        self.lost.set()
        if conn is not None and not conn.is_closed():
            conn.terminate()

    async def query(self, method: str, *args: Any) -> Any:
        """One bounded round trip on the dedicated connection (``method``: an asyncpg
        connection method such as ``execute`` or ``fetch``); raises ``OwnershipLost`` when the
        connection fails or does not answer in time (and gives the connection up)."""
        conn = self._conn
        if conn is None or conn.is_closed():
            raise OwnershipLost("the dedicated lock connection is closed")
        async with self._io:
            try:
                return await asyncio.wait_for(getattr(conn, method)(*args), self.query_timeout_s)
            except TimeoutError as exc:
                # A query that does not answer (PostgreSQL paused, network gone) leaves us not
                # knowing what we hold: give the connection up, which releases it all.
                log.warning("ownership_query_timeout", owner=self.owner, method=method)
                if self._conn is conn:
                    self._abandon()
                raise OwnershipLost(f"lock query timed out after {self.query_timeout_s} s") from exc
            except (asyncpg.PostgresConnectionError, OSError, ConnectionError) as exc:
                if self._conn is conn:
                    self._abandon()
                raise OwnershipLost(f"lock connection failed: {exc!r}") from exc
            except asyncpg.InterfaceError as exc:
                if conn.is_closed():
                    if self._conn is conn:
                        self._abandon()
                    raise OwnershipLost(f"lock connection closed: {exc!r}") from exc
                raise

    async def try_lock(self, key: int) -> bool:
        got = bool(await self.query("fetchval", "SELECT pg_try_advisory_lock($1)", key))
        if got:
            self._held.add(key)
        return got

    async def unlock(self, key: int) -> None:
        if key not in self._held:
            return
        self._held.discard(key)
        with contextlib.suppress(OwnershipLost):
            await self.query("fetchval", "SELECT pg_advisory_unlock($1)", key)

    def partition_key(self, topic: str, partition: int) -> int:
        return lock_key(f"signalman:{self._scope}{topic}", partition)

    def _fence_topic(self, topic: str) -> str:
        return f"{self.group}/{topic}" if self.group else topic

    async def holders(self, key: int) -> list[tuple[int, bool]]:
        """Backends holding ``key``: (pid, whether it is one of this group's lock sessions)."""
        rows = await self.query("fetch", _HOLDER, key >> 32, key & 0xFFFFFFFF, self.app_prefix)
        return [(int(r["pid"]), bool(r["ours"])) for r in rows]

    async def acquire_partition(
        self, topic: str, partition: int, *, timeout_s: float | None = None
    ) -> int:
        """Lock (topic, partition) and return a new, higher fencing token.

        Called after the consumer group assigned the partition to us: a holder that has not let
        go within ``grace_s`` lost its group membership already (a zombie), so its backend is
        terminated, which releases every lock of its dedicated connection. Raises ``LockBusy``
        when the lock is still held after ``timeout_s`` (never cancelled half-way: a lock taken
        but not recorded would stay held until the connection closes), ``OwnershipLost`` when
        the connection fails.
        """
        key = self.partition_key(topic, partition)
        if key not in self._held:
            start = self.clock.monotonic()
            while not await self.try_lock(key):
                now = self.clock.monotonic()
                # The grace runs from the first try that found the lock held, across calls: a
                # caller whose timeout is shorter than the grace (session 3 s -> 1.5 s, grace
                # 2 s) retried forever and never evicted a holder cut off by a partition (found
                # by the partition-signalman-postgres drill). A pause between tries longer than
                # the grace starts it again: the holder may be a live owner letting go.
                first, last = self._busy.get(key, (now, now))
                if now - last > self.grace_s + 5.0:
                    first = now
                if now - first >= self.grace_s:
                    await self._evict(key, topic, partition)
                    first = now
                self._busy[key] = (first, now)
                if timeout_s is not None and now - start >= timeout_s:
                    raise LockBusy(f"{topic}/{partition} still locked after {timeout_s} s")
                await self.clock.asleep(self.retry_interval_s)
            self._busy.pop(key, None)
        fence = await self.bump(topic, partition)
        log.info("partition_acquired", topic=topic, partition=partition, fence=fence)
        return fence

    async def acquire_fenced(self, resource: str) -> int:
        """``FencedOwnership``: ``resource`` is ``topic/partition``."""
        topic, _, partition = resource.rpartition("/")
        return await self.acquire_partition(topic, int(partition))

    async def release_resource(self, resource: str) -> None:
        topic, _, partition = resource.rpartition("/")
        await self.release_partition(topic, int(partition))

    async def bump(self, topic: str, partition: int) -> int:
        """A new fence for (topic, partition) without locking (the caller holds the lock)."""
        return int(
            await self.query(
                "fetchval", _BUMP, self._fence_topic(topic), partition, self.owner, topic
            )
        )

    async def _evict(self, key: int, topic: str, partition: int) -> None:
        for pid, ours in await self.holders(key):
            if not ours:
                # Not one of our group's lock sessions (another application, or a session
                # whose name we cannot vouch for): never terminated, we wait (LockBusy).
                log.warning(
                    "lock_held_by_foreign_backend", topic=topic, partition=partition,
                    backend_pid=pid,
                )  # fmt: skip
                continue
            log.warning("evicting_stale_owner", topic=topic, partition=partition, backend_pid=pid)
            await self.query("fetchval", "SELECT pg_terminate_backend($1)", pid)
            self.evictions += 1

    async def release_partition(self, topic: str, partition: int) -> None:
        """Unlock (topic, partition) if this connection holds it (a no-op otherwise)."""
        key = self.partition_key(topic, partition)
        if key not in self._held:
            return
        await self.unlock(key)
        log.info("partition_released", topic=topic, partition=partition)

    def singleton_key(self, name: str) -> int:
        return lock_key(f"signalman-singleton:{self._scope}{name}", 0)

    async def try_singleton(self, name: str) -> bool:
        """Take (or confirm) the singleton lock ``name`` without waiting."""
        key = self.singleton_key(name)
        if key in self._held and self.connected:
            return True
        return await self.try_lock(key)

    async def close(self) -> None:
        conn, self._conn = self._conn, None
        self._held.clear()
        if conn is not None and not conn.is_closed():
            with contextlib.suppress(Exception):
                await asyncio.wait_for(conn.close(), 2.0)


class AdvisoryLease:
    """``pkg.coord.protocols.Lease`` over a singleton advisory lock of ``PartitionLocks``: the
    term lasts while the lock connection holds the lock; its epoch is a fence bumped in the fence
    table at each acquisition (so it grows across standby promotions too)."""

    def __init__(self, locks: PartitionLocks, name: str) -> None:
        self.locks = locks
        self.name = name
        self._epoch: int | None = None

    def is_leader(self) -> bool:
        return self._epoch is not None and self.locks.connected

    @property
    def epoch(self) -> int | None:
        return self._epoch if self.is_leader() else None

    async def run_once(self) -> None:
        if not self.locks.connected:
            self._epoch = None  # the group member owns (re)connecting the dedicated connection
            return
        try:
            held = await self.locks.try_singleton(self.name)
            if held and self._epoch is None:
                self._epoch = await self.locks.bump(f"singleton:{self.name}", 0)
        except Exception as exc:
            log.warning("singleton_lock_check_failed", error=repr(exc)[:200])
            held = False
        if not held:
            self._epoch = None

    async def release(self) -> bool:
        if self._epoch is None:
            return False
        self._epoch = None
        await self.locks.unlock(self.locks.singleton_key(self.name))
        return True
