"""Bridge configuration: ``BRIDGE_*`` environment variables read by the one loader.

Every setting is listed, with its default, in docs/bridge.md (one table); a ``BRIDGE_*``
variable that is not one of them stops the process at start (``load_config``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from pkg.common.app import EVENT_LOOPS
from pkg.common.auth import Principal, parse_tokens, tokens_from_env
from pkg.common.config import ServiceSettings, load_settings
from pkg.common.forwarded import TrustedProxies
from pkg.common.httpserver import HttpSettings
from pkg.common.tls import TlsSettings

DOCS = "docs/bridge.md#configuration"


@dataclass(frozen=True)
class BridgeConfig(ServiceSettings):
    """Every setting of a Bridge replica; empty ``redis_url`` means embedded (in-memory) state."""

    http_host: str = "127.0.0.1"
    http_port: int = 8080
    foghorn_addresses: list[str] = field(default_factory=list)
    signalman_addresses: list[str] = field(default_factory=list)
    signalman_tokens: str = ""  # one Signalman credential per tenant: "acme=tok1,globex=tok2"
    foghorn_token: str = ""
    # Platform tokens (PLATFORM_TOKENS syntax; empty: $PLATFORM_TOKENS): only an operator's
    # opens /metrics and the full /health (api_gateway.ops); GraphQL callers use JWTs.
    tokens: str = ""
    backend_timeout_s: float = 2.0
    redis_url: str = ""
    redis_prefix: str = "bridge"
    redis_timeout_s: float = 0.5
    # The event loop: uvloop (libuv) spends about a quarter less CPU than asyncio's own per
    # request (docs/rfcs/bridge-state.md, capacity); "asyncio" is the fallback.
    event_loop: str = "uvloop"

    # JWT: at least one key. HS256 with a shared secret, RS256 with a PEM public key (inline or
    # a file path). Issuer and audience are always checked.
    jwt_hs256_secret: str = ""
    jwt_rs256_public_key: str = ""
    jwt_rs256_public_key_file: str = ""
    jwt_issuer: str = "platform"
    jwt_audience: str = "bridge"
    jwt_leeway_s: float = 5.0
    jwt_tenant_claim: str = "tenant"
    jwt_roles_claim: str = "roles"

    # Rate limits (token buckets: burst capacity, refill per second).
    tenant_burst: int = 100
    tenant_rate: float = 50.0
    tenant_limits: str = ""  # overrides: "acme=500/200,small=10/1"
    tenant_limits_ttl_s: float = 30.0
    anon_burst: int = 20
    anon_rate: float = 5.0
    # Load balancers whose X-Forwarded-For names the client (CIDRs; pkg.common.forwarded).
    trusted_proxies: str = ""

    # Cache lifetimes (seconds).
    cache_ttl_s: float = 5.0
    cache_stale_s: float = 30.0
    cache_negative_ttl_s: float = 2.0
    cache_error_grace_s: float = 60.0
    route_cache_ttl_s: float = 1.0
    cache_lock_ttl_s: float = 5.0
    cache_local_size: int = 1000
    xfetch_beta: float = 1.0
    # Whole answers of repeated queries, read with the rate-limit charge (bridge.answers).
    answer_cache: bool = True

    # Request limits.
    max_query_depth: int = 8
    max_query_tokens: int = 2000
    max_aliases: int = 30
    max_query_bytes: int = 16_384
    max_body_bytes: int = 65_536
    max_token_bytes: int = 4096
    max_header_bytes: int = 16_384

    # Subscriptions (WebSocket): a tenant's subscriptions on one replica share one Signalman
    # stream; past the cap a new one fails with SUBSCRIPTION_LIMIT. A subscription more than
    # subscription_buffer events behind is ended (SLOW_SUBSCRIBER).
    max_subscriptions_per_tenant: int = 100
    subscription_buffer: int = 256
    ws_connection_init_timeout_s: float = 10.0

    tls: TlsSettings = field(default_factory=TlsSettings)  # PLATFORM_TLS_* (docs/tls.md)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 < self.http_port < 65536:
            raise ValueError(f"http_port must be 1..65535, got {self.http_port}")
        for name in (
            "tenant_burst", "anon_burst", "max_query_depth", "max_query_bytes",
            "max_subscriptions_per_tenant", "subscription_buffer",
        ):  # fmt: skip
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        TrustedProxies.parse(self.trusted_proxies)  # raises naming the bad entry
        if self.event_loop not in EVENT_LOOPS:
            raise ValueError(f"event_loop must be one of {', '.join(EVENT_LOOPS)}")
        for name in ("tenant_rate", "anon_rate", "cache_ttl_s", "backend_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0")

    @property
    def proxies(self) -> TrustedProxies:
        return TrustedProxies.parse(self.trusted_proxies)

    def platform_tokens(self) -> dict[str, Principal]:
        """The platform bearer tokens this replica knows: ``BRIDGE_TOKENS``, else
        ``$PLATFORM_TOKENS`` (the same spec and parser as every service)."""
        return parse_tokens(self.tokens) if self.tokens else tokens_from_env()

    @property
    def http(self) -> HttpSettings:
        """The listener: GraphQL over HTTP and WebSocket, whose frames may be no larger than an
        HTTP body (close 1009 past it); open requests get 5 s to finish at stop."""
        return HttpSettings(
            self.http_host,
            self.http_port,
            ws="websockets-sansio",
            ws_max_size=self.max_body_bytes,
            graceful_s=5.0,
            tls=self.tls,
        )


def load_config(env: Mapping[str, str] | None = None, **overrides: Any) -> BridgeConfig:
    """The process's config: unknown ``BRIDGE_*``/``PLATFORM_*`` variables refused, every value
    validated (``ConfigError`` names the variable)."""
    return load_settings(BridgeConfig, "BRIDGE", env, docs=DOCS, **overrides)
