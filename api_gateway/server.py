"""Bridge's app: builds one replica from its config and runs its lifecycle.

The same shape as every service (docs/architecture.md): ``BridgeApp(config)`` wires the parts
(stores, cache, limiter, backends, the ASGI app) without I/O; ``start()`` brings them up in
order (Redis probe, HTTP) and ``stop()`` takes them down in reverse; ``health()`` is the one
report ``/health`` serves. ``redis_url`` empty: embedded mode, in-memory cache and buckets (one
replica). Set: HA mode, shared through Redis, with the in-memory stores as the degraded
fallback while Redis is down.
"""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable

import redis.asyncio as aioredis
import structlog
from starlette.types import ASGIApp

from api_gateway import metrics
from api_gateway.auth import JwtAuthenticator, JwtSettings, load_public_key
from api_gateway.backend import EventsBackend, FleetBackend, NoEvents, NoFleet
from api_gateway.config import BridgeConfig
from api_gateway.fanout import SharedEvents
from api_gateway.http import (
    RESPONSES_BY_STATUS,
    BridgeGraphQL,
    Limits,
    RequestGuard,
    build_asgi,
    load_graphiql_html,
)
from api_gateway.ops import OperatorGuard
from api_gateway.schema import build_schema
from api_gateway.service import Gateway
from bridge.answers import AnswerCache
from bridge.cache import CachePolicy, CacheStats, ResponseCache
from bridge.ratelimit import RateLimiter
from bridge.store import AnswerStore, BucketStore, CacheStore
from bridge.store.health import RedisHealth
from bridge.store.memory import MemoryAnswerStore, MemoryBucketStore, MemoryCacheStore
from bridge.tenant_limits import CachedLimits, ConfigLimitsProvider, parse_overrides
from bridge.token_bucket import Limit
from pkg.common.app import Lifecycle
from pkg.common.auth import static_authenticator
from pkg.common.clock import SYSTEM_CLOCK, Clock
from pkg.common.health import Dependency, Figure, HealthReport, Status
from pkg.common.httpserver import HttpServer
from pkg.common.metrics import process_metrics
from pkg.common.tls import grpc_channel_credentials

log = structlog.get_logger("bridge")


def _fleet_backend(cfg: BridgeConfig) -> FleetBackend:
    if not cfg.foghorn_addresses:
        return NoFleet()
    from api_gateway.foghorn_backend import FoghornFleet

    return FoghornFleet(
        cfg.foghorn_addresses,
        cfg.backend_timeout_s,
        cfg.foghorn_token or None,
        credentials=grpc_channel_credentials(cfg.tls),
    )


def _events_backend(cfg: BridgeConfig) -> EventsBackend:
    if not cfg.signalman_addresses:
        return NoEvents()
    from api_gateway.signalman_backend import SignalmanEvents, parse_tenant_tokens

    return SignalmanEvents(
        cfg.signalman_addresses,
        parse_tenant_tokens(cfg.signalman_tokens),
        credentials=grpc_channel_credentials(cfg.tls),
    )


class BridgeApp:
    """One Bridge replica: GraphQL over HTTP and WebSocket, on one event loop."""

    def __init__(
        self,
        config: BridgeConfig,
        *,
        fleet: FleetBackend | None = None,
        events: EventsBackend | None = None,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        """Backends default to the configured Foghorn/Signalman (tests pass fakes)."""
        cfg = self.config = config
        self.clock = clock
        self.lifecycle = Lifecycle("bridge")
        self.fleet: FleetBackend = fleet if fleet is not None else _fleet_backend(cfg)
        upstream = events if events is not None else _events_backend(cfg)
        # A tenant's subscriptions share one Signalman stream per replica (and are capped).
        self.events = SharedEvents(
            upstream, cfg.max_subscriptions_per_tenant, cfg.subscription_buffer
        )

        self.redis: aioredis.Redis | None = None
        self.redis_health: RedisHealth | None = None
        cache_store: CacheStore
        bucket_store: BucketStore | None
        if cfg.redis_url:
            from bridge.store.redis_store import RedisBucketStore, RedisCacheStore, connect

            self.redis = connect(cfg.redis_url, cfg.redis_timeout_s)
            self.redis_health = RedisHealth(self.redis, clock)
            cache_store = RedisCacheStore(self.redis, self.redis_health, cfg.redis_prefix)
            bucket_store = RedisBucketStore(self.redis, self.redis_health, cfg.redis_prefix)
        else:
            cache_store = MemoryCacheStore(clock)
            bucket_store = None  # the limiter's local buckets are the embedded default

        policy = CachePolicy(
            ttl=cfg.cache_ttl_s,
            stale=cfg.cache_stale_s,
            negative_ttl=cfg.cache_negative_ttl_s,
            error_grace=cfg.cache_error_grace_s,
        )
        route_policy = CachePolicy(
            ttl=cfg.route_cache_ttl_s,
            stale=cfg.route_cache_ttl_s * 4,
            negative_ttl=cfg.cache_negative_ttl_s,
            error_grace=cfg.cache_error_grace_s,
        )
        self.cache = ResponseCache(
            cache_store,
            policy=policy,
            clock=clock,
            xfetch_beta=cfg.xfetch_beta,
            lock_ttl_s=cfg.cache_lock_ttl_s,
            # A lock holder that has not filled the entry within half a backend deadline is
            # more likely gone (paused, partitioned from us or from Redis) than slow: waiters
            # then load themselves, with the other half left for their own backend call, so a
            # caller whose deadline equals Bridge's still gets an answer. At worst one backend
            # call per replica and key while the backend is that slow.
            lock_wait_s=min(cfg.cache_lock_ttl_s, cfg.backend_timeout_s / 2),
            local_size=cfg.cache_local_size if cfg.redis_url else 0,
        )
        if self.redis_health is not None:
            self.redis_health.on_recover(self.cache.flush_pending)

        local_buckets = MemoryBucketStore(clock)
        limiter = RateLimiter(bucket_store, local_buckets)
        answer_store: AnswerStore
        if self.redis is not None and self.redis_health is not None:
            from bridge.store.redis_store import RedisAnswerStore

            answer_store = RedisAnswerStore(self.redis, self.redis_health, cfg.redis_prefix)
        else:
            assert isinstance(cache_store, MemoryCacheStore)
            answer_store = MemoryAnswerStore(local_buckets, cache_store, clock)
        self.answers = AnswerCache(answer_store, limiter, clock=clock, xfetch_beta=cfg.xfetch_beta)
        metrics.register(process_metrics(), limiter, self.answers)
        tenant_limits = CachedLimits(
            ConfigLimitsProvider(
                Limit(cfg.tenant_burst, cfg.tenant_rate), parse_overrides(cfg.tenant_limits)
            ),
            ttl_s=cfg.tenant_limits_ttl_s,
            clock=clock,
        )
        self.auth = JwtAuthenticator(
            JwtSettings(
                hs256_secret=cfg.jwt_hs256_secret,
                rs256_public_key=load_public_key(
                    cfg.jwt_rs256_public_key, cfg.jwt_rs256_public_key_file
                ),
                issuer=cfg.jwt_issuer,
                audience=cfg.jwt_audience,
                leeway_s=cfg.jwt_leeway_s,
                tenant_claim=cfg.jwt_tenant_claim,
                roles_claim=cfg.jwt_roles_claim,
                max_token_bytes=cfg.max_token_bytes,
            )
        )
        guard = RequestGuard(
            self.auth,
            limiter,
            tenant_limits,
            Limit(cfg.anon_burst, cfg.anon_rate),
            cfg.proxies,
        )
        self.gateway = Gateway(self.fleet, self.events, self.cache, route_policy)
        view = BridgeGraphQL(
            build_schema(cfg.max_query_depth, cfg.max_query_tokens, cfg.max_aliases),
            self.gateway,
            guard,
            Limits(cfg.max_body_bytes, cfg.max_query_bytes),
            load_graphiql_html(),
            connection_init_timeout_s=cfg.ws_connection_init_timeout_s,
            answers=self.answers if cfg.answer_cache else None,
        )
        # Built here, not in start(): tests drive it in process (Starlette's TestClient).
        ops = OperatorGuard(self.auth, static_authenticator(cfg.platform_tokens()))
        self.asgi: ASGIApp = build_asgi(view, self.health, ops, cfg.max_header_bytes)
        self.http: HttpServer | None = None

    @property
    def http_port(self) -> int:
        return self.http.port if self.http else 0

    # -- health --------------------------------------------------------------------------------
    def health(self) -> HealthReport:
        """The one health report: Redis, Foghorn's breakers, Signalman, auth mode, figures."""
        cfg = self.config
        detail: dict[str, object] = {}
        rh = self.redis_health
        if rh is None:
            detail["redis"] = "embedded"
            redis = Dependency("redis", "memory")
        else:
            detail["redis"] = "up" if rh.up else "down"
            if not rh.up:
                detail["redis_error"] = rh.last_error[:200]
            redis = Dependency(
                "redis",
                "redis",
                Status.OK if rh.up else Status.DEGRADED,
                "" if rh.up else f"down: {rh.last_error[:200]}",
            )
        breakers = self.fleet.state()
        # Open = failing fast right now; half-open = the next call probes Foghorn again.
        open_ = sorted(addr for addr, state in breakers.items() if state == "open")
        detail["foghorn"] = {"breakers": breakers} if cfg.foghorn_addresses else "unconfigured"
        foghorn = Dependency(
            "foghorn",
            "grpc" if cfg.foghorn_addresses else "none",
            Status.DEGRADED if open_ else Status.OK,
            f"breaker open for {', '.join(open_)}" if open_ else "",
        )
        detail["signalman"] = "configured" if cfg.signalman_addresses else "unconfigured"
        # Subscriptions fail one by one with their own error; queries and routing go on.
        signalman = Dependency(
            "signalman", "grpc" if cfg.signalman_addresses else "none", critical=False
        )
        detail["auth"] = "jwt" if self.auth.enabled else "anonymous-only"
        return HealthReport.of(
            "bridge",
            cfg.replica_id,
            [redis, foghorn, signalman],
            _figures(self.cache.stats, self.answers, breakers),
            detail,
            stopping=self.lifecycle.stopping,
        )

    # -- lifecycle -----------------------------------------------------------------------------
    async def start(self) -> None:
        lc = self.lifecycle
        if self.redis is not None:
            lc.on_stop(_quietly, self.redis.aclose)  # last out
        lc.on_stop(_quietly, self.fleet.close)
        lc.on_stop(_quietly, self.events.close)
        lc.on_stop(self.cache.close)
        if self.redis_health is not None:
            await self.redis_health.probe()
            lc.spawn(self.redis_health.run(), "redis-probe")
        self.http = HttpServer(self.asgi, self.config.http)
        await self.http.start()
        lc.on_stop(self.http.stop, 0.0)  # drained by stop() already; here after a failed start
        log.info(
            "bridge_started",
            replica=self.config.replica_id,
            port=self.http_port,
            redis=bool(self.config.redis_url),
        )

    async def stop(self, grace: float = 5.0) -> None:
        """Stop taking work, then undo what ``start`` did, newest first: health says not
        serving at once, open requests finish for up to ``grace`` seconds, then the Redis
        probe, the cache, the backends and the Redis client close."""
        self.lifecycle.stopping = True
        if self.http is not None:
            await self.http.stop(grace)
        await self.lifecycle.close()
        log.info("bridge_stopped", replica=self.config.replica_id)


async def _quietly(close: Callable[[], Awaitable[object]]) -> None:
    """A backend that fails to close must not keep the rest of the stop from running."""
    with contextlib.suppress(Exception):
        await close()


def _figures(
    stats: CacheStats, answers: AnswerCache, breakers: dict[str, str]
) -> dict[str, Figure]:
    """The handful of numbers a status view (./dev up) shows on one line."""
    # A kept answer stands for the lookups it skipped: counted as one hit.
    lookups = sum(stats.by_status.values()) + answers.hits
    from_cache = stats.hits + stats.stale + stats.negative + answers.hits
    return {
        "requests": sum(RESPONSES_BY_STATUS.values()),
        "http_5xx": sum(n for status, n in RESPONSES_BY_STATUS.items() if status >= 500),
        "cache_hit_rate": round(from_cache / lookups, 3) if lookups else 0.0,
        "breakers_open": f"{sum(v != 'closed' for v in breakers.values())}/{len(breakers)}",
    }
