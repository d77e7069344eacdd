"""Finding group members whose replica died, through PostgreSQL, and removing them from the group.

A consumer group learns that a member died only when the member's session times out (6-10 s
here), and the rebalance that follows then waits for the join (~3 s on tansu): a partition of a
killed replica stays unprocessed for both. But a replica's dedicated lock connection ends the
moment its process dies: the kernel closes the socket and PostgreSQL ends the backend within
milliseconds. So each replica records which group member it is beside the identity of that
connection's backend (pid and start time), and the others watch the record: when a member's
backend has been gone for ``evict_after_s``, one of them sends LeaveGroup on its behalf and the
group rebalances at once instead of after the session timeout.

Safety does not depend on this. Ownership is still the advisory lock and the fencing token: a
member removed by mistake (a live replica whose lock connection dropped and did not come back in
time) has lost its locks anyway, and costs one rebalance (its next heartbeat is refused and it
rejoins). A paused replica (SIGSTOP) keeps its connection and is never removed this way: its
session timeout and the lock's eviction handle it, as before. A LeaveGroup that fails (no
coordinator known, a broker that refuses it) is retried at the next check, and the session
timeout still applies.

After a PostgreSQL restart every backend is new and every recorded one is gone: a record whose
backend started before the running server did says only that the server restarted. It is given
``stale_after_s`` (how long a replica without its lock connection stays in the group) to be
recorded again before it counts as dead.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import structlog
from opentelemetry import metrics

from pkg.common.clock import SYSTEM_CLOCK, Clock

log = structlog.get_logger("signalman.membership")
_removed = metrics.get_meter("signalman").create_counter(
    "signalman_dead_members_removed",
    description="group members removed by this replica because their lock connection was gone",
)

SCHEMA = """
CREATE TABLE IF NOT EXISTS signalman_group_member (
    group_id      text        NOT NULL,
    member_id     text        NOT NULL,
    owner         text        NOT NULL,
    backend_pid   integer     NOT NULL,
    backend_start timestamptz NOT NULL,
    updated_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (group_id, member_id)
)
"""
# Record (group, member) on this connection's backend; forget this backend's earlier member ids
# (a member that rejoined under a new id is not a dead peer).
_REGISTER = """
WITH me AS (
    SELECT pid, backend_start FROM pg_stat_activity WHERE pid = pg_backend_pid()
), earlier AS (
    DELETE FROM signalman_group_member m USING me
    WHERE m.group_id = $1 AND m.member_id <> $2
      AND m.backend_pid = me.pid AND m.backend_start = me.backend_start
)
INSERT INTO signalman_group_member (group_id, member_id, owner, backend_pid, backend_start)
SELECT $1, $2, $3, pid, backend_start FROM me
ON CONFLICT (group_id, member_id) DO UPDATE
SET owner = EXCLUDED.owner, backend_pid = EXCLUDED.backend_pid,
    backend_start = EXCLUDED.backend_start, updated_at = now()
"""
# Other members of the group whose recorded backend no longer exists.
_GONE = """
SELECT m.member_id, m.owner, m.backend_pid, m.backend_start,
       m.backend_start < pg_postmaster_start_time() AS before_restart
FROM signalman_group_member m
WHERE m.group_id = $1 AND m.member_id <> $2
  AND NOT EXISTS (
      SELECT 1 FROM pg_stat_activity a
      WHERE a.pid = m.backend_pid AND a.backend_start = m.backend_start
  )
"""
# Only the record that was found gone (not one its member wrote again meanwhile).
_FORGET = """
DELETE FROM signalman_group_member
WHERE group_id = $1 AND member_id = $2 AND backend_pid = $3 AND backend_start = $4
"""
_FORGET_SELF = """
DELETE FROM signalman_group_member
WHERE group_id = $1 AND member_id = $2 AND backend_pid = pg_backend_pid()
"""

# Kafka error codes a LeaveGroup on behalf of a member can answer with that settle it: removed,
# or not a member any more (its session expired, or it left by itself).
NONE, UNKNOWN_MEMBER_ID = 0, 25

Query = Callable[..., Awaitable[Any]]
"""``query(method, sql, *args)``: one round trip on the replica's lock connection (asyncpg
method name: ``execute``, ``fetch``...), bounded by a timeout (``PartitionLocks.query``)."""
RemoveMember = Callable[[str], Awaitable[int]]
"""``remove(member_id)``: LeaveGroup for that member; returns the Kafka error code."""


@dataclass(frozen=True)
class GonePeer:
    member_id: str
    owner: str
    backend_pid: int
    backend_start: Any
    before_restart: bool


class PeerWatch:
    """One replica's record in the group's member table, and its watch over the others."""

    def __init__(
        self,
        group_id: str,
        owner: str,
        query: Query,
        remove: RemoveMember,
        *,
        evict_after_s: float,
        stale_after_s: float,
        interval_s: float = 0.25,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        self.group_id = group_id
        self.owner = owner
        self.query = query
        self.remove = remove
        self.evict_after_s = evict_after_s
        self.stale_after_s = stale_after_s
        self.interval_s = interval_s
        self.clock = clock
        self.removed = 0  # members removed from the group by this replica
        self._registered: tuple[str, int] | None = None
        self._schema_on: int | None = None
        self._next_check = 0.0
        self._gone_since: dict[tuple[str, int], float] = {}
        # A removal the broker refused (or could not take) is tried again after this, and
        # reported once per member: a broker without the request must not flood the log.
        self.retry_after_s = 5.0
        self._retry_at: dict[tuple[str, int], float] = {}

    async def register(self, member_id: str, connection: int) -> None:
        """Record that ``member_id`` is this replica, on lock connection number ``connection``
        (``PartitionLocks.connects``); a no-op when that is already recorded."""
        if not member_id or self._registered == (member_id, connection):
            return
        if self._schema_on != connection:
            await self.query("execute", SCHEMA)
            self._schema_on = connection
        await self.query("execute", _REGISTER, self.group_id, member_id, self.owner)
        self._registered = (member_id, connection)
        log.info("group_member_recorded", member_id=member_id)

    async def forget_self(self) -> None:
        """Delete this replica's record (it leaves the group by itself)."""
        if self._registered is not None:
            member_id, self._registered = self._registered[0], None
            await self.query("execute", _FORGET_SELF, self.group_id, member_id)

    def due(self) -> bool:
        return self.clock.monotonic() >= self._next_check

    async def check(self, member_id: str) -> list[str]:
        """Remove from the group every other member whose backend has been gone long enough;
        returns the member ids removed (or found gone from the group already)."""
        self._next_check = self.clock.monotonic() + self.interval_s
        if self._registered is None:
            return []  # not in the table ourselves yet: no table perhaps, nothing to compare
        rows = await self.query("fetch", _GONE, self.group_id, member_id)
        now = self.clock.monotonic()
        gone = [GonePeer(r["member_id"], r["owner"], int(r["backend_pid"]), r["backend_start"],
                         bool(r["before_restart"])) for r in rows]  # fmt: skip
        seen = {(p.member_id, p.backend_pid) for p in gone}
        for key in list(self._gone_since):
            if key not in seen:
                del self._gone_since[key]  # recorded again (or forgotten by another replica)
                self._retry_at.pop(key, None)
        removed: list[str] = []
        for peer in gone:
            key = (peer.member_id, peer.backend_pid)
            since = self._gone_since.setdefault(key, now)
            wait_s = self.stale_after_s if peer.before_restart else self.evict_after_s
            if now - since < wait_s or now < self._retry_at.get(key, 0.0):
                continue
            try:
                code: int | str = await self.remove(peer.member_id)
            except Exception as exc:  # no coordinator known, a broker without the request...
                code = repr(exc)[:200]
            if code not in (NONE, UNKNOWN_MEMBER_ID):
                if key not in self._retry_at:
                    log.warning("group_member_removal_failed", member_id=peer.member_id,
                                owner=peer.owner, error=code,
                                retry_every_s=self.retry_after_s)  # fmt: skip
                self._retry_at[key] = now + self.retry_after_s
                continue
            await self.query("execute", _FORGET, self.group_id, peer.member_id,
                             peer.backend_pid, peer.backend_start)  # fmt: skip
            self._gone_since.pop(key, None)
            self._retry_at.pop(key, None)
            removed.append(peer.member_id)
            if code == NONE:
                self.removed += 1
                _removed.add(1)
                log.warning("dead_member_removed_from_group", member_id=peer.member_id,
                            owner=peer.owner, gone_s=round(now - since, 3))  # fmt: skip
        return removed
