"""Foghorn's configuration: ``FOGHORN_<FIELD>`` environment variables (pkg.common.config).

Every setting is listed, with its default, in docs/foghorn.md (one table); a variable named
``FOGHORN_*`` that is not one of them stops the process at start (``load_config``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from api_balancing.scoring import Weights
from api_balancing.store.keys import Keys
from pkg.common.app import EVENT_LOOPS
from pkg.common.auth import Principal, parse_tokens, tokens_from_env
from pkg.common.config import ServiceSettings, load_settings
from pkg.common.forwarded import TrustedProxies
from pkg.common.listeners import GrpcServiceListeners
from pkg.common.tls import TlsSettings

DOCS = "docs/foghorn.md#configuration-foghorn_-environment-variables"

# FOGHORN_* variables read by Foghorn's command-line tools, not by the service: a shell that
# exports them for foghorn-admin may start a replica too.
TOOL_SETTINGS = frozenset({"FOGHORN_ADDR", "FOGHORN_TOKEN"})


@dataclass(frozen=True)
class HaConfig:
    """HA settings (used when ``redis_url`` is set), also ``FOGHORN_<FIELD>`` variables;
    defaults follow the upstream Go Foghorn."""

    cluster: str = "default"  # key namespace: replicas of one cluster share it
    changelog_maxlen: int = 10_000  # entries kept in the changelog stream
    changelog_exact_trim: bool = False  # exact MAXLEN (tests with tiny bounds)
    record_ttl_s: float = 3600.0  # node hash TTL, refreshed on each write
    ownership_ttl_s: float = 15.0  # owner record TTL, refreshed on reports
    lease_ttl_s: float = 15.0  # leader lease TTL
    lease_renew_s: float = 5.0  # leader lease renewal period
    redis_timeout_s: float = 2.0  # per Redis operation
    sync_block_ms: int = 1000  # changelog XREAD BLOCK
    # Under sustained report traffic write batches leave at most this often: bigger batches
    # cost less CPU per report, at the price of up to this much sync lag under load.
    write_linger_ms: float = 5.0
    # Bearer token replicas relay commands with: a credential with the replica role (default:
    # the one accepted token that has that role; never any other).
    relay_token: str = ""
    relay_timeout_s: float = 5.0
    # Membership and rebalancing (ha.membership): the replica list is read, nodes are told of
    # changes and an uneven split is corrected this often (0: never rebalance), moving at most
    # rebalance_batch nodes per round per replica.
    rebalance_interval_s: float = 1.0
    rebalance_batch: int = 10

    def __post_init__(self) -> None:
        Keys(self.cluster)  # validates the name
        if not (math.isfinite(self.rebalance_interval_s) and 0 <= self.rebalance_interval_s <= 60):
            raise ValueError(
                f"rebalance_interval_s must be within 0..60, got {self.rebalance_interval_s}"
            )
        if not 1 <= self.rebalance_batch <= 10_000:
            raise ValueError(f"rebalance_batch must be within 1..10000, got {self.rebalance_batch}")
        for name in ("record_ttl_s", "ownership_ttl_s", "lease_ttl_s", "lease_renew_s"):
            value = getattr(self, name)
            if not math.isfinite(value) or value <= 0:
                raise ValueError(f"{name} must be a positive number, got {value}")
        if self.lease_renew_s >= self.lease_ttl_s:
            raise ValueError("lease_renew_s must be shorter than lease_ttl_s")
        if self.changelog_maxlen < 1:
            raise ValueError("changelog_maxlen must be >= 1")
        if not 10 <= self.sync_block_ms <= 60_000:
            raise ValueError("sync_block_ms must be within 10..60000")
        if not (math.isfinite(self.write_linger_ms) and 0 <= self.write_linger_ms <= 100):
            raise ValueError(f"write_linger_ms must be within 0..100, got {self.write_linger_ms}")


@dataclass(frozen=True)
class FoghornConfig(ServiceSettings, GrpcServiceListeners):
    """Every knob of a Foghorn process. Validated at construction (bad values fail start-up)."""

    host: str = "127.0.0.1"
    # Where other replicas reach this one (relay target in its ownership records): default
    # ``host``; needed when ``host`` is a wildcard (0.0.0.0, ::), which nobody can connect to.
    advertise_host: str = ""
    grpc_port: int = 18008
    http_port: int = 18080  # 0 picks a free port; -1 disables the HTTP side
    tokens: str = ""  # PLATFORM_TOKENS syntax; empty: use $PLATFORM_TOKENS
    # Trust limits (docs/security.md): anonymous routing per client address (IPv6: per /64),
    # pending redirects one address may account for, streams per credential, registration.
    anon_routes_per_s: float = 50.0
    anon_route_burst: int = 100
    redirects_per_client: int = 4
    # Load balancers whose X-Forwarded-For (HTTP header, gRPC metadata) names the client:
    # comma-separated CIDRs (pkg.common.forwarded); empty: every peer is the client itself.
    trusted_proxies: str = ""
    max_streams_per_credential: int = 1000
    register_timeout_s: float = 5.0
    weight_cpu: float = 500.0
    weight_ram: float = 500.0
    weight_bandwidth: float = 1000.0
    weight_geo: float = 1000.0
    stream_bonus: float = 50.0
    stale_after_s: float = 90.0
    evict_after_s: float = 300.0
    reap_interval_s: float = 5.0
    redirect_window_s: float = 30.0
    redirect_bps: float = 2_500_000.0  # bandwidth one pending viewer is assumed to take
    report_interval_s: float = 5.0  # what nodes are told to use
    # The event loop: uvloop (libuv) or asyncio's own; see docs/rfcs/foghorn-ha.md, capacity.
    event_loop: str = "asyncio"
    command_timeout_s: float = 5.0
    # A stopping replica tells its nodes where to reconnect and waits this long for their
    # streams to move before closing the rest.
    handover_s: float = 3.0
    # After health says not serving, a replica with peers keeps answering this long before its
    # gRPC server stops accepting: callers that check health (pkg.clients' active checks, a load
    # balancer) have moved away by then, so no call arrives as the server shuts down (grpc
    # cancels those: pkg.clients retries an idempotent one on another replica, not the others).
    drain_delay_s: float = 1.0
    max_message_bytes: int = 1024 * 1024
    routing_event_sample: float = 0.01  # fraction of routing decisions emitted as events
    geoip_file: str = ""  # CSV: cidr,latitude,longitude[,label]
    redis_url: str = ""  # HA: shared state in Redis (empty: embedded in-memory state)
    kafka_bootstrap: str = ""  # platform events to Kafka
    # Without Kafka: platform events go to Signalman's Publish RPC (its embedded mode) through
    # pkg.clients, with a token holding the `system` role. Neither set: events are dropped.
    signalman_addresses: list[str] = field(default_factory=list)
    signalman_token: str = ""
    ha: HaConfig = field(default_factory=HaConfig)  # FOGHORN_CLUSTER, FOGHORN_LEASE_TTL_S ...
    tls: TlsSettings = field(default_factory=TlsSettings)  # PLATFORM_TLS_* (docs/tls.md)
    # With TLS: also serve plaintext on this port while callers move to TLS (-1: no).
    grpc_plaintext_port: int = -1

    def __post_init__(self) -> None:
        super().__post_init__()
        self.check_listeners("FOGHORN_")
        for name in (
            "weight_cpu",
            "weight_ram",
            "weight_bandwidth",
            "weight_geo",
            "stream_bonus",
        ):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {value}")
        for name in (
            "stale_after_s",
            "evict_after_s",
            "reap_interval_s",
            "redirect_window_s",
            "report_interval_s",
            "command_timeout_s",
            "anon_routes_per_s",
            "register_timeout_s",
            "handover_s",
        ):
            value = getattr(self, name)
            if not math.isfinite(value) or value <= 0:
                raise ValueError(f"{name} must be a positive number, got {value}")
        if not (math.isfinite(self.drain_delay_s) and 0 <= self.drain_delay_s <= 30):
            raise ValueError(f"drain_delay_s must be within 0..30, got {self.drain_delay_s}")
        if not math.isfinite(self.redirect_bps) or self.redirect_bps < 0:
            raise ValueError(f"redirect_bps must be >= 0, got {self.redirect_bps}")
        if not 0.0 <= self.routing_event_sample <= 1.0:
            raise ValueError(
                f"routing_event_sample must be in 0..1, got {self.routing_event_sample}"
            )
        TrustedProxies.parse(self.trusted_proxies)  # raises naming the bad entry
        if self.event_loop not in EVENT_LOOPS:
            raise ValueError(f"event_loop must be one of {', '.join(EVENT_LOOPS)}")
        for name in ("anon_route_burst", "redirects_per_client", "max_streams_per_credential"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.signalman_addresses and not self.signalman_token and not self.kafka_bootstrap:
            raise ValueError("signalman_addresses needs signalman_token (a `system` credential)")
        if self.redis_url and not self.advertise_host and self.host in ("0.0.0.0", "::", ""):
            raise ValueError(
                f"host {self.host!r} listens everywhere but cannot be relayed to: set "
                "FOGHORN_ADVERTISE_HOST to the address other replicas reach this one at"
            )

    @property
    def weights(self) -> Weights:
        return Weights(
            cpu=self.weight_cpu,
            ram=self.weight_ram,
            bandwidth=self.weight_bandwidth,
            geo=self.weight_geo,
            stream_bonus=self.stream_bonus,
        )

    @property
    def proxies(self) -> TrustedProxies:
        return TrustedProxies.parse(self.trusted_proxies)

    def platform_tokens(self) -> dict[str, Principal]:
        """The bearer tokens this replica accepts: ``FOGHORN_TOKENS``, else the platform-wide
        ``$PLATFORM_TOKENS`` (parsed by ``pkg.common.auth``, like every service does)."""
        return parse_tokens(self.tokens) if self.tokens else tokens_from_env()


def load_config(env: Mapping[str, str] | None = None, **overrides: Any) -> FoghornConfig:
    """The process's config: unknown ``FOGHORN_*``/``PLATFORM_*`` variables refused, every
    value validated (``ConfigError`` names the variable)."""
    return load_settings(
        FoghornConfig, "FOGHORN", env, also_known=TOOL_SETTINGS, docs=DOCS, **overrides
    )
