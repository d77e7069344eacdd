"""The one telemetry setup: OpenTelemetry metrics exported through the process's registry.

Code records rare events through ``opentelemetry.metrics.get_meter(...)`` (the API's global
proxy), so libraries such as ``pkg.clients`` need no wiring; hot-path figures are registered
with ``pkg.common.metrics`` by each app's wiring. A service process calls ``setup_metrics`` once
and serves ``prometheus_text()`` on ``/metrics``.
"""

from __future__ import annotations

from pkg.common import metrics
from pkg.common.metrics import CONTENT_TYPE, Metrics
from pkg.common.tracing import setup_tracing


def setup_metrics(service: str) -> Metrics:
    """Install the process-wide registry and MeterProvider (idempotent: later calls return the
    first one), and tracing when an exporter is configured (``pkg.common.tracing``): the one
    telemetry setup of every service."""
    setup_tracing(service)
    return metrics.setup(service)


def prometheus_text() -> bytes:
    """Every metric of this process in the Prometheus text format."""
    return metrics.process_metrics().text()


__all__ = ["CONTENT_TYPE", "prometheus_text", "setup_metrics"]
