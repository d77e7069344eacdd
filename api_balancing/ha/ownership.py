"""Fenced ownership of node control streams (one owner replica per node, recorded in Redis).

On register the replica takes a fresh fence (``pkg.coord.Ownership``: Lua compare-and-set with
a strictly higher fence) and writes the node's record with it; each report's write extends the
owner record's TTL in the same script (if it is still exactly ours: that counts as a refresh),
and an explicit refresh, once no write extended the record for ``ttl/3`` or right after a write
found it gone, restores a lapsed record or detects a newer owner; the stream's end releases it
with a match-checked delete.
A refresh that finds a higher fence, a Redis rejection of a write, or a newer owner seen on the
changelog all mean the same thing: another replica took the node over, so this replica closes
its stream with ABORTED and stops writing for the node.

Redis outage policy (registration accepted locally, reconciled later): while Redis is
unreachable a registering node gets a *provisional* ownership with the fence its record already
had; when Redis returns the first refresh either acquires a real fence (nobody else claimed the
node) or finds a newer owner and aborts the stream.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import structlog

from api_balancing.model import NodeRecord
from api_balancing.sessions import SessionRegistry
from api_balancing.store.redis_store import REDIS_ERRORS, RedisNodeStore
from pkg.common import history
from pkg.common.clock import SYSTEM_CLOCK, Clock
from pkg.coord import OwnerRecord, Ownership, RefreshOutcome

log = structlog.get_logger("foghorn.ha.ownership")


@dataclass
class Held:
    record: OwnerRecord
    provisional: bool = False
    refreshed_at: float = 0.0
    encoded: str = field(init=False, default="")  # as Redis holds it: sent with every write

    def __post_init__(self) -> None:
        self.encoded = self.record.encode()


class NodeOwnership:
    """This replica's ownership records, checked by Redis on every write."""

    def __init__(
        self,
        store: RedisNodeStore,
        sessions: SessionRegistry,
        ttl_s: float,
        *,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        self.replica_id = store.settings.replica_id
        self.address = ""
        self.ttl_s = ttl_s
        self._store = store
        self._sessions = sessions
        self._clock = clock
        self._owners = Ownership(
            store.redis,
            store.keys.ownership_prefix,
            int(ttl_s * 1000),
            # A herd re-registers at hundreds per second, one acquisition every few ms:
            # they share round trips as the store's writes do (FOGHORN_WRITE_LINGER_MS).
            batch_linger_s=store.settings.linger_s,
        )
        self._held: dict[str, Held] = {}
        self.takeovers = 0  # streams this replica closed because another one took the node
        # Told the replica id whenever a node comes here while that peer's record of it is
        # still live: the peer never let the node go, so it has likely died (membership).
        self._unreleased_listeners: list[Callable[[str], None]] = []
        store.set_ownership_view(self.fence_of, self.touch_of, ttl_s, self.touched)
        store.set_refusal_hook(self.refused)
        store.add_data_loss_hook(self.restore_all)
        store.add_listener(self._on_change)

    def on_unreleased(self, listener: Callable[[str], None]) -> None:
        self._unreleased_listeners.append(listener)

    def fence_of(self, node_id: str) -> int | None:
        held = self._held.get(node_id)
        return held.record.fence if held else None

    async def restore_all(self) -> None:
        """Redis lost its data: put back every ownership record we hold, now (not at the
        next report), so relays and other replicas see the owners again."""
        for node_id in list(self._held):
            held = self._held.get(node_id)
            if held is not None:
                held.refreshed_at = float("-inf")
                await self.refresh(node_id)

    def touch_of(self, node_id: str) -> str | None:
        """Our confirmed owner record (encoded): every node write extends its TTL in Redis."""
        held = self._held.get(node_id)
        if held is None or held.provisional:
            return None
        return held.encoded

    def touched(self, node_id: str, ok: bool) -> None:
        """A write carried our owner record: ``ok`` when Redis still held exactly it (and
        extended its TTL, which counts as a refresh); otherwise it is gone or replaced, and
        the next ``refresh`` asks Redis at once instead of waiting for its period."""
        held = self._held.get(node_id)
        if held is not None:
            held.refreshed_at = self._clock.monotonic() if ok else float("-inf")

    def owned(self) -> list[str]:
        return list(self._held)

    async def acquire(self, node_id: str) -> int:
        """Own the node's stream; returns the fence its writes carry."""
        current = self._store.get(node_id)
        seen = current.owner_fence if current else 0
        sent = history.now()
        try:
            result = await self._owners.acquire(
                node_id, self.replica_id, self.address, at_least=seen
            )
        except REDIS_ERRORS as exc:
            fence = seen
            record = OwnerRecord(self.replica_id, self.address, fence)
            self._held[node_id] = Held(record, provisional=True)
            log.warning("provisional ownership (Redis down)", node_id=node_id, error=str(exc))
            return fence
        if not result.ok or result.record is None:  # only after a counter anomaly
            raise RuntimeError(f"ownership of {node_id!r} not acquired: {result.record}")
        self._held[node_id] = Held(result.record, refreshed_at=self._clock.monotonic())
        history.record(
            "ownership", node_id, "acquire", result.record.fence, self.replica_id, t_sent=sent
        )
        previous = result.replaced
        if previous is not None and previous.replica != self.replica_id:
            for listener in self._unreleased_listeners:
                listener(previous.replica)
        return result.record.fence

    def fresh(self, node_id: str) -> bool:
        """True while the node is ours and confirmed recently enough that ``refresh`` would
        not ask Redis (the per-report check, without a coroutine)."""
        held = self._held.get(node_id)
        # Each write extends the record (touch) and counts as a refresh when it found the record
        # still ours; the explicit refresh, a third of the TTL after the last one of either,
        # is what restores a lapsed record or finds a newer owner between writes. A write
        # whose touch missed forces it at the next report.
        return (
            held is not None
            and not held.provisional
            and self._clock.monotonic() - held.refreshed_at < self.ttl_s / 3
        )

    async def refresh(self, node_id: str) -> bool:
        """Keep owning the node; False when another replica owns it now (close the stream)."""
        if self.fresh(node_id):
            return True
        held = self._held.get(node_id)
        if held is None:
            return False
        now = self._clock.monotonic()
        try:
            if held.provisional:
                return await self._reconcile(node_id, held)
            outcome = await self._owners.refresh(node_id, held.record)
        except REDIS_ERRORS:
            return True  # degraded: keep serving the stream; Redis will judge on return
        if outcome is RefreshOutcome.SUPERSEDED:
            self._lose(node_id, "a newer owner holds the node")
            return False
        held.refreshed_at = now
        return True

    async def _reconcile(self, node_id: str, held: Held) -> bool:
        current = await self._owners.get(node_id)
        if (
            current is not None
            and current.replica != self.replica_id
            and current.fence > held.record.fence
        ):
            self._lose(node_id, f"owned by {current.replica} since the outage")
            return False
        sent = history.now()
        result = await self._owners.acquire(
            node_id, self.replica_id, self.address, at_least=held.record.fence
        )
        if result.record is None or not result.ok:
            return False
        self._held[node_id] = Held(result.record, refreshed_at=self._clock.monotonic())
        history.record(
            "ownership", node_id, "acquire", result.record.fence, self.replica_id, t_sent=sent
        )
        log.info("provisional ownership confirmed", node_id=node_id, fence=result.record.fence)
        return True

    async def release(self, node_id: str) -> None:
        """The stream ended here: delete our record (only if it is still ours)."""
        held = self._held.pop(node_id, None)
        if held is None or held.provisional:
            return
        history.record("ownership", node_id, "release", held.record.fence, self.replica_id)
        try:
            await self._owners.release(node_id, held.record)
        except REDIS_ERRORS:
            pass  # it expires by its TTL

    def refused(self, node_id: str, fence: int) -> None:
        """Redis refused a staged write of the node made with ``fence``: if that is the fence
        we still hold, another replica owns the node now, so its stream is closed (ABORTED)
        at once, not at the node's next report. A newer fence of ours (the node registered
        here again meanwhile) is left alone."""
        held = self._held.get(node_id)
        if held is not None and held.record.fence <= fence:
            self._lose(node_id, "Redis refused a staged write with our fence")

    def forget(self, node_id: str) -> None:
        """Redis refused our write for the node: we are not its owner any more."""
        self._lose(node_id, "Redis refused a write with our fence")

    async def lookup(self, node_id: str) -> OwnerRecord | None:
        """Who owns the node according to Redis (raises on Redis errors)."""
        return await self._owners.get(node_id)

    async def evict(self, node_id: str, seen: OwnerRecord) -> bool:
        """Remove a dead owner's record, only if it is still the one we saw."""
        return await self._owners.evict(node_id, seen)

    def _on_change(self, node_id: str, record: NodeRecord | None) -> None:
        held = self._held.get(node_id)
        if held is None or record is None:
            return
        if record.owner != self.replica_id and record.owner_fence > held.record.fence:
            self._lose(node_id, f"taken over by {record.owner} (fence {record.owner_fence})")

    def _lose(self, node_id: str, why: str) -> None:
        held = self._held.pop(node_id, None)
        if held is None:
            return
        if not held.provisional:
            history.record("ownership", node_id, "lost", held.record.fence, self.replica_id)
        self.takeovers += 1
        log.warning("node ownership lost: closing its stream", node_id=node_id, reason=why)
        session = self._sessions.get(node_id)
        if session is not None:
            session.close("ABORTED", f"node {node_id!r}: ownership lost ({why})")
