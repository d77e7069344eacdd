"""Which event sink a producer gets: Kafka when a bootstrap is configured, else Signalman's
Publish RPC when Signalman's addresses are, else nothing."""

from __future__ import annotations

from collections.abc import Sequence

from pkg.common.tls import PLAINTEXT, TlsSettings, grpc_channel_credentials
from pkg.events.kafka import KafkaSink
from pkg.events.signalman import SignalmanSink
from pkg.events.sink import ManagedSink, NullSink


def build_sink(
    kafka_bootstrap: str | None,
    *,
    source: str = "",
    signalman_addresses: Sequence[str] = (),
    signalman_token: str = "",
    tls: TlsSettings = PLAINTEXT,
) -> ManagedSink:
    """The sink a service should use. Both non-blocking with a bounded buffer: Kafka (the HA
    platform: Signalman's consumer group reads the topic) or Signalman's Publish RPC (the
    embedded platform, no Kafka: events still reach subscribers)."""
    if kafka_bootstrap:
        return KafkaSink(kafka_bootstrap, source=source)
    if signalman_addresses:
        return SignalmanSink(
            signalman_addresses,
            signalman_token,
            source=source,
            credentials=grpc_channel_credentials(tls),
        )
    return NullSink()
