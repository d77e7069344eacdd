"""Foghorn HA: several replicas sharing state through Redis (RFC: docs/rfcs/foghorn-ha.md).

- ``keys``: the Redis key schema (one hash tag per cluster).
- ``merge``: pure merge rules for records coming from other replicas.
- ``health``: degraded-mode tracking (reason, since when) for /health.
- ``sync``: the changelog reader loop and tail-first rehydration.
- ``ownership``: fenced ownership of node control streams; ``owned_fleet`` applies it to
  every node-facing fleet call (ABORTED when ownership is lost).
- ``leader``: the leader lease that guards the stale-node reaper (and orphan marking).
- ``relay``: admin commands forwarded to the replica owning the node's stream.
- ``replicas``: one live process per replica id.
- ``telemetry``: OpenTelemetry instruments.
- ``runtime``: wires the above together for the server when ``FOGHORN_REDIS_URL`` is set.

The Redis store itself lives with the other backends: ``api_balancing/store/redis_store.py``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from api_balancing.config import FoghornConfig
    from api_balancing.store.redis_store import RedisNodeStore


def build_store(config: FoghornConfig) -> RedisNodeStore:
    """The Redis store for ``config`` (imported lazily: the store imports ``ha`` modules)."""
    from api_balancing.ha.runtime import build_store as build

    return build(config)


def __getattr__(name: str) -> Any:
    if name in {"HaConfig", "HaRuntime"}:
        from api_balancing.ha import runtime

        return getattr(runtime, name)
    raise AttributeError(name)


__all__ = ["HaConfig", "HaRuntime", "build_store"]
