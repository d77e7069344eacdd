"""The fleet: node lifecycle, load reports and routing decisions over the store.

No wire types here. The control stream handler calls ``register`` / ``accept_report`` /
``disconnect``; the routing and admin handlers call ``route`` / ``explain`` / ``set_mode``; a
periodic task (under the leader lease when replicated) calls ``reap_once``. State goes through
the ``NodeStore``; routing reads the local ``FleetIndex`` it keeps in sync with the store.
"""

from __future__ import annotations

import asyncio
import dataclasses
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Protocol

import structlog

from api_balancing import errors
from api_balancing.identity import CREDENTIAL_KEY
from api_balancing.index import FleetIndex, Ranked
from api_balancing.latency import LatencyWindow
from api_balancing.model import (
    GeoPoint,
    HeldMode,
    LoadReport,
    NodeIdentity,
    NodeMode,
    NodeRecord,
    evolve,
)
from api_balancing.redirects import RedirectTracker
from api_balancing.scoring import Evaluation, Rejection, RouteQuery, Weights, evaluate, rank
from api_balancing.store.base import NodeStore
from pkg.common.clock import Clock
from pkg.events import SYSTEM_TENANT, Event, EventSink

log = structlog.get_logger("foghorn.fleet")


@dataclass
class FleetSettings:
    weights: Weights
    stale_after_s: float = 90.0
    evict_after_s: float = 300.0
    redirect_window_s: float = 30.0
    redirect_bps: float = 2_500_000.0
    routing_event_sample: float = 0.01
    replica_id: str = "foghorn"
    redirects_per_client: int = 4  # pending redirects one client address may account for


@dataclass
class FleetCounters:
    reports_accepted: int = 0
    reports_rejected: int = 0
    routing_decisions: int = 0
    routing_failures: int = 0
    registrations: int = 0
    evictions: int = 0


class NodeFleet(Protocol):
    """The fleet as the node-facing and admin handlers use it: ``Fleet`` itself, or in HA mode
    ``ha.owned_fleet.OwnedFleet`` (the same calls with fenced ownership around node writes)."""

    @property
    def store(self) -> NodeStore: ...
    @property
    def clock(self) -> Clock: ...
    @property
    def settings(self) -> FleetSettings: ...
    @property
    def redirects(self) -> RedirectTracker: ...
    def is_stale(self, record: NodeRecord) -> bool: ...
    def bound_tenant(self, stream_id: str) -> str | None: ...
    @property
    def stream_tenants(self) -> Mapping[str, str]: ...
    def explain(
        self, content_id: str, location: GeoPoint | None, *, role: str = "edge", protocol: str = ""
    ) -> list[Evaluation]: ...
    async def register(
        self,
        identity: NodeIdentity,
        owner_fence: int = 0,
        credential: str = "",
        held: HeldMode | None = None,
    ) -> NodeRecord: ...
    async def accept_report(self, node_id: str, report: LoadReport) -> NodeRecord: ...
    async def reject_report(self, node_id: str, reason: str) -> None: ...
    async def disconnect(self, node_id: str) -> None: ...
    async def hand_over(self, node_id: str) -> None: ...
    async def set_mode(self, node_id: str, mode: NodeMode, reason: str = "") -> NodeRecord: ...


# Unroutable requests told why in full (each scores the whole fleet), per second and at once.
WHY_NONE_PER_S = 2.0
WHY_NONE_BURST = 5.0


class Fleet:
    """Nodes, their state and routing over them, for one Foghorn replica."""

    def __init__(
        self,
        store: NodeStore,
        clock: Clock,
        settings: FleetSettings,
        events: EventSink,
        rng: random.Random | None = None,
    ) -> None:
        self.store = store
        self.clock = clock
        self.settings = settings
        self.events = events
        self.index = FleetIndex(settings.weights, settings.redirect_bps, settings.stale_after_s)
        self.redirects = RedirectTracker(
            clock, settings.redirect_window_s, per_client=settings.redirects_per_client
        )
        self.redirects.add_listener(self.index.set_pending)
        self.counters = FleetCounters()
        self.route_latency = LatencyWindow()
        self._rng = rng or random.Random()
        self._why_tokens = WHY_NONE_BURST
        self._why_at = clock.monotonic()
        self._locks: dict[str, asyncio.Lock] = {}
        store.add_listener(self._on_change)
        for record in store.snapshot():
            self._on_change(record.node_id, record)

    # -- store feed ------------------------------------------------------------------------

    def _on_change(self, node_id: str, record: NodeRecord | None) -> None:
        self.index.update(node_id, record)

    def bound_tenant(self, stream_id: str) -> str | None:
        """The tenant a stream is bound to while some node carries it (None when none does):
        the first tenant it was reported with, authoritative over later reports."""
        return self.index.tenant_of(stream_id)

    @property
    def stream_tenants(self) -> Mapping[str, str]:
        """Every carried stream's bound tenant (``bound_tenant`` for all of them): a report
        looks up ten streams, one ``get`` each instead of two calls."""
        return self.index.stream_tenants

    def tenant_of(self, stream_id: str) -> str:
        """The tenant owning a stream (from load reports), or the system tenant if unknown."""
        return self.index.tenant_of(stream_id) or SYSTEM_TENANT

    def _emit(self, type_: str, tenant: str, **data: object) -> None:
        self.events.emit(
            Event(
                type=type_, tenant=tenant, data=dict(data), time=self.clock.time(), source="foghorn"
            )
        )

    def _lock(self, node_id: str) -> asyncio.Lock:
        lock = self._locks.get(node_id)
        if lock is None:
            lock = self._locks[node_id] = asyncio.Lock()
        return lock

    async def _mutate(
        self,
        node_id: str,
        change: Callable[[NodeRecord], NodeRecord | None],
    ) -> NodeRecord:
        """Read-modify-write one node's record, one writer per node at a time on this replica
        (written with the store's ``put``; load reports are staged: ``accept_report``)."""
        async with self._lock(node_id):
            current = self.store.get(node_id)
            if current is None:
                raise errors.NotFound(f"node_id: unknown node {node_id!r}", "node_id")
            updated = change(current)
            if updated is None:
                return current
            return await self.store.put(updated)

    # -- node lifecycle --------------------------------------------------------------------

    async def register(
        self,
        identity: NodeIdentity,
        owner_fence: int = 0,
        credential: str = "",
        held: HeldMode | None = None,
    ) -> NodeRecord:
        """A node opened its control stream. Mode and counters survive reconnects.

        ``credential``: the name of the credential that registered it (recorded, so that no
        other credential can displace the node while it is connected). ``held``: the mode the
        node says it runs in, kept when this replica's store has no record of the node (an
        operator's mode set before the store was replaced: a backend switch, a rollback).
        """
        now = self.clock.time()
        node_id = identity.node_id
        async with self._lock(node_id):
            previous = self.store.get(node_id)
            holder = previous.extra.get(CREDENTIAL_KEY, "") if previous else ""
            if previous is not None and previous.connected and holder not in ("", credential):
                # Checked before too (check_register); again here, under the node's lock.
                raise errors.PermissionDenied(
                    f"register.node_id: node {node_id!r} is connected under another credential",
                    "register.node_id",
                )
            if previous is None:
                mode, reason = held or (NodeMode.NORMAL, "")
                record = NodeRecord(
                    identity=identity, mode=mode, mode_reason=reason, connected_at=now
                )
                if mode is not NodeMode.NORMAL:
                    log.info("node keeps the mode it held", node_id=node_id, mode=mode.name)
            else:
                record = dataclasses.replace(previous, identity=identity, connected_at=now)
            record = dataclasses.replace(
                record,
                connected=True,
                disconnected_at=0.0,
                owner=self.settings.replica_id,
                owner_fence=max(owner_fence, record.owner_fence if previous else 0),
                extra={**record.extra, CREDENTIAL_KEY: credential},
            )
            stored = await self.store.put(record)
        self.redirects.forget(node_id)
        self.counters.registrations += 1
        self._emit(
            "node.registered",
            SYSTEM_TENANT,
            node_id=node_id,
            roles=sorted(identity.roles),
            capabilities=sorted(identity.capabilities),
            base_url=identity.base_url,
            region=identity.region,
            replica=self.settings.replica_id,
            reconnect=previous is not None,
        )
        log.info("node registered", node_id=node_id, reconnect=previous is not None)
        return stored

    async def accept_report(self, node_id: str, report: LoadReport) -> NodeRecord:
        """Store a validated report; settle pending redirects; emit stream start/end events."""
        now = self.clock.time()
        lock = self._lock(node_id)
        if lock.locked():  # another write of this node is under way: this one comes after it
            async with lock:
                previous, stored = await self._stage_report(node_id, report, now)
        else:
            # No lock to take: nothing suspends between the read and the store applying the
            # record (``stage`` applies it locally at once, before any wait for the shared
            # source), so no other write of this node can come in between; one that starts
            # while ``stage`` waits reads this record. Two coroutine frames less per report.
            previous, stored = await self._stage_report(node_id, report, now)
        self.counters.reports_accepted += 1
        before = previous.streams if previous is not None else ()
        if self.redirects.pending(node_id):  # settle the viewers that showed up
            seen = {s.stream_id: s.viewers for s in before}
            for stream in report.streams:
                grew = stream.viewers - seen.get(stream.stream_id, 0)
                if grew > 0:
                    self.redirects.arrived(node_id, stream.stream_id, grew)
        # The common report changes numbers, not the streams: validation then hands over the
        # previous report's id tuple itself.
        listed, was = report.stream_ids, previous.stream_ids if previous is not None else ()
        if listed is not was and set(listed) != set(was):
            old_ids, new_ids = set(was), set(listed)
            carriers = self.index.carriers
            for stream in report.streams:
                sid = stream.stream_id
                if sid not in old_ids and carriers(sid) == 1:
                    self._emit("stream.started", stream.tenant_id, stream_id=sid, node_id=node_id)
            for stream in before:
                sid = stream.stream_id
                if sid not in new_ids and carriers(sid) == 0:
                    self._emit("stream.ended", stream.tenant_id, stream_id=sid, node_id=node_id)
        return stored

    async def _stage_report(
        self, node_id: str, report: LoadReport, now: float
    ) -> tuple[LoadReport | None, NodeRecord]:
        """The node's record with ``report``, staged; returns its previous report too."""
        current = self.store.get(node_id)
        if current is None:
            raise errors.NotFound(f"node_id: unknown node {node_id!r}", "node_id")
        updated = evolve(
            current,
            report=report,
            last_report_at=now,
            reports_accepted=current.reports_accepted + 1,
        )
        return current.report, await self.store.stage(updated)

    async def reject_report(self, node_id: str, reason: str) -> None:
        """Count a bad report; the last good state stays as it was."""
        self.counters.reports_rejected += 1

        def change(rec: NodeRecord) -> NodeRecord:
            return evolve(
                rec, reports_rejected=rec.reports_rejected + 1, last_rejection=reason[:200]
            )

        try:
            await self._mutate(node_id, change)
        except errors.NotFound:
            pass

    async def disconnect(self, node_id: str) -> None:
        """The node's control stream ended; it stays known (not routable) until evicted."""
        now = self.clock.time()

        def change(rec: NodeRecord) -> NodeRecord | None:
            if rec.owner != self.settings.replica_id or not rec.connected:
                return None  # another replica owns it now: not ours to mark
            return dataclasses.replace(rec, connected=False, disconnected_at=now)

        try:
            await self._mutate(node_id, change)
        except errors.NotFound:
            return
        self.redirects.forget(node_id)
        self._emit(
            "node.disconnected", SYSTEM_TENANT, node_id=node_id, replica=self.settings.replica_id
        )
        log.info("node disconnected", node_id=node_id)

    async def hand_over(self, node_id: str) -> None:
        """The node's stream ended because this replica told it to move to another one: the
        record stays connected and routable (the node reports to its new replica within a
        report interval, long before it would turn stale). Without HA there is no shared
        record to hand over; only a stopping replica hands over, and its state goes with it."""
        log.debug("node handed over", node_id=node_id)

    async def set_mode(self, node_id: str, mode: NodeMode, reason: str = "") -> NodeRecord:
        """Operator sets a node's mode; routing applies it at once."""
        old: NodeMode | None = None

        def change(rec: NodeRecord) -> NodeRecord:
            nonlocal old
            old = rec.mode
            return dataclasses.replace(rec, mode=mode, mode_reason=reason)

        stored = await self._mutate(node_id, change)
        if old is not mode:
            self._emit(
                "node.mode_changed",
                SYSTEM_TENANT,
                node_id=node_id,
                mode=mode.name.lower(),
                previous=old.name.lower() if old else "",
                reason=reason,
            )
            log.info("node mode changed", node_id=node_id, mode=mode.name, reason=reason)
        return stored

    async def reap_once(self) -> list[str]:
        """Evict nodes disconnected for longer than ``evict_after_s``; returns their ids."""
        now = self.clock.time()
        evicted = []
        for record in self.store.snapshot():
            if record.connected or now - record.disconnected_at < self.settings.evict_after_s:
                continue
            async with self._lock(record.node_id):
                current = self.store.get(record.node_id)
                if current is None or current.connected:
                    continue
                if now - current.disconnected_at < self.settings.evict_after_s:
                    continue
                await self.store.delete(record.node_id)
            self._locks.pop(record.node_id, None)
            self.redirects.forget(record.node_id)
            evicted.append(record.node_id)
            # Streams only this node still listed are over for the whole fleet now.
            for stream in current.report.streams if current.report else ():
                if self.index.carriers(stream.stream_id) == 0:
                    self._emit(
                        "stream.ended",
                        stream.tenant_id,
                        stream_id=stream.stream_id,
                        node_id=record.node_id,
                        reason="node evicted",
                    )
            self.counters.evictions += 1
            log.info(
                "node evicted",
                node_id=record.node_id,
                disconnected_for=now - record.disconnected_at,
            )
        return evicted

    # -- routing ---------------------------------------------------------------------------

    def is_stale(self, record: NodeRecord) -> bool:
        return (
            record.report is None
            or self.clock.time() - record.last_report_at > self.settings.stale_after_s
        )

    def route(
        self,
        content_id: str,
        location: GeoPoint | None,
        *,
        limit: int,
        role: str = "edge",
        protocol: str = "",
        redirect_client: str | None = None,
    ) -> tuple[list[Ranked], int]:
        """The best ``limit`` nodes for a request (raises NoEligibleNode when there is none).

        ``redirect_client``: the request is a redirect actually issued to a viewer at that
        address key (``/play``): the chosen node gets a pending redirect (bandwidth penalty
        until the viewer shows up), within the per-client cap. None: an answer only.
        """
        self.redirects.expire()
        ranked, considered = self.index.rank(
            content_id=content_id,
            lat=location.latitude if location else None,
            lon=location.longitude if location else None,
            now=self.clock.time(),
            role=role,
            protocol=protocol,
            limit=limit,
        )
        self.counters.routing_decisions += 1
        if not ranked:
            self.counters.routing_failures += 1
            raise errors.NoEligibleNode(self._why_none(content_id, location, role, protocol))
        if redirect_client is not None and role == "edge":
            self.redirects.record(ranked[0].node_id, content_id, redirect_client)
        if self.settings.routing_event_sample > 0 and (
            self._rng.random() < self.settings.routing_event_sample
        ):
            self._emit(
                "routing.decision",
                self.tenant_of(content_id),
                content_id=content_id,
                role=role,
                node_id=ranked[0].node_id,
                score=round(ranked[0].score, 3),
                distance_km=round(ranked[0].distance_km, 1),
                fallbacks=[r.node_id for r in ranked[1:]],
                replica=self.settings.replica_id,
            )
        return ranked, considered

    def explain(
        self, content_id: str, location: GeoPoint | None, *, role: str = "edge", protocol: str = ""
    ) -> list[Evaluation]:
        """Every node judged by the reference scorer: eligible ones ranked, then the rejected."""
        query = RouteQuery(
            content_id=content_id,
            location=location,
            now=self.clock.time(),
            stale_after_s=self.settings.stale_after_s,
            role=role,
            protocol=protocol,
        )
        self.redirects.expire()
        evaluations = [
            evaluate(
                rec,
                query,
                self.settings.weights,
                self.redirects.pending(rec.node_id),
                self.settings.redirect_bps,
            )
            for rec in self.store.snapshot()
        ]
        rejected = sorted((e for e in evaluations if not e.eligible), key=lambda e: e.node_id)
        return [*rank(evaluations), *rejected]

    def _why_none(
        self, content_id: str, location: GeoPoint | None, role: str, protocol: str
    ) -> str:
        # Saying why scores every node (about 50 ms at 10,000 nodes): a stream of requests no
        # node can serve would otherwise cost a core. Beyond the budget the answer says where
        # the reasons are instead.
        now = self.clock.monotonic()
        self._why_tokens = min(
            WHY_NONE_BURST, self._why_tokens + (now - self._why_at) * WHY_NONE_PER_S
        )
        self._why_at = now
        if self._why_tokens < 1:
            return (
                f"no eligible {role} node for {content_id or 'ingest'!r} (the reasons are "
                f"worked out at most {WHY_NONE_PER_S:g} times a second: ExplainRoute gives them)"
            )
        self._why_tokens -= 1
        evaluations = self.explain(content_id, location, role=role, protocol=protocol)
        if not evaluations:
            return "no eligible node: no nodes are registered"
        counts: dict[Rejection, int] = {}
        for e in evaluations:
            counts[e.rejection] = counts.get(e.rejection, 0) + 1
        summary = ", ".join(f"{n} {r.name.lower()}" for r, n in sorted(counts.items()))
        return f"no eligible {role} node for {content_id or 'ingest'!r} ({summary})"
