"""The live replicas of a Foghorn cluster, what the nodes are told of them, and rebalancing.

Every replica keeps a claim ``foghorn:{c}:replica:<id>`` = its address (``ha.replicas``); read
every ``interval_s`` they are the cluster's membership. When it changes, every node holding a
stream here gets the new list (``Replicas`` on its control stream), so nodes learn of a replica
that joined or left without a restart. Each round also compares what this replica owns with an
even split of the connected fleet over the live replicas (``api_balancing.rebalance``) and asks
up to ``batch`` of its nodes to reconnect to the peers that hold less (``Reconnect``): a replica
that joins or restarts fills up within seconds, a few nodes at a time, and none of them is
ever unroutable (a moved node's record stays connected).

A peer that looks dead is given no node for ``hold_s`` (its claim's TTL): a replica killed
without a goodbye keeps its claim, so its membership, until that TTL runs out. Its nodes
reconnect here within a fraction of a second; without the hold, the next round would see the
dead peer empty and send them back to an address that no longer answers. Two signs put a peer
on hold: a node registered here while the peer's ownership record of it was still live (the
peer never released it: ``suspect``, told by the ownership on acquire, which holds even when
this replica's view of the fleet lags and never saw the peer own anything), and the peer's
share of the fleet falling since the previous round.

A stopping replica withdraws first (``withdraw``): its claim is deleted so that no peer moves
nodes to it, and it learns which peers to hand its own nodes to.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

import redis.asyncio as aioredis
import structlog

from api_balancing import rebalance
from api_balancing.handlers import reconnect_message, replicas_message
from api_balancing.sessions import SessionRegistry
from api_balancing.store.keys import Keys
from api_balancing.store.redis_store import REDIS_ERRORS, RedisNodeStore
from pkg.common.clock import SYSTEM_CLOCK, Clock

log = structlog.get_logger("foghorn.ha.membership")

# A move asked for and not seen at its target after this long is forgotten (the node went
# elsewhere, or is gone): it stops counting at the target.
MOVE_EXPIRY_S = 10.0


class Membership:
    """Replica list, node notifications and rebalancing for one replica (see module doc)."""

    def __init__(
        self,
        store: RedisNodeStore,
        keys: Keys,
        replica_id: str,
        sessions: SessionRegistry,
        owns: Callable[[str], bool],
        *,
        interval_s: float = 1.0,
        batch: int = 10,
        rebalance: bool = True,
        hold_s: float | None = None,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        self.store = store
        self.redis: aioredis.Redis = store.redis
        self.keys = keys
        self.replica_id = replica_id
        self.sessions = sessions
        self.owns = owns
        self.interval_s = interval_s
        self.batch = batch
        self.rebalance = rebalance
        self.hold_s = 3 * interval_s if hold_s is None else hold_s
        self.clock = clock
        self.replicas: dict[str, str] = {}  # live replica id -> address (this one included)
        self.withdrawn = False
        self.moves_asked = 0  # nodes asked to move by rebalancing
        self.notified = 0  # replica-list messages sent to nodes
        self._moving: dict[str, tuple[str, float]] = {}  # node id -> (target replica, asked at)
        self._last_counts: Counter[str] = Counter()  # owned_counts() at the previous round
        self._held_until: dict[str, float] = {}  # peer -> no node moved to it before then

    def addresses(self) -> list[str]:
        """Every live replica's address, in replica id order (what nodes are told)."""
        return [self.replicas[r] for r in sorted(self.replicas)]

    async def refresh(self) -> bool:
        """Read the replica claims; True when the membership changed (nodes were told)."""
        prefix = self.keys.replica("")
        found: dict[str, str] = {}
        keys = [k async for k in self.redis.scan_iter(match=f"{prefix}*", count=500)]
        if keys:
            values = await self.redis.mget(keys)
            for key, value in zip(keys, values, strict=True):
                if value:
                    name = key.decode() if isinstance(key, bytes) else str(key)
                    addr = value.decode() if isinstance(value, bytes) else str(value)
                    found[name[len(prefix) :]] = addr
        if self.withdrawn:
            found.pop(self.replica_id, None)
        if found == self.replicas:
            return False
        joined = sorted(found.keys() - self.replicas.keys())
        left = sorted(self.replicas.keys() - found.keys())
        self.replicas = found
        sent = self.sessions.broadcast(replicas_message(self.addresses()))
        self.notified += sent
        log.info("foghorn replicas changed", joined=joined, left=left,
                 replicas=sorted(found), nodes_told=sent)  # fmt: skip
        return True

    def owned_counts(self) -> Counter[str]:
        """Connected nodes per live replica, moves in flight counted at their target."""
        counts: Counter[str] = Counter({r: 0 for r in self.replicas})
        now = self.clock.monotonic()
        for node_id, (_target, at) in list(self._moving.items()):
            if now - at > MOVE_EXPIRY_S:
                del self._moving[node_id]
        for record in self.store.snapshot():
            if not record.connected or record.owner not in counts:
                continue
            move = self._moving.get(record.node_id)
            if move is not None and record.owner == self.replica_id:
                counts[move[0]] += 1  # asked to move, not there yet
            else:
                if move is not None:
                    del self._moving[record.node_id]  # arrived (or went elsewhere)
                counts[record.owner] += 1
        return counts

    def rebalance_once(self) -> int:
        """Ask up to ``batch`` nodes to move to peers below the even split; how many were."""
        if (
            not self.rebalance
            or self.withdrawn
            or self.replica_id not in self.replicas
            or not self.store.healthy()
        ):
            return 0
        moves = rebalance.plan(self.replica_id, self._eligible(self.owned_counts()), self.batch)
        if not moves:
            return 0
        candidates = (
            s for s in self.sessions.open_sessions()
            if s.node_id not in self._moving and self.owns(s.node_id)
        )  # fmt: skip
        asked = 0
        now = self.clock.monotonic()
        for target, count in moves.items():
            message = reconnect_message([self.replicas[target]], "rebalance")
            for _ in range(count):
                session = next(candidates, None)
                if session is None:
                    break
                if session.hand_over(message):
                    self._moving[session.node_id] = (target, now)
                    asked += 1
        if asked:
            self.moves_asked += asked
            log.info("rebalancing node streams", moves=moves, asked=asked)
        return asked

    def suspect(self, peer: str) -> None:
        """A node came here from ``peer`` without ``peer`` releasing it: hold ``peer``."""
        if peer != self.replica_id:
            self._hold(peer, "a node left peer without a release")

    def _hold(self, peer: str, why: str, **facts: int) -> None:
        """No node moved to ``peer`` for ``hold_s`` from now (logged when a hold starts)."""
        now = self.clock.monotonic()
        if self._held_until.get(peer, now) <= now:
            log.info(f"{why}: none moved to it for a while", peer=peer, hold_s=self.hold_s,
                     **facts)  # fmt: skip
        self._held_until[peer] = now + self.hold_s

    def _eligible(self, counts: Counter[str]) -> Counter[str]:
        """``counts`` without the peers on hold (see the module doc): the split is planned over
        the replicas known to be serving, as if the suspect ones had already left."""
        for peer, count in counts.items():
            before = self._last_counts.get(peer, 0)
            if peer != self.replica_id and count < before:
                self._hold(peer, "peer lost nodes", before=before, now=count)
        self._last_counts = counts
        now = self.clock.monotonic()
        for peer in [p for p, until in self._held_until.items() if until <= now]:
            del self._held_until[peer]
        return Counter({p: c for p, c in counts.items() if p not in self._held_until})

    async def run(self) -> None:
        while True:
            try:
                await self.refresh()
                self.rebalance_once()
            except REDIS_ERRORS as exc:
                log.debug("membership not refreshed (Redis)", error=str(exc))
            await self.clock.asleep(self.interval_s)

    async def withdraw(self) -> list[str]:
        """Stop taking nodes: no more rebalancing, and the peers to hand this replica's nodes
        to, least loaded first (the claim itself is deleted by the caller)."""
        self.withdrawn = True
        try:
            await self.refresh()
        except REDIS_ERRORS as exc:
            log.warning("replica list unknown at stop (Redis)", error=str(exc))
        counts = self.owned_counts()
        peers = sorted((r for r in self.replicas if r != self.replica_id),
                       key=lambda r: (counts[r], r))  # fmt: skip
        return [self.replicas[r] for r in peers]

    def describe(self) -> dict[str, object]:
        return {
            "replicas": self.addresses(),
            "rebalance_moves": self.moves_asked,
            "moving": len(self._moving),
            "peers_on_hold": sorted(self._held_until),
        }
