"""Telling a partition from an outage: a replica cut from Redis hands its nodes to peers that
reach it.

A replica whose Redis commands fail cannot tell by itself whether Redis is down for everyone
(an outage: every replica is in the same position, and routing from memory with the node
streams kept is the best anyone can do) or only for it (a partition: the other replicas still
write, lead and route with fresh loads, but they see this replica's nodes' loads age and, after
``stale_after_s``, stop routing to them; relays to those nodes find no owner once the owner
records lapse). Its peers can tell, so it asks them.

Once the store has been unreachable for ``after_s`` (half the ownership TTL,
``FOGHORN_OWNERSHIP_TTL_S``, so that the nodes move before their owner records lapse in
Redis), and every ``interval_s`` after that while it still is and still holds streams, the
replica asks each peer it knew (the membership list it had before the cut; over the relay, with
the replica credential) whether it reaches Redis now: the peer answers by pinging it. If any
does, every stream still held here gets a ``Reconnect`` to those peers, least loaded first: the
graceful hand-over of a stopping replica, so the records stay connected and routable while the
nodes move, and each node registers on a peer with a higher fence. If no peer answers reachable
(an outage, or the peers are cut off too) the replica keeps serving its streams as before.

Leadership needs nothing here: the lease is trusted only until its term's end, which a replica
that cannot renew reaches on its own (``pkg.coord.LeaderLease``). Writes the replica kept while
cut (its deferred reports) are re-published after the heal and refused by Redis for every node
that registered elsewhere meanwhile (higher fence): the fence, not this module, is what keeps a
partitioned replica from overwriting anything.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import structlog

from api_balancing.handlers import reconnect_message
from api_balancing.sessions import SessionRegistry
from pkg.common.clock import SYSTEM_CLOCK, Clock

log = structlog.get_logger("foghorn.ha.partition")


@dataclass(frozen=True)
class PeerAnswer:
    """One peer's answer to "do you reach Redis now?" (``reachable`` False when it did not
    answer at all)."""

    address: str
    reachable: bool
    replica_id: str = ""
    node_streams: int = 0
    error: str = ""


Ask = Callable[[list[str]], Awaitable[list[PeerAnswer]]]


class PartitionHandover:
    """Hands this replica's node streams to peers when only this replica is cut from Redis."""

    def __init__(
        self,
        replica_id: str,
        healthy: Callable[[], bool],
        peers: Callable[[], dict[str, str]],
        sessions: SessionRegistry,
        ask: Ask,
        *,
        after_s: float,
        interval_s: float = 1.0,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        self.replica_id = replica_id
        self.healthy = healthy  # the store in sync with Redis
        self.peers = peers  # the membership this replica last read: replica id -> address
        self.sessions = sessions
        self.ask = ask
        self.after_s = after_s
        self.interval_s = interval_s
        self.clock = clock
        self.cut_since: float | None = None  # monotonic time the store was first seen down
        self.rounds = 0  # times the peers were asked
        self.handovers = 0  # rounds that found a peer reaching Redis and moved streams
        self.nodes_handed = 0
        self.last_answers: list[PeerAnswer] = []
        self._outage_logged = False

    def unreachable_s(self) -> float:
        """How long the store has been unreachable, as of the last round (0: reachable)."""
        if self.cut_since is None:
            return 0.0
        return self.clock.monotonic() - self.cut_since

    async def round(self) -> int:
        """One check; how many node streams were told to move."""
        if self.healthy():
            if self.cut_since is not None:
                log.info("Redis reachable again", after_s=round(self.unreachable_s(), 2))
            self.cut_since = None
            self._outage_logged = False
            return 0
        if self.cut_since is None:
            self.cut_since = self.clock.monotonic()
            return 0
        if self.after_s <= 0 or self.unreachable_s() < self.after_s:
            return 0
        if not self.sessions.open_sessions():
            return 0
        peers = [addr for rid, addr in sorted(self.peers().items()) if rid != self.replica_id]
        if not peers:
            return 0
        self.rounds += 1
        answers = await self.ask(peers)
        self.last_answers = answers
        if self.healthy():  # back while we asked: nothing to hand over
            return 0
        reaching = sorted(
            (a for a in answers if a.reachable), key=lambda a: (a.node_streams, a.replica_id)
        )
        if not reaching:
            if not self._outage_logged:
                self._outage_logged = True
                log.warning(
                    "Redis unreachable here and from every peer that answered: an outage, "
                    "keeping the node streams",
                    peers=[(a.address, a.error or "unreachable") for a in answers],
                    unreachable_s=round(self.unreachable_s(), 2),
                )
            return 0
        targets = [a.address for a in reaching]
        message = reconnect_message(targets, "replica cut from Redis: move to a peer reaching it")
        told = sum(1 for s in self.sessions.open_sessions() if s.hand_over(message))
        if told:
            self.handovers += 1
            self.nodes_handed += told
            log.warning(
                "cut from Redis while peers reach it: node streams handed over",
                told=told,
                targets=targets,
                unreachable_s=round(self.unreachable_s(), 2),
            )
        return told

    async def run(self) -> None:
        while True:
            try:
                await self.round()
            except asyncio.CancelledError:
                raise
            except Exception:  # a bug here must not stop the replica from serving
                log.exception("partition check failed")
            await self.clock.asleep(self.interval_s)

    def describe(self) -> dict[str, Any]:
        """The part of /health under ``ha.partition``."""
        return {
            "redis_unreachable_s": round(self.unreachable_s(), 2),
            "handover_after_s": self.after_s,
            "peer_checks": self.rounds,
            "handovers": self.handovers,
            "nodes_handed_over": self.nodes_handed,
            "peers_reaching_redis": [a.address for a in self.last_answers if a.reachable],
        }
