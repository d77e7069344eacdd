"""Foghorn's OpenTelemetry instruments (exported on /metrics by pkg.common.telemetry).

Hot-path figures (reports, routing decisions and their latency, fleet size) are observed at
scrape time from the fleet's own counters, so a routing decision or a load report costs no
instrument call at all (an OpenTelemetry ``add`` is about 10 us here). Rare events (rejected
fields, commands) use plain counters.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from opentelemetry import metrics
from opentelemetry.metrics import CallbackOptions, Observation

if TYPE_CHECKING:
    from api_balancing.fleet import Fleet

_meter = metrics.get_meter("foghorn")
_fleets: weakref.WeakSet[Fleet] = weakref.WeakSet()


def track(fleet: Fleet) -> None:
    """Report this fleet's figures on /metrics (for as long as it lives)."""
    _fleets.add(fleet)


def _observe(read: str) -> Callable[[CallbackOptions], Iterable[Observation]]:
    def callback(options: CallbackOptions) -> Iterable[Observation]:
        for fleet in list(_fleets):
            replica = fleet.settings.replica_id
            for attrs, value in _READERS[read](fleet):
                yield Observation(value, {"replica": replica, **attrs})

    return callback


def _reports(f: Fleet) -> list[tuple[dict[str, str], float]]:
    c = f.counters
    return [
        ({"result": "accepted"}, c.reports_accepted),
        ({"result": "rejected"}, c.reports_rejected),
    ]


def _decisions(f: Fleet) -> list[tuple[dict[str, str], float]]:
    c = f.counters
    ok = c.routing_decisions - c.routing_failures
    return [({"result": "ok"}, ok), ({"result": "none"}, c.routing_failures)]


def _latency(f: Fleet) -> list[tuple[dict[str, str], float]]:
    w = f.route_latency
    return [
        ({"quantile": "0.5"}, w.percentile(0.5) / 1e6),
        ({"quantile": "0.99"}, w.percentile(0.99) / 1e6),
    ]


def _nodes(f: Fleet) -> list[tuple[dict[str, str], float]]:
    records = f.store.snapshot()
    connected = sum(1 for r in records if r.connected)
    return [
        ({"state": "connected"}, connected),
        ({"state": "disconnected"}, len(records) - connected),
    ]


_READERS = {"reports": _reports, "decisions": _decisions, "latency": _latency, "nodes": _nodes}

_meter.create_observable_counter(
    "foghorn_reports", callbacks=[_observe("reports")], description="Load reports by result"
)
_meter.create_observable_counter(
    "foghorn_routing_decisions",
    callbacks=[_observe("decisions")],
    description="Routing decisions by result",
)
_meter.create_observable_gauge(
    "foghorn_routing_decision_seconds",
    callbacks=[_observe("latency")],
    unit="s",
    description="Server-side routing decision time over the last 10,000 decisions",
)
_meter.create_observable_gauge(
    "foghorn_nodes", callbacks=[_observe("nodes")], description="Known nodes by state"
)

rejected_fields = _meter.create_counter(
    "foghorn_reports_rejected_by_field", description="Rejected load reports by offending field"
)
commands = _meter.create_counter(
    "foghorn_commands", description="Commands sent to nodes, by outcome"
)
control_streams = _meter.create_up_down_counter(
    "foghorn_control_streams", description="Open node control streams on this replica"
)
