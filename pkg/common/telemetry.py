"""The one telemetry setup: an OpenTelemetry MeterProvider exported as Prometheus text.

Code records metrics through ``opentelemetry.metrics.get_meter(...)`` (the API's global proxy),
so libraries such as ``pkg.clients`` need no wiring; a service process calls ``setup_metrics``
once and serves ``prometheus_text()`` on ``/metrics``.
"""

from __future__ import annotations

import threading

from opentelemetry import metrics
from opentelemetry.exporter.prometheus import PrometheusMetricReader
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.resources import Resource
from prometheus_client import REGISTRY, generate_latest

_lock = threading.Lock()
_provider: MeterProvider | None = None

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def setup_metrics(service: str) -> MeterProvider:
    """Install the process-wide MeterProvider (idempotent: later calls return the first one)."""
    global _provider
    with _lock:
        if _provider is None:
            reader = PrometheusMetricReader()
            _provider = MeterProvider(
                metric_readers=[reader],
                resource=Resource.create({"service.name": service}),
            )
            metrics.set_meter_provider(_provider)
        return _provider


def prometheus_text() -> bytes:
    """Every metric of this process in the Prometheus text format."""
    return generate_latest(REGISTRY)
