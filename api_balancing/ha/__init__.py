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
- ``runtime``: wires the above together for the server when ``FOGHORN_REDIS_URL`` is set
  (``build_store``, ``HaRuntime``).

The Redis store itself lives with the other backends: ``api_balancing/store/redis_store.py``.
"""
