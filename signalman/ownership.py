"""Partition ownership fenced by PostgreSQL advisory locks on one dedicated connection.

A session advisory lock belongs to the connection that took it: it is released when that
connection closes, and it does not survive PgBouncer transaction pooling. So every replica keeps
one dedicated asyncpg connection for its locks, and treats the loss of that connection as the loss
of every partition it owned.

Each acquisition bumps a fencing token per (topic, partition) in PostgreSQL; the history rejects
appends that carry an older token. A lock alone cannot stop a paused process from writing after it
wakes up; the token checked by the storage on every write does.
"""

from __future__ import annotations

import asyncio
import contextlib
import zlib
from typing import Any

import asyncpg
import structlog

from pkg.common.clock import SYSTEM_CLOCK, Clock

log = structlog.get_logger("signalman.ownership")

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
_BUMP = """
INSERT INTO signalman_partition_fence AS f (topic, partition, fence, owner)
VALUES ($1, $2, 1, $3)
ON CONFLICT (topic, partition)
DO UPDATE SET fence = f.fence + 1, owner = EXCLUDED.owner, updated_at = now()
RETURNING fence
"""
_HOLDER = """
SELECT pid FROM pg_locks
WHERE locktype = 'advisory' AND granted AND objsubid = 1
  AND classid = $1::bigint::oid AND objid = $2::bigint::oid AND pid <> pg_backend_pid()
"""


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
        grace_s: float = 2.0,
        clock: Clock = SYSTEM_CLOCK,
        connect_timeout_s: float = 5.0,
    ) -> None:
        self.dsn = dsn
        self.owner = owner
        self.grace_s = grace_s
        self.clock = clock
        self.connect_timeout_s = connect_timeout_s
        self._conn: Any = None
        self._held: set[int] = set()
        self._io = asyncio.Lock()  # one query at a time on the dedicated connection
        self.lost = asyncio.Event()
        self.evictions = 0

    @property
    def connected(self) -> bool:
        return self._conn is not None and not self._conn.is_closed()

    async def connect(self) -> None:
        """(Re)open the dedicated connection; any lock held before is forgotten as lost."""
        await self.close()
        self._conn = await asyncpg.connect(
            self.dsn,
            timeout=self.connect_timeout_s,
            server_settings={"application_name": f"signalman-locks:{self.owner}"},
        )
        self._conn.add_termination_listener(self._on_terminated)
        await self._conn.execute(_SCHEMA)
        self._held.clear()
        self.lost.clear()

    def _on_terminated(self, _conn: Any) -> None:
        if self._held:
            log.warning("ownership_connection_lost", owner=self.owner, locks=len(self._held))
        self.lost.set()

    async def _query(self, method: str, *args: Any) -> Any:
        if not self.connected:
            raise OwnershipLost("the dedicated lock connection is closed")
        async with self._io:
            try:
                return await getattr(self._conn, method)(*args)
            except (asyncpg.PostgresConnectionError, OSError, ConnectionError) as exc:
                self.lost.set()
                raise OwnershipLost(f"lock connection failed: {exc!r}") from exc
            except asyncpg.InterfaceError as exc:
                if self._conn.is_closed():
                    self.lost.set()
                    raise OwnershipLost(f"lock connection closed: {exc!r}") from exc
                raise

    async def try_lock(self, key: int) -> bool:
        got = bool(await self._query("fetchval", "SELECT pg_try_advisory_lock($1)", key))
        if got:
            self._held.add(key)
        return got

    async def unlock(self, key: int) -> None:
        if key not in self._held:
            return
        self._held.discard(key)
        with contextlib.suppress(OwnershipLost):
            await self._query("fetchval", "SELECT pg_advisory_unlock($1)", key)

    async def holders(self, key: int) -> list[int]:
        rows = await self._query("fetch", _HOLDER, key >> 32, key & 0xFFFFFFFF)
        return [int(r["pid"]) for r in rows]

    async def acquire_partition(self, topic: str, partition: int) -> int:
        """Lock (topic, partition) and return a new, higher fencing token.

        Called after the consumer group assigned the partition to us: a holder that has not let
        go within ``grace_s`` lost its group membership already (a zombie), so its backend is
        terminated, which releases every lock of its dedicated connection.
        """
        key = lock_key(f"signalman:{topic}", partition)
        if key not in self._held:
            deadline = self.clock.monotonic() + self.grace_s
            while not await self.try_lock(key):
                if self.clock.monotonic() >= deadline:
                    await self._evict(key, topic, partition)
                    deadline = self.clock.monotonic() + self.grace_s
                await self.clock.asleep(0.05)
        fence = int(await self._query("fetchval", _BUMP, topic, partition, self.owner))
        log.info("partition_acquired", topic=topic, partition=partition, fence=fence)
        return fence

    async def _evict(self, key: int, topic: str, partition: int) -> None:
        pids = await self.holders(key)
        for pid in pids:
            log.warning("evicting_stale_owner", topic=topic, partition=partition, backend_pid=pid)
            await self._query("fetchval", "SELECT pg_terminate_backend($1)", pid)
            self.evictions += 1

    async def release_partition(self, topic: str, partition: int) -> None:
        await self.unlock(lock_key(f"signalman:{topic}", partition))
        log.info("partition_released", topic=topic, partition=partition)

    async def try_singleton(self, name: str) -> bool:
        """Take (or confirm) the singleton lock ``name`` without waiting."""
        key = lock_key(f"signalman-singleton:{name}", 0)
        if key in self._held and self.connected:
            return True
        return await self.try_lock(key)

    async def close(self) -> None:
        conn, self._conn = self._conn, None
        self._held.clear()
        if conn is not None and not conn.is_closed():
            with contextlib.suppress(Exception):
                await asyncio.wait_for(conn.close(), 2.0)
