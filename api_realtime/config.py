"""Signalman's configuration, read from ``SIGNALMAN_*`` environment variables by the one loader.

Every setting is listed, with its default, in docs/signalman.md (one table); a ``SIGNALMAN_*``
variable that is not one of them stops the process at start (``load_config``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from pkg.common.config import ServiceSettings, load_settings
from pkg.common.listeners import GrpcServiceListeners
from pkg.common.tls import TlsSettings

DOCS = "docs/signalman.md#configuration"

# SIGNALMAN_* variables read by signalman-tail, not by the service.
TOOL_SETTINGS = frozenset({"SIGNALMAN_TARGETS", "SIGNALMAN_TOKEN"})

# Durations and sizes that only make sense above zero (a typo such as a negative timeout must
# stop the process at start with the variable's name, not misbehave later).
_POSITIVE = (
    "session_timeout_ms", "heartbeat_interval_ms", "history_maxlen", "history_retention_s",
    "max_channels_per_session", "max_message_bytes", "duties_interval_s", "history_wait_ms",
)  # fmt: skip
_NOT_NEGATIVE = ("fetch_max_wait_ms", "redrive_delay_s", "redrive_max_attempts")


@dataclass(frozen=True)
class SignalmanConfig(ServiceSettings, GrpcServiceListeners):
    """Every knob of a Signalman replica. Nothing set = embedded mode (memory, no Kafka)."""

    # Below Linux's ephemeral range (32768-60999): on a shared host a port in it can be held by
    # an outgoing connection (or its 60 s TIME_WAIT), and a restarted replica then cannot bind.
    grpc_port: int = 18070
    http_port: int = 8070  # 0 picks a free port; -1 disables the HTTP side
    host: str = "127.0.0.1"
    # Kafka: unset = embedded mode (events arrive through the Publish RPC).
    kafka_bootstrap: str = ""
    topic: str = "signalman.events"
    partitions: int = 4  # used only when the topic does not exist yet
    group_id: str = "signalman"
    session_timeout_ms: int = 10_000
    heartbeat_interval_ms: int = 1_000
    fetch_max_wait_ms: int = 20
    # At most one offset commit per interval (0: one per fetched batch); see consumer.py.
    commit_interval_ms: int = 100
    # PostgreSQL advisory locks fence partition ownership; unset = unfenced (single replica only).
    postgres_dsn: str = ""
    lock_grace_s: float = 2.0
    # Without a lock connection for this long, leave the consumer group so that replicas that
    # still reach PostgreSQL take the partitions over (0: stay in the group, never leave).
    lock_rejoin_after_s: float = 30.0
    # A group member whose lock connection's backend has been gone this long (its process died:
    # PostgreSQL sees the socket close at once) is removed from the group by the others, so its
    # partitions move without waiting for the session timeout (0: off); see membership.py.
    peer_evict_after_s: float = 1.0
    # Redis Streams history shared by replicas; unset = in-memory history of this replica.
    redis_url: str = ""
    redis_prefix: str = "sm"  # key namespace: deployments may share one Redis
    history_maxlen: int = 10_000
    history_retention_s: float = 86_400.0
    # Behind Sentinel: how long an append's WAIT may block for a replica's acknowledgement
    # before the history counts it unreplicated and reports itself lagging (one LAN round trip
    # normally; raise it for replicas across a slow link).
    history_wait_ms: int = 100
    # Subscribers.
    subscriber_buffer: int = 1_000
    max_connections_per_tenant: int = 100
    max_channels_per_session: int = 16
    max_message_bytes: int = 64 * 1024
    # Singleton duties.
    duties_interval_s: float = 5.0
    redrive_delay_s: float = 30.0
    redrive_max_attempts: int = 3
    tls: TlsSettings = field(default_factory=TlsSettings)  # PLATFORM_TLS_* (docs/tls.md)
    # With TLS: also serve plaintext on this port while callers move to TLS (-1: no).
    grpc_plaintext_port: int = -1

    def __post_init__(self) -> None:
        super().__post_init__()
        self.check_listeners("SIGNALMAN_")
        for name in _POSITIVE:
            value = getattr(self, name)
            if not value > 0:
                raise ValueError(f"{name} (SIGNALMAN_{name.upper()}) must be > 0, got {value!r}")
        for name in _NOT_NEGATIVE:
            value = getattr(self, name)
            if not value >= 0:
                raise ValueError(f"{name} (SIGNALMAN_{name.upper()}) must be >= 0, got {value!r}")
        if self.subscriber_buffer < 1:
            raise ValueError("subscriber_buffer must be >= 1")
        if self.max_connections_per_tenant < 1:
            raise ValueError("max_connections_per_tenant must be >= 1")
        if self.commit_interval_ms < 0:
            raise ValueError("commit_interval_ms must be >= 0")
        if self.partitions < 1:
            raise ValueError("partitions must be >= 1")
        if not self.lock_grace_s > 0:
            raise ValueError("lock_grace_s must be > 0")
        if not self.lock_rejoin_after_s >= 0:
            raise ValueError("lock_rejoin_after_s must be >= 0 (0: never leave the group)")
        if not self.peer_evict_after_s >= 0:
            raise ValueError(
                "peer_evict_after_s (SIGNALMAN_PEER_EVICT_AFTER_S) must be >= 0 (0: off)"
            )
        if self.heartbeat_interval_ms * 3 > self.session_timeout_ms:
            raise ValueError("heartbeat_interval_ms must be at most a third of session_timeout_ms")

    @property
    def dlq_topic(self) -> str:
        return f"{self.topic}.dlq"


def load_config(env: Mapping[str, str] | None = None, **overrides: Any) -> SignalmanConfig:
    """The process's config: unknown ``SIGNALMAN_*``/``PLATFORM_*`` variables refused, every
    value validated (``ConfigError`` names the variable)."""
    return load_settings(
        SignalmanConfig, "SIGNALMAN", env, also_known=TOOL_SETTINGS, docs=DOCS, **overrides
    )
