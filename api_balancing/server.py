"""Foghorn process wiring: store, fleet, gRPC services, HTTP side, reaper; start and stop."""

from __future__ import annotations

import asyncio
import contextlib
import random
from typing import Any

import structlog
import uvicorn

from api_balancing import metrics as foghorn_metrics
from api_balancing.config import FoghornConfig
from api_balancing.fleet import Fleet, FleetSettings
from api_balancing.geoip import GeoIpTable
from api_balancing.http import EmbeddedUvicorn, build_app
from api_balancing.reaper import Reaper
from api_balancing.service import Locator, NodeAdminService, NodeControlService, RoutingService
from api_balancing.sessions import SessionRegistry
from api_balancing.store.base import NodeStore
from api_balancing.store.memory import MemoryNodeStore
from pkg.common.auth import Authenticator, BearerAuthInterceptor, static_authenticator
from pkg.common.clock import SYSTEM_CLOCK, Clock
from pkg.common.grpcserver import GrpcServer, ServiceBinding, build_server
from pkg.common.metrics import process_metrics
from pkg.events import EventSink, build_sink
from pkg.proto.foghorn.v1 import foghorn_pb2_grpc as pb_grpc

log = structlog.get_logger("foghorn")

PUBLIC_METHODS = ["/foghorn.v1.Routing/"]


def build_store(config: FoghornConfig) -> NodeStore:
    """The embedded store, or the shared Redis one when ``redis_url`` is set (HA)."""
    if not config.redis_url:
        return MemoryNodeStore()
    try:
        from api_balancing.ha import build_store as build_ha_store
    except ImportError as exc:
        raise RuntimeError(
            "FOGHORN_REDIS_URL is set but the HA store (api_balancing.ha) is not available"
        ) from exc
    store: NodeStore = build_ha_store(config)
    return store


class FoghornServer:
    """One Foghorn replica: gRPC (node control, routing, admin) plus HTTP, on one event loop."""

    def __init__(
        self,
        config: FoghornConfig,
        *,
        clock: Clock = SYSTEM_CLOCK,
        store: NodeStore | None = None,
        events: EventSink | None = None,
        geoip: GeoIpTable | None = None,
        authenticator: Authenticator | None = None,
        rng: random.Random | None = None,
        run_reaper: bool = True,
    ) -> None:
        self.config = config
        self.clock = clock
        self.store = store if store is not None else build_store(config)
        self.events = (
            events if events is not None else build_sink(config.kafka_bootstrap, source="foghorn")
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
            ),
            self.events,
            rng=rng,
        )
        foghorn_metrics.register(process_metrics(), self.fleet)
        self.sessions = SessionRegistry()
        locator = Locator(geoip)
        # HA (FOGHORN_REDIS_URL set): node-facing handlers see the fleet through fenced
        # ownership, and admin commands reach nodes on other replicas through the relay.
        self.ha: Any = None
        node_fleet: Any = self.fleet
        if config.redis_url:
            from api_balancing.ha import telemetry as ha_telemetry
            from api_balancing.ha.runtime import HaRuntime
            from api_balancing.store.redis_store import RedisNodeStore

            # Fenced ownership and the relay keep their state next to the shared node store.
            if not isinstance(self.store, RedisNodeStore):
                raise TypeError("FOGHORN_REDIS_URL is set: HA needs the Redis node store")
            self.ha = HaRuntime(config, self.store, self.fleet, self.sessions, clock=clock)
            ha_telemetry.register(process_metrics(), self.ha)
            node_fleet = self.ha.owned_fleet
        self.control = NodeControlService(node_fleet, self.sessions, config.report_interval_s)
        self.routing = RoutingService(self.fleet, locator)
        self.admin = NodeAdminService(
            node_fleet,
            self.sessions,
            locator,
            config.command_timeout_s,
            dispatch=self.ha.relay.dispatch if self.ha else None,
        )
        if authenticator is None:
            authenticator = static_authenticator(config.platform_tokens())
        self._authenticator = authenticator
        self._run_reaper = run_reaper
        self.grpc: GrpcServer | None = None
        self.http: uvicorn.Server | None = None
        self.http_port = 0
        self._tasks: list[asyncio.Task[Any]] = []

    @property
    def grpc_port(self) -> int:
        return self.grpc.port if self.grpc else 0

    @property
    def grpc_target(self) -> str:
        return f"{self.config.host}:{self.grpc_port}"

    def _events_health(self) -> dict[str, Any]:
        """The event sink's state. Never the service's status: routing does not depend on
        Kafka (events are buffered, bounded, and dropped with a count when it stays away)."""
        if not self.config.kafka_bootstrap:
            return {"kind": "none", "status": "ok"}
        sink: Any = self.events
        connected = bool(getattr(sink, "connected", True))
        doc: dict[str, Any] = {
            "kind": "kafka",
            "status": "ok" if connected else "degraded",
            "connected": connected,
            "buffered": int(getattr(sink, "buffered", 0)),
            "dropped": int(getattr(sink, "dropped", 0)),
            "sent": int(getattr(sink, "sent", 0)),
        }
        if not connected:
            doc["reason"] = (
                "Kafka unreachable: events wait in a bounded buffer (dropped, counted, when full)"
            )
        return doc

    def health(self) -> dict[str, Any]:
        """The /health document: status, dependencies, counts, routing latency."""
        store_ok = self.store.healthy()
        records = self.store.snapshot()
        connected = sum(1 for r in records if r.connected)
        stale = sum(1 for r in records if r.connected and self.fleet.is_stale(r))
        c = self.fleet.counters
        lat = self.fleet.route_latency
        doc: dict[str, Any] = {
            "status": "ok" if store_ok else "degraded",
            "service": "foghorn",
            "replica": self.config.replica_id,
            "dependencies": {
                "store": {
                    "kind": "redis" if self.config.redis_url else "memory",
                    "status": "ok" if store_ok else "degraded",
                },
                "events": self._events_health(),
            },
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
                "p99_us": round(lat.percentile(0.99), 1),
            },
        }
        # The handful of numbers a status view (./dev up) shows on one line.
        doc["figures"] = {
            "nodes": connected,
            "stale": stale,
            "node_streams": len(self.sessions),
            "reports": c.reports_accepted,
            "routes": c.routing_decisions,
            "route_p99_us": doc["routing"]["p99_us"],
        }
        if self.ha is not None:  # sync state, degraded reason, leadership, ownership
            doc["ha"] = self.ha.describe()
            doc["figures"]["owned"] = doc["ha"]["owned_nodes"]
            doc["figures"]["sync_lag_p99_ms"] = doc["ha"]["sync_lag_p99_ms"]
            doc["figures"]["leader"] = doc["ha"]["leader"]
            doc["dependencies"]["store"]["reason"] = doc["ha"]["reason"]
        return doc

    async def start(self) -> None:
        await self.store.start()
        interceptor = BearerAuthInterceptor(self._authenticator, public_methods=PUBLIC_METHODS)
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
            port=self.config.grpc_port,
            host=self.config.host,
            interceptors=[interceptor],
            max_message_bytes=self.config.max_message_bytes,
        )
        await self.grpc.start()
        if self.config.http_port >= 0:
            await self._start_http()
        if self.ha is not None:
            await self.ha.start(self.grpc_target)  # runs the reaper under the leader lease
        elif self._run_reaper:
            reaper = Reaper(self.fleet, self.config.reap_interval_s, clock=self.clock)
            self._tasks.append(asyncio.create_task(reaper.run(), name="foghorn-reaper"))
        log.info(
            "foghorn started",
            grpc=self.grpc_target,
            http=self.http_port or None,
            replica=self.config.replica_id,
            store="redis" if self.config.redis_url else "memory",
        )

    async def _start_http(self) -> None:
        app = build_app(self.fleet, self.routing, self.health)
        config = uvicorn.Config(
            app,
            host=self.config.host,
            port=self.config.http_port,
            log_level="warning",
            access_log=False,
            lifespan="off",
        )
        server = EmbeddedUvicorn(config)
        self.http = server
        task = asyncio.create_task(server.serve(), name="foghorn-http")
        self._tasks.append(task)
        while not server.started:
            if task.done():
                task.result()  # raises the bind error
                raise RuntimeError("HTTP server stopped during start-up")
            await asyncio.sleep(0.01)
        self.http_port = server.servers[0].sockets[0].getsockname()[1]

    async def stop(self, grace: float = 2.0) -> None:
        """Stop taking calls, close node streams (they reconnect elsewhere), stop HTTP."""
        self.sessions.close_all("foghorn replica shutting down")
        if self.grpc is not None:
            await self.grpc.stop(grace)
        if self.http is not None:
            self.http.should_exit = True
        for task in self._tasks:
            if task.get_name() == "foghorn-http":
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(task, timeout=grace + 1)
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(BaseException):
                await task
        self._tasks.clear()
        if self.ha is not None:
            await self.ha.stop()
        await self.store.close()
        log.info("foghorn stopped", replica=self.config.replica_id)
