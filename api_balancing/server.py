"""Foghorn's app: builds one replica from its config and runs its lifecycle.

The same shape as every service (docs/architecture.md): ``FoghornApp(config)`` wires the parts
(store, fleet, handlers, HA runtime when ``redis_url`` is set, event sink) without I/O;
``start()`` brings them up in order (store, gRPC, HTTP, HA duties or the reaper, health
following) and ``stop()`` takes them down in reverse; ``health()`` is the one report that
``/health`` and gRPC health serve.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import Mapping

import structlog

from api_balancing import metrics
from api_balancing.access import FOGHORN_ACCESS
from api_balancing.config import FoghornConfig
from api_balancing.fleet import Fleet, FleetSettings, NodeFleet
from api_balancing.geoip import GeoIpTable
from api_balancing.ha import telemetry as ha_telemetry
from api_balancing.ha.runtime import HaRuntime
from api_balancing.ha.runtime import build_store as build_ha_store
from api_balancing.handlers import (
    Locator,
    NodeAdminService,
    NodeControlService,
    RoutingService,
    reconnect_message,
)
from api_balancing.http import build_app
from api_balancing.limits import AddressLimiter
from api_balancing.reaper import Reaper
from api_balancing.sessions import SessionRegistry
from api_balancing.store.base import NodeStore
from api_balancing.store.memory import MemoryNodeStore
from pkg.common.app import Lifecycle
from pkg.common.auth import Principal, static_authenticator
from pkg.common.authz import AuthzInterceptor, HttpGuard
from pkg.common.clock import SYSTEM_CLOCK, Clock
from pkg.common.grpcserver import GrpcServer, ServiceBinding, build_server
from pkg.common.health import Dependency, HealthReport, Status
from pkg.common.httpserver import HttpServer
from pkg.common.metrics import process_metrics
from pkg.common.tls import identity_map
from pkg.events import ManagedSink
from pkg.events.factory import build_sink
from pkg.proto.foghorn.v1 import foghorn_pb2_grpc as pb_grpc

log = structlog.get_logger("foghorn")


class FoghornApp:
    """One Foghorn replica: gRPC (node control, routing, admin) plus HTTP, on one event loop."""

    def __init__(
        self,
        config: FoghornConfig,
        *,
        clock: Clock = SYSTEM_CLOCK,
        store: NodeStore | None = None,
        events: ManagedSink | None = None,
        geoip: GeoIpTable | None = None,
        tokens: Mapping[str, Principal] | None = None,
        rng: random.Random | None = None,
        run_reaper: bool = True,
    ) -> None:
        self.config = config
        self.clock = clock
        self.lifecycle = Lifecycle("foghorn")
        # HA (FOGHORN_REDIS_URL set): the Redis store, and next to it fenced ownership and the
        # relay; node-facing handlers see the fleet through ownership.
        self.ha: HaRuntime | None = None
        ha_store = build_ha_store(config) if config.redis_url and store is None else None
        self.store: NodeStore = store or ha_store or MemoryNodeStore()
        self.events: ManagedSink = events or build_sink(
            config.kafka_bootstrap,
            source="foghorn",
            signalman_addresses=config.signalman_addresses,
            signalman_token=config.signalman_token,
            tls=config.tls,
        )
        if geoip is None:
            geoip = GeoIpTable.from_csv(config.geoip_file) if config.geoip_file else GeoIpTable()
        self.fleet = Fleet(
            self.store,
            clock,
            FleetSettings(
                weights=config.weights,
                stale_after_s=config.stale_after_s,
                evict_after_s=config.evict_after_s,
                redirect_window_s=config.redirect_window_s,
                redirect_bps=config.redirect_bps,
                routing_event_sample=config.routing_event_sample,
                replica_id=config.replica_id,
                redirects_per_client=config.redirects_per_client,
            ),
            self.events,
            rng=rng,
        )
        metrics.register(process_metrics(), self.fleet)
        self.sessions = SessionRegistry()
        locator = Locator(geoip)
        node_fleet: NodeFleet = self.fleet
        if ha_store is not None:
            self.ha = HaRuntime(config, ha_store, self.fleet, self.sessions, clock=clock)
            ha_telemetry.register(process_metrics(), self.ha)
            node_fleet = self.ha.owned_fleet
        self.control = NodeControlService(
            node_fleet,
            self.sessions,
            config.report_interval_s,
            config.register_timeout_s,
            replicas=self.ha.membership.addresses if self.ha else None,
        )
        limiter = AddressLimiter(clock, config.anon_routes_per_s, config.anon_route_burst)
        metrics.register_limits(process_metrics(), limiter, config.replica_id)
        self.routing = RoutingService(self.fleet, locator, limiter, config.proxies)
        self.admin = NodeAdminService(
            node_fleet,
            self.sessions,
            locator,
            config.command_timeout_s,
            dispatch=self.ha.relay.dispatch if self.ha else None,
            withdraw=self.ha.withdraw if self.ha else None,
        )
        self._authenticator = static_authenticator(
            config.platform_tokens() if tokens is None else tokens
        )
        self._run_reaper = run_reaper
        self.grpc: GrpcServer | None = None
        self.http: HttpServer | None = None
        self._stopped = False

    @property
    def grpc_port(self) -> int:
        return self.grpc.port if self.grpc else 0

    @property
    def grpc_target(self) -> str:
        return f"{self.config.advertise_host or self.config.host}:{self.grpc_port}"

    @property
    def http_port(self) -> int:
        return self.http.port if self.http else 0

    # -- health --------------------------------------------------------------------------------
    def _events_dependency(self) -> Dependency:
        """The event sink. Never the service's status: routing does not depend on it (events
        are buffered, bounded, and dropped with a count when it stays away)."""
        state = self.events.state()
        detail: dict[str, object] = {}
        if state.kind not in ("none", "memory"):
            detail = {"connected": state.connected, "buffered": state.buffered,
                      "dropped": state.dropped, "sent": state.sent}  # fmt: skip
        return Dependency(
            "events",
            state.kind,
            Status.OK if state.connected else Status.DEGRADED,
            state.reason,
            detail,
            critical=False,
        )

    def health(self) -> HealthReport:
        """The one health report: status, dependencies, counts, routing latency, HA state."""
        store_ok = self.store.healthy()
        records = self.store.snapshot()
        # One pass with the clock read once: at 10,000 nodes, polled by monitors and drills,
        # the two generator passes calling is_stale per node were a tenth of a busy server.
        oldest = self.fleet.clock.time() - self.fleet.settings.stale_after_s
        connected = stale = 0
        for r in records:
            if r.connected:
                connected += 1
                if r.report is None or r.last_report_at < oldest:
                    stale += 1
        c = self.fleet.counters
        lat = self.fleet.route_latency
        route_p99_us = round(lat.percentile(0.99), 1)
        detail: dict[str, object] = {
            "counts": {
                "nodes": len(records),
                "connected": connected,
                "stale": stale,
                "local_streams": len(self.sessions),
                "reports_accepted": c.reports_accepted,
                "reports_rejected": c.reports_rejected,
                "routing_decisions": c.routing_decisions,
                "routing_failures": c.routing_failures,
                "registrations": c.registrations,
                "evictions": c.evictions,
            },
            "routing": {
                "samples": len(lat),
                "p50_us": round(lat.percentile(0.50), 1),
                "p99_us": route_p99_us,
            },
        }
        # The handful of numbers a status view (./dev up) shows on one line.
        figures: dict[str, int | float | str | bool | None] = {
            "nodes": connected,
            "stale": stale,
            "node_streams": len(self.sessions),
            "reports": c.reports_accepted,
            "routes": c.routing_decisions,
            "route_p99_us": route_p99_us,
        }
        store_reason = ""
        if self.ha is not None:  # sync state, degraded reason, leadership, ownership
            ha = self.ha.describe()
            detail["ha"] = ha
            figures.update(owned=ha["owned_nodes"], sync_lag_p99_ms=ha["sync_lag_p99_ms"],
                           leader=ha["leader"])  # fmt: skip
            store_reason = ha["reason"]
        store = Dependency(
            "store",
            "redis" if self.ha is not None else "memory",
            Status.OK if store_ok else Status.DEGRADED,
            store_reason if not store_ok else "",
            {"reason": store_reason} if self.ha is not None else {},
        )
        return HealthReport.of(
            "foghorn",
            self.config.replica_id,
            [store, self._events_dependency()],
            figures,
            detail,
            stopping=self.lifecycle.stopping,
        )

    # -- lifecycle -----------------------------------------------------------------------------
    async def start(self) -> None:
        lc = self.lifecycle
        lc.on_stop(self.events.aclose)  # last out: events of the stop itself still leave
        await self.store.start()
        lc.on_stop(self.store.close)
        interceptor = AuthzInterceptor(
            self._authenticator,
            FOGHORN_ACCESS,
            max_streams=self.config.max_streams_per_credential,
            identities=identity_map(self.config.tls.identities),
        )
        self.grpc = build_server(
            [
                ServiceBinding(
                    pb_grpc.add_NodeControlServicer_to_server,
                    self.control,
                    "foghorn.v1.NodeControl",
                ),
                ServiceBinding(
                    pb_grpc.add_RoutingServicer_to_server, self.routing, "foghorn.v1.Routing"
                ),
                ServiceBinding(
                    pb_grpc.add_NodeAdminServicer_to_server, self.admin, "foghorn.v1.NodeAdmin"
                ),
                *([self.ha.binding()] if self.ha else []),
            ],
            settings=self.config.grpc,
            interceptors=[interceptor],
        )
        await self.grpc.start()
        lc.on_stop(self.grpc.stop, 0.0)  # drained by stop() already; here after a failed start
        http = self.config.http
        if http is not None:
            guard = HttpGuard(FOGHORN_ACCESS, self._authenticator)
            self.http = HttpServer(build_app(self.fleet, self.routing, self.health, guard), http)
            await self.http.start()
            lc.on_stop(self.http.stop, 2.0)
        if self.ha is not None:
            await self.ha.start(self.grpc_target)  # runs the reaper under the leader lease
            lc.on_stop(self.ha.stop)
        elif self._run_reaper:
            reaper = Reaper(self.fleet, self.config.reap_interval_s, clock=self.clock)
            lc.spawn(reaper.run(), "reaper")
        lc.spawn(self.grpc.follow(self.health), "grpc-health")
        log.info(
            "foghorn started",
            grpc=self.grpc_target,
            http=self.http_port or None,
            replica=self.config.replica_id,
            store="redis" if self.ha is not None else "memory",
            events=self.events.state().kind,
        )

    async def stop(self, grace: float = 2.0) -> None:
        """Stop taking work, hand the nodes over, then undo what ``start`` did, newest first.

        Health says not serving at once (HTTP and gRPC); the replica leaves the membership and
        tells every node to reconnect to a peer now (``hand_over``); streams still open after
        ``handover_s`` are closed; with peers to go to, routing keeps being answered until
        ``drain_delay_s`` after the start of the stop (callers checking health move away
        meanwhile); then the gRPC
        server stops accepting and its calls drain for ``grace`` seconds; then HA duties stop
        (staged reports flushed, remaining ownership released), HTTP, the store and the event
        sink.
        """
        if self._stopped:
            return
        self._stopped = self.lifecycle.stopping = True
        started = self.clock.monotonic()
        if self.grpc is not None:
            await self.grpc.set_serving(False)
        peers = await self.hand_over()
        self.sessions.close_all("foghorn replica shutting down")
        await self.control.settle()
        left = self.config.drain_delay_s - (self.clock.monotonic() - started)
        if left > 0 and peers and self.grpc is not None:
            await asyncio.sleep(left)  # callers see not_serving and move away first
        if self.grpc is not None:
            await self.grpc.stop(grace)
        await self.lifecycle.close()
        log.info("foghorn stopped", replica=self.config.replica_id)

    async def hand_over(self) -> list[str]:
        """Tell every connected node to reconnect elsewhere (to the peers, least loaded first;
        with no peer known, to any other address the node knows) and wait up to
        ``handover_s`` for the streams to end. Their records stay connected: routing on the
        other replicas never misses a node that is moving. Returns the peers handed over to."""
        started = self.clock.monotonic()
        targets: list[str] = []
        if self.ha is not None:
            with contextlib.suppress(Exception):  # Redis down: nodes use the list they know
                targets = await asyncio.wait_for(self.ha.withdraw(), 1.0)
        message = reconnect_message(targets, "replica stopping")
        told = sum(1 for s in self.sessions.open_sessions() if s.hand_over(message))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.sessions.wait_empty(), self.config.handover_s)
        log.info("foghorn nodes handed over", told=told, left=len(self.sessions), targets=targets,
                 took_s=round(self.clock.monotonic() - started, 3))  # fmt: skip
        return targets
