"""Wiring: build a Bridge replica (stores, cache, limiter, backends, ASGI app) from its config.

``redis_url`` empty: embedded mode, in-memory cache and buckets (one replica). Set: HA mode,
shared through Redis, with the in-memory stores as the degraded fallback while Redis is down.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import structlog
from starlette.applications import Starlette

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
from api_gateway.schema import build_schema
from api_gateway.service import Gateway
from bridge.cache import CachePolicy, CacheStats, ResponseCache
from bridge.ratelimit import RateLimiter
from bridge.store import BucketStore, CacheStore
from bridge.store.health import RedisHealth
from bridge.store.memory import MemoryBucketStore, MemoryCacheStore
from bridge.tenant_limits import CachedLimits, ConfigLimitsProvider, parse_overrides
from bridge.token_bucket import Limit
from pkg.common.clock import SYSTEM_CLOCK, Clock

log = structlog.get_logger("bridge")


@dataclass
class Replica:
    """One Bridge replica's parts, for the process and for tests."""

    config: BridgeConfig
    app: Starlette
    gateway: Gateway
    cache: ResponseCache
    health: RedisHealth | None
    closers: list[Any] = field(default_factory=list)


def _fleet_backend(cfg: BridgeConfig) -> FleetBackend:
    if not cfg.foghorn_addresses:
        return NoFleet()
    from api_gateway.foghorn_backend import FoghornFleet

    return FoghornFleet(cfg.foghorn_addresses, cfg.backend_timeout_s, cfg.foghorn_token or None)


def _events_backend(cfg: BridgeConfig) -> EventsBackend:
    if not cfg.signalman_addresses:
        return NoEvents()
    from api_gateway.signalman_backend import SignalmanEvents, parse_tenant_tokens

    return SignalmanEvents(cfg.signalman_addresses, parse_tenant_tokens(cfg.signalman_tokens))


def build_replica(
    cfg: BridgeConfig,
    fleet: FleetBackend | None = None,
    events: EventsBackend | None = None,
    clock: Clock = SYSTEM_CLOCK,
) -> Replica:
    """Everything one replica needs; backends default to the configured Foghorn/Signalman."""
    replica_id = cfg.replica_id
    fleet = fleet if fleet is not None else _fleet_backend(cfg)
    events = events if events is not None else _events_backend(cfg)

    health: RedisHealth | None = None
    cache_store: CacheStore
    bucket_store: BucketStore | None
    closers: list[Any] = []
    if cfg.redis_url:
        from bridge.store.redis_store import RedisBucketStore, RedisCacheStore, connect

        client = connect(cfg.redis_url, cfg.redis_timeout_s)
        health = RedisHealth(client, clock)
        cache_store = RedisCacheStore(client, health, cfg.redis_prefix)
        bucket_store = RedisBucketStore(client, health, cfg.redis_prefix)
        closers.append(client)
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
    cache = ResponseCache(
        cache_store,
        policy=policy,
        clock=clock,
        xfetch_beta=cfg.xfetch_beta,
        lock_ttl_s=cfg.cache_lock_ttl_s,
        # A lock holder slower than one backend deadline has failed (or is paused): waiters
        # then load themselves instead of stalling on it until the lock expires.
        lock_wait_s=min(cfg.cache_lock_ttl_s, cfg.backend_timeout_s + 0.5),
        local_size=cfg.cache_local_size if cfg.redis_url else 0,
    )
    if health is not None:
        health.on_recover(cache.flush_pending)

    limiter = RateLimiter(bucket_store, MemoryBucketStore(clock))
    tenant_limits = CachedLimits(
        ConfigLimitsProvider(
            Limit(cfg.tenant_burst, cfg.tenant_rate), parse_overrides(cfg.tenant_limits)
        ),
        ttl_s=cfg.tenant_limits_ttl_s,
        clock=clock,
    )
    auth = JwtAuthenticator(
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
        auth,
        limiter,
        tenant_limits,
        Limit(cfg.anon_burst, cfg.anon_rate),
        cfg.trust_forwarded_for,
    )
    # A tenant's subscriptions share one Signalman stream per replica (and are capped).
    shared_events = SharedEvents(events, cfg.max_subscriptions_per_tenant, cfg.subscription_buffer)
    gateway = Gateway(fleet, shared_events, cache, route_policy)
    view = BridgeGraphQL(
        build_schema(cfg.max_query_depth, cfg.max_query_tokens, cfg.max_aliases),
        gateway,
        guard,
        Limits(cfg.max_body_bytes, cfg.max_query_bytes),
        load_graphiql_html(),
        connection_init_timeout_s=cfg.ws_connection_init_timeout_s,
    )

    async def health_report() -> dict[str, Any]:
        redis_state = "embedded" if health is None else ("up" if health.up else "down")
        state = getattr(fleet, "state", None)
        breakers = state() if callable(state) else {}
        # Open = failing fast right now; half-open = the next call probes Foghorn again.
        foghorn_open = any(v == "open" for v in breakers.values())
        body: dict[str, Any] = {
            "status": "degraded" if redis_state == "down" or foghorn_open else "ok",
            "replica": replica_id,
            "redis": redis_state,
            "foghorn": {"breakers": breakers} if cfg.foghorn_addresses else "unconfigured",
            "signalman": "configured" if cfg.signalman_addresses else "unconfigured",
            "auth": "jwt" if auth.enabled else "anonymous-only",
        }
        if health is not None and not health.up:
            body["redis_error"] = health.last_error[:200]
        body["figures"] = _figures(cache.stats, breakers)
        return body

    app = build_asgi(view, health_report, cfg.max_header_bytes)
    replica = Replica(cfg, app, gateway, cache, health, closers)
    app.router.lifespan_context = _lifespan(replica, fleet, shared_events)
    return replica


def _figures(stats: CacheStats, breakers: dict[str, str]) -> dict[str, Any]:
    """The handful of numbers a status view (./dev up) shows on one line."""
    lookups = sum(stats.by_status.values())
    from_cache = stats.hits + stats.stale + stats.negative  # answered without a backend call
    return {
        "requests": sum(RESPONSES_BY_STATUS.values()),
        "http_5xx": sum(n for status, n in RESPONSES_BY_STATUS.items() if status >= 500),
        "cache_hit_rate": round(from_cache / lookups, 3) if lookups else 0.0,
        "breakers_open": f"{sum(v != 'closed' for v in breakers.values())}/{len(breakers)}",
    }


def _lifespan(replica: Replica, fleet: Any, events: Any) -> Any:
    @contextlib.asynccontextmanager
    async def lifespan(_: Starlette) -> AsyncIterator[None]:
        probe: asyncio.Task[None] | None = None
        if replica.health is not None:
            await replica.health.probe()
            probe = asyncio.create_task(replica.health.run())
        log.info(
            "bridge_started",
            replica=replica.config.replica_id,
            port=replica.config.http_port,
            redis=bool(replica.config.redis_url),
        )
        try:
            yield
        finally:
            if probe is not None:
                probe.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await probe
            await replica.cache.close()
            for backend in (fleet, events):
                close = getattr(backend, "close", None)
                if close is not None:
                    with contextlib.suppress(Exception):
                        await close()
            for client in replica.closers:
                with contextlib.suppress(Exception):
                    await client.aclose()

    return lifespan
