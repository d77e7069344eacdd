"""OpenTelemetry instruments of Foghorn HA (exported on /metrics with the service's others).

Gauges and counters are observed from the runtimes' own counters at collection time (no cost
on the hot path); the sync lag is a histogram recorded per applied changelog entry (entry
time from its stream ID against this replica's clock).
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable
from typing import Any

from opentelemetry import metrics
from opentelemetry.metrics import CallbackOptions, Observation

_meter = metrics.get_meter("foghorn.ha")
_runtimes: weakref.WeakSet[Any] = weakref.WeakSet()

sync_lag = _meter.create_histogram(
    "foghorn_ha_sync_lag_seconds",
    unit="s",
    description="Time from a change's append on another replica to its apply here",
)


def _observe(field: str) -> Any:
    def callback(options: CallbackOptions) -> Iterable[Observation]:
        for runtime in list(_runtimes):
            yield Observation(runtime.describe()[field], {"replica": runtime.config.replica_id})

    return callback


def _flag(field: str) -> Any:
    def callback(options: CallbackOptions) -> Iterable[Observation]:
        for runtime in list(_runtimes):
            doc = runtime.describe()
            value = doc[field] if field != "status" else doc["status"] == "ok"
            yield Observation(int(bool(value)), {"replica": runtime.config.replica_id})

    return callback


_meter.create_observable_gauge(
    "foghorn_ha_in_sync", [_flag("status")], description="1 when in sync with Redis, 0 degraded"
)
_meter.create_observable_gauge(
    "foghorn_ha_leader", [_flag("leader")], description="1 while this replica holds the lease"
)
_meter.create_observable_gauge(
    "foghorn_ha_owned_nodes", [_observe("owned_nodes")], description="Node streams owned here"
)
for _name, _field, _help in (
    ("foghorn_ha_rehydrations", "rehydrations", "Tail-first rehydrations (start-up and gaps)"),
    ("foghorn_ha_takeovers", "takeovers", "Streams closed because another replica took over"),
    ("foghorn_ha_writes_rejected", "writes_rejected", "Writes refused by fencing"),
    ("foghorn_ha_writes_deferred", "writes_deferred", "Writes kept in memory while degraded"),
    ("foghorn_ha_remote_applied", "remote_applied", "Other replicas' changes applied"),
    ("foghorn_ha_remote_stale", "remote_stale", "Other replicas' changes dropped as stale"),
    ("foghorn_ha_relayed", "relayed", "Admin calls relayed to the owner replica"),
):
    _meter.create_observable_counter(_name, [_observe(_field)], description=_help)


def register(runtime: Any) -> None:
    """Report ``runtime``'s figures (kept weakly: a stopped runtime drops out)."""
    _runtimes.add(runtime)
