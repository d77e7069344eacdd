"""Foghorn's OpenTelemetry instruments (exported on /metrics by pkg.common.telemetry)."""

from __future__ import annotations

from opentelemetry import metrics

_meter = metrics.get_meter("foghorn")

reports = _meter.create_counter(
    "foghorn_reports", description="Load reports received, by result (accepted/rejected)"
)
rejected_fields = _meter.create_counter(
    "foghorn_reports_rejected_by_field", description="Rejected load reports by offending field"
)
routing = _meter.create_counter(
    "foghorn_routing_decisions", description="Routing decisions by kind and result"
)
routing_seconds = _meter.create_histogram(
    "foghorn_routing_decision_seconds", unit="s", description="Server-side routing decision time"
)
commands = _meter.create_counter(
    "foghorn_commands", description="Commands sent to nodes, by outcome"
)
control_streams = _meter.create_up_down_counter(
    "foghorn_control_streams", description="Open node control streams on this replica"
)
