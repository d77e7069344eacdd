"""Singleton duties under the leader lease: the stale-node reaper runs on one replica.

The lease (``pkg.coord.LeaderLease``: 15 s TTL renewed every 5 s by default, epoch from a
Redis counter) decides who reaps. Every eviction is also fenced by the lease itself: the
store's delete script checks in Redis that the lease still holds this replica's exact
``holder|epoch`` value, so a leader that was paused and lost its term cannot evict anything.

The reaper is the single instance's (``api_balancing.reaper``); beyond its eviction pass the
leader marks *orphans* disconnected: nodes still recorded as connected whose owner record
expired (their replica died) and that have not reported for ``stale_after_s``.
"""

from __future__ import annotations

import contextlib
import dataclasses

import structlog

from api_balancing.fleet import Fleet
from api_balancing.ha.ownership import NodeOwnership
from api_balancing.reaper import Reaper
from api_balancing.store.base import StaleWriteError
from api_balancing.store.redis_store import REDIS_ERRORS
from pkg.common.clock import SYSTEM_CLOCK, Clock
from pkg.coord import LeaderLease

log = structlog.get_logger("foghorn.ha.leader")


class OrphanMarker:
    """Marks the nodes of dead replicas disconnected, while this replica leads."""

    def __init__(self, lease: LeaderLease, fleet: Fleet, ownership: NodeOwnership) -> None:
        self.lease = lease
        self.fleet = fleet
        self.ownership = ownership
        self.orphans_marked = 0

    async def mark_orphans(self) -> int:
        """Connected-but-silent nodes whose owner record is gone become disconnected."""
        now = self.fleet.clock.time()
        marked = 0
        for record in self.fleet.store.snapshot():
            if not record.connected or not self.fleet.is_stale(record):
                continue
            if self.ownership.fence_of(record.node_id) is not None:
                continue  # ours and alive: the stream handler keeps it current
            try:
                if await self.ownership.lookup(record.node_id) is not None:
                    continue  # its owner is alive (it will report, or its record expires)
            except REDIS_ERRORS:
                return marked
            if not self.lease.is_leader():
                return marked
            with contextlib.suppress(StaleWriteError):
                await self.fleet.store.put(
                    dataclasses.replace(
                        record,
                        connected=False,
                        disconnected_at=record.last_report_at or now,
                    )
                )
                marked += 1
                log.info("orphaned node marked disconnected", node_id=record.node_id)
        self.orphans_marked += marked
        return marked


def leader_reaper(
    lease: LeaderLease,
    fleet: Fleet,
    ownership: NodeOwnership,
    interval_s: float,
    *,
    clock: Clock = SYSTEM_CLOCK,
) -> tuple[Reaper, OrphanMarker]:
    """The stale-node reaper of a replica: it runs only while this replica leads, and marks
    orphans before each eviction pass."""
    marker = OrphanMarker(lease, fleet, ownership)
    reaper = Reaper(
        fleet, interval_s, clock=clock, may_run=lease.is_leader, duties=[marker.mark_orphans]
    )
    return reaper, marker
