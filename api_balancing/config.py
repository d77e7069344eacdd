"""Foghorn's configuration: ``FOGHORN_<FIELD>`` environment variables (pkg.common.config)."""

from __future__ import annotations

import math
import os
import socket
from dataclasses import dataclass

from api_balancing.scoring import Weights
from pkg.common.auth import Principal, parse_tokens, tokens_from_env


@dataclass
class FoghornConfig:
    """Every knob of a Foghorn process. Validated at construction (bad values fail start-up)."""

    host: str = "127.0.0.1"
    grpc_port: int = 18008
    http_port: int = 18080  # 0 picks a free port; -1 disables the HTTP side
    replica_id: str = ""  # default: <hostname>-<pid>
    tokens: str = ""  # PLATFORM_TOKENS syntax; empty: use $PLATFORM_TOKENS
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
    command_timeout_s: float = 5.0
    max_message_bytes: int = 1024 * 1024
    routing_event_sample: float = 0.01  # fraction of routing decisions emitted as events
    geoip_file: str = ""  # CSV: cidr,latitude,longitude[,label]
    redis_url: str = ""  # HA: shared state in Redis (empty: embedded in-memory state)
    kafka_bootstrap: str = ""  # platform events to Kafka (empty: events dropped)

    def __post_init__(self) -> None:
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
        ):
            value = getattr(self, name)
            if not math.isfinite(value) or value <= 0:
                raise ValueError(f"{name} must be a positive number, got {value}")
        if not math.isfinite(self.redirect_bps) or self.redirect_bps < 0:
            raise ValueError(f"redirect_bps must be >= 0, got {self.redirect_bps}")
        if not 0.0 <= self.routing_event_sample <= 1.0:
            raise ValueError(
                f"routing_event_sample must be in 0..1, got {self.routing_event_sample}"
            )
        if not 0 <= self.grpc_port <= 65535:
            raise ValueError(f"grpc_port out of range: {self.grpc_port}")
        if not -1 <= self.http_port <= 65535:
            raise ValueError(f"http_port out of range: {self.http_port}")
        if self.max_message_bytes < 1024:
            raise ValueError(f"max_message_bytes too small: {self.max_message_bytes}")
        if not self.replica_id:
            self.replica_id = f"{socket.gethostname()}-{os.getpid()}"

    @property
    def weights(self) -> Weights:
        return Weights(
            cpu=self.weight_cpu,
            ram=self.weight_ram,
            bandwidth=self.weight_bandwidth,
            geo=self.weight_geo,
            stream_bonus=self.stream_bonus,
        )

    def platform_tokens(self) -> dict[str, Principal]:
        """The bearer tokens this replica accepts: ``FOGHORN_TOKENS``, else the platform-wide
        ``$PLATFORM_TOKENS`` (parsed by ``pkg.common.auth``, like every service does)."""
        return parse_tokens(self.tokens) if self.tokens else tokens_from_env()
