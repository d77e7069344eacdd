"""Foghorn HA: several replicas sharing state through Redis (RFC: docs/rfcs/foghorn-ha.md).

- ``ownership``: fenced ownership of node control streams; ``owned_fleet`` applies it to
  every node-facing fleet call (ABORTED when ownership is lost).
- ``leader``: the leader lease that guards the stale-node reaper (and orphan marking).
- ``relay``: admin commands forwarded to the replica owning the node's stream.
- ``replicas``: one live process per replica id.
- ``telemetry``: OpenTelemetry instruments.
- ``runtime``: wires the above together for the server when ``FOGHORN_REDIS_URL`` is set
  (``build_store``, ``HaRuntime``).

The Redis store lives with the other backends, with everything it needs to stay in step with
the other replicas (``store/keys.py``: the key schema; ``store/merge.py``: merge rules;
``store/health.py``: degraded-mode tracking; ``store/sync.py``: the changelog reader and
tail-first rehydration). ``ha`` uses the store; the store never imports ``ha``.
"""
