"""Foghorn's metrics: hot-path figures read at scrape time, rare events as OpenTelemetry counters.

Reports, routing decisions and their latency, and the fleet size are read from the fleet's own
counters when /metrics is scraped (``register``, called by the server's wiring), so a routing
decision or a load report costs no instrument call (an OpenTelemetry ``add`` is about 10 us
here; the latency histogram's ``observe`` is a bisect). Rare events (rejected fields, commands)
use plain OpenTelemetry counters.
"""

from __future__ import annotations

from collections.abc import Iterable

from opentelemetry import metrics

from api_balancing.fleet import Fleet
from api_balancing.limits import AddressLimiter
from pkg.common.metrics import HistogramSample, Metrics, Sample

_meter = metrics.get_meter("foghorn")


def _replica(f: Fleet) -> dict[str, str]:
    return {"replica": f.settings.replica_id}


def _reports(f: Fleet) -> Iterable[Sample]:
    c = f.counters
    return [
        ({**_replica(f), "result": "accepted"}, c.reports_accepted),
        ({**_replica(f), "result": "rejected"}, c.reports_rejected),
    ]


def _decisions(f: Fleet) -> Iterable[Sample]:
    c = f.counters
    ok = c.routing_decisions - c.routing_failures
    return [
        ({**_replica(f), "result": "ok"}, ok),
        ({**_replica(f), "result": "none"}, c.routing_failures),
    ]


def _latency(f: Fleet) -> Iterable[HistogramSample]:
    return [(_replica(f), f.route_latency.buckets)]


def _nodes(f: Fleet) -> Iterable[Sample]:
    records = f.store.snapshot()
    connected = sum(1 for r in records if r.connected)
    return [
        ({**_replica(f), "state": "connected"}, connected),
        ({**_replica(f), "state": "disconnected"}, len(records) - connected),
    ]


def register(registry: Metrics, fleet: Fleet) -> None:
    """Report ``fleet``'s figures on /metrics (for as long as it lives)."""
    registry.counter(
        "foghorn_reports_total", "Load reports by result", _reports,
        ("replica", "result"), fleet,
    )  # fmt: skip
    registry.counter(
        "foghorn_routing_decisions_total", "Routing decisions by result", _decisions,
        ("replica", "result"), fleet,
    )  # fmt: skip
    registry.histogram(
        "foghorn_routing_decision_seconds",
        "Server-side routing decision time (validation, ranking, reply)",
        _latency, ("replica",), fleet,
    )  # fmt: skip
    registry.gauge("foghorn_nodes", "Known nodes by state", _nodes, ("replica", "state"), fleet)


def register_limits(registry: Metrics, limiter: AddressLimiter, replica_id: str) -> None:
    """Report the anonymous routing calls ``limiter`` refused (gRPC and /play together)."""
    registry.counter(
        "foghorn_anonymous_limited_total",
        "Anonymous routing calls (RouteViewer, RouteIngest, /play) refused by the address limit",
        lambda lim: [({"replica": replica_id}, lim.limited)], ("replica",), limiter,
    )  # fmt: skip


rejected_fields = _meter.create_counter(
    "foghorn_reports_rejected_by_field", description="Rejected load reports by offending field"
)
commands = _meter.create_counter(
    "foghorn_commands", description="Commands sent to nodes, by outcome"
)
control_streams = _meter.create_up_down_counter(
    "foghorn_control_streams", description="Open node control streams on this replica"
)
