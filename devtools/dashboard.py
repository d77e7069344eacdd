"""The Grafana dashboard as code: ``python -m devtools.dashboard`` writes
deploy/grafana/platform.json (a test fails when the committed file differs from this).

One row per service (Foghorn, Bridge, Signalman), one for every caller's ``pkg.clients``, and one
for the horizontal-scaling RFC's phase checks: what an operator watches to say a phase is done
(docs/rfcs/horizontal-scaling.md). Every expression must parse and name only metrics the services
export (tests/obs/test_exports.py).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "deploy" / "grafana" / "platform.json"

Panel = tuple[str, str, list[tuple[str, str]]]  # title, unit, [(expr, legend)]

ROWS: list[tuple[str, list[Panel]]] = [
    ("Foghorn", [
        ("Routing decisions /s", "reqps", [
            ("sum by (instance, result) (rate(foghorn_routing_decisions_total[1m]))",
             "{{instance}} {{result}}")]),
        ("Routing decision p99", "s", [
            ("job:foghorn_routing_decision_seconds:p99_5m", "p99")]),
        ("Load reports /s", "reqps", [
            ("sum by (instance, result) (rate(foghorn_reports_total[1m]))",
             "{{instance}} {{result}}")]),
        ("Nodes", "short", [
            ("sum by (instance, state) (foghorn_nodes)", "{{instance}} {{state}}"),
            ("sum by (instance) (foghorn_control_streams)", "{{instance}} streams")]),
        ("Events to Kafka", "short", [
            ("sum by (instance) (rate(events_sent_total[1m]))", "{{instance}} sent/s"),
            ("sum by (instance) (events_buffered)", "{{instance}} buffered"),
            ("sum by (instance) (increase(events_dropped_total[5m]))",
             "{{instance}} dropped (5m)")]),
    ]),
    ("Bridge", [
        ("Responses /s by status", "reqps", [
            ("sum by (status) (rate(bridge_http_responses_total[1m]))", "{{status}}")]),
        ("5xx ratio", "percentunit", [("job:bridge_http_5xx:ratio_rate5m", "5xx")]),
        ("Rate-limit decisions /s", "reqps", [
            ("sum by (decision, mode) (rate(bridge_ratelimit_decisions_total[1m]))",
             "{{decision}} ({{mode}})")]),
        ("Cache", "reqps", [
            ("sum by (result) (rate(bridge_cache_requests_total[1m]))", "{{result}}"),
            ("sum(rate(bridge_cache_backend_calls_total[1m]))", "backend loads")]),
    ]),
    ("Signalman", [
        ("Records processed /s", "reqps", [
            ("sum by (instance) (rate(signalman_records_processed_total[1m]))", "{{instance}}"),
            ("job:signalman_events_appended:rate1m", "appended (all)")]),
        ("Consumer lag", "short", [
            ("sum by (partition) (signalman_consumer_lag)", "p{{partition}}")]),
        ("Event age p99 by stage", "s", [
            ("histogram_quantile(0.99, sum by (stage, le) "
             "(rate(signalman_event_age_seconds_bucket[5m])))", "{{stage}}")]),
        ("Subscribers", "short", [
            ("sum by (instance) (signalman_subscribers)", "{{instance}}"),
            ("sum(increase(signalman_subscribers_dropped_total[10m]))", "dropped (10m)")]),
        ("Dead letters and fenced writes", "short", [
            ("sum(increase(signalman_dead_lettered_total[10m]))", "dead-lettered (10m)"),
            ("sum(increase(signalman_fenced_writes_total[10m]))", "fenced (10m)")]),
    ]),
    ("Callers (pkg.clients)", [
        ("Call p99 by target", "s", [
            ("histogram_quantile(0.99, sum by (job, target, le) "
             "(rate(client_call_duration_seconds_bucket[5m])))", "{{job}} -> {{target}}")]),
        ("Attempts per call", "short", [
            ("sum by (job, target) (rate(client_attempts_total[5m])) "
             "/ sum by (job, target) (rate(client_calls_total[5m]))", "{{job}} -> {{target}}")]),
        ("Breakers (2 = open)", "short", [
            ("max by (job, breaker) (client_breaker_state)", "{{job}} {{breaker}}")]),
    ]),
    ("RFC phase checks", [
        # Phase 0: every call goes through pkg.clients (their callers show up here).
        ("Phase 0: calls through pkg.clients /s", "reqps", [
            ("sum by (job, target) (rate(client_calls_total[1m]))", "{{job}} -> {{target}}")]),
        # Phase 1: Foghorn HA: every replica in sync, exactly one leader, sync lag in ms.
        ("Phase 1: Foghorn replicas in sync / leaders", "short", [
            ("sum(foghorn_ha_in_sync)", "in sync"), ("sum(foghorn_ha_leader)", "leaders"),
            ("count(up{job=\"foghorn\"} == 1)", "replicas up")]),
        ("Phase 1: sync lag p99", "s", [("job:foghorn_ha_sync_lag_seconds:p99_5m", "p99")]),
        # Phase 2: Bridge state in Redis: rate limits shared (local = Redis unreachable).
        ("Phase 2: Bridge rate limits shared vs local", "reqps", [
            ("sum by (mode) (rate(bridge_ratelimit_decisions_total[1m]))", "{{mode}}")]),
        # Phase 3: Signalman scales through the group: partitions' lag, one singleton, no fence.
        ("Phase 3: Signalman singleton leaders / lag", "short", [
            ("sum(signalman_singleton_leader)", "singleton leaders"),
            ("job:signalman_consumer_lag:sum", "lag")]),
        # Phase 5: stores fail over: clients that followed a primary change.
        ("Phase 5: store failovers followed", "short", [
            ("sum by (job) (increase(redis_client_failovers_total[10m]))", "{{job}}")]),
        ("Firing alerts", "short", [("sum by (alertname) (ALERTS{alertstate=\"firing\"})",
                                     "{{alertname}}")]),
    ]),
]  # fmt: skip


def build() -> dict[str, Any]:
    """The dashboard document (Grafana's JSON model, schema 39)."""
    panels: list[dict[str, Any]] = []
    next_id = 1
    y = 0
    for row_title, row_panels in ROWS:
        panels.append({"type": "row", "title": row_title, "id": next_id, "collapsed": False,
                       "gridPos": {"h": 1, "w": 24, "x": 0, "y": y}, "panels": []})  # fmt: skip
        next_id += 1
        y += 1
        for i, (title, unit, targets) in enumerate(row_panels):
            panels.append({
                "type": "timeseries",
                "title": title,
                "id": next_id,
                "datasource": {"type": "prometheus", "uid": "${datasource}"},
                "gridPos": {"h": 8, "w": 8, "x": (i % 3) * 8, "y": y + (i // 3) * 8},
                "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
                "targets": [
                    {"refId": chr(ord("A") + j), "expr": expr, "legendFormat": legend}
                    for j, (expr, legend) in enumerate(targets)
                ],
            })  # fmt: skip
            next_id += 1
        y += ((len(row_panels) + 2) // 3) * 8
    return {
        "title": "HA platform",
        "uid": "ha-platform",
        "schemaVersion": 39,
        "version": 1,
        "time": {"from": "now-1h", "to": "now"},
        "refresh": "10s",
        "tags": ["ha-platform"],
        "templating": {
            "list": [
                {
                    "name": "datasource",
                    "type": "datasource",
                    "query": "prometheus",
                    "label": "Prometheus",
                }
            ]
        },
        "panels": panels,
    }


def render() -> str:
    return json.dumps(build(), indent=2) + "\n"


def expressions(doc: dict[str, Any]) -> list[str]:
    """Every PromQL expression of a dashboard document."""
    return [t["expr"] for p in doc["panels"] for t in p.get("targets", [])]


def main(argv: list[str] | None = None) -> int:
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(render())
    print(f"wrote {OUT.relative_to(ROOT)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
