"""Foghorn HA's metrics (exported on /metrics with the service's others).

Gauges and counters are read from the runtime's own figures at scrape time (``register``,
called by the server's wiring: no cost on the hot path). The sync lag histogram is recorded
by the sync loop itself, per applied changelog entry (``store.sync.sync_lag``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, Protocol

from pkg.common.metrics import Metrics, Sample


class Described(Protocol):
    """A replica's HA runtime as these metrics read it (``ha.runtime.HaRuntime``)."""

    @property
    def replica_id(self) -> str: ...
    def describe(self) -> dict[str, Any]: ...


def _field(name: str) -> Callable[[Described], Iterable[Sample]]:
    def read(runtime: Described) -> Iterable[Sample]:
        return [({"replica": runtime.replica_id}, runtime.describe()[name])]

    return read


def _flag(name: str) -> Callable[[Described], Iterable[Sample]]:
    def read(runtime: Described) -> Iterable[Sample]:
        doc = runtime.describe()
        value = doc[name] if name != "status" else doc["status"] == "ok"
        return [({"replica": runtime.replica_id}, int(bool(value)))]

    return read


_GAUGES = (
    ("foghorn_ha_in_sync", _flag("status"), "1 when in sync with Redis, 0 degraded"),
    ("foghorn_ha_leader", _flag("leader"), "1 while this replica holds the lease"),
    ("foghorn_ha_owned_nodes", _field("owned_nodes"), "Node streams owned here"),
)
_COUNTERS = (
    ("foghorn_ha_rehydrations_total", "rehydrations", "Tail-first rehydrations (start, gaps)"),
    ("foghorn_ha_takeovers_total", "takeovers", "Streams closed: another replica took over"),
    ("foghorn_ha_writes_rejected_total", "writes_rejected", "Writes refused by fencing"),
    ("foghorn_ha_writes_deferred_total", "writes_deferred", "Writes kept in memory, degraded"),
    ("foghorn_ha_remote_applied_total", "remote_applied", "Other replicas' changes applied"),
    ("foghorn_ha_remote_stale_total", "remote_stale", "Other replicas' changes dropped, stale"),
    ("foghorn_ha_relayed_total", "relayed", "Admin calls relayed to the owner replica"),
)


def register(registry: Metrics, runtime: Described) -> None:
    """Report ``runtime``'s figures (kept weakly: a stopped runtime drops out)."""
    for name, read, text in _GAUGES:
        registry.gauge(name, text, read, ("replica",), runtime)
    for name, key, text in _COUNTERS:
        registry.counter(name, text, _field(key), ("replica",), runtime)
