"""The Redis key schema of one Foghorn cluster.

Every key carries the hash tag ``{<cluster>}`` so a cluster's keys share one slot (the Lua
scripts touch several of them atomically, which Redis Cluster allows only within a slot).

| key                                   | type   | TTL                         |
|---------------------------------------|--------|-----------------------------|
| ``foghorn:{c}:node:<id>``             | hash   | record_ttl_s, each write    |
| ``foghorn:{c}:log:<replica>``         | stream | trimmed to changelog_maxlen;|
|   (+ ``:seq``, its entry counter)     |        | record_ttl_s, heartbeat     |
| ``foghorn:{c}:logs``                  | zset   | none (members pruned after  |
|   (replica -> last heartbeat, s)      |        | record_ttl_s without one)   |
| ``foghorn:{c}:logs:new``              | stream | trimmed to ~100 (wake-ups)  |
| ``foghorn:{c}:owner:<id>``            | string | ownership_ttl_s, each report|
| ``foghorn:{c}:fence``                 | string | none (the fence counter)    |
| ``foghorn:{c}:fencehw:<id>``          | string | 1 day after last ownership  |
| ``foghorn:{c}:leader`` (+ ``:epoch``) | string | lease_ttl_s (epoch: none)   |
|   (+ ``:hold`` after a store data loss)|        | lease_ttl_s (pkg.coord.lease)|
| ``foghorn:{c}:replica:<id>``          | string | 3 x lease_renew_s, renewed  |
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Keys:
    cluster: str = "default"

    def __post_init__(self) -> None:
        if not self.cluster or any(c in self.cluster for c in "{}:* "):
            raise ValueError(f"cluster name {self.cluster!r} must be non-empty, without {{}}:* ")

    @property
    def base(self) -> str:
        return f"foghorn:{{{self.cluster}}}"

    def node(self, node_id: str) -> str:
        return f"{self.base}:node:{node_id}"

    @property
    def node_pattern(self) -> str:
        return f"{self.base}:node:*"

    def node_id_of(self, key: str) -> str:
        return key[len(self.base) + len(":node:") :]

    def log(self, replica_id: str) -> str:
        """The changelog stream ``replica_id`` appends to (one per replica)."""
        return f"{self.base}:log:{replica_id}"

    @property
    def logs(self) -> str:
        """The registry of replicas' changelog streams: replica id -> last heartbeat."""
        return f"{self.base}:logs"

    @property
    def logs_watch(self) -> str:
        """Wake-ups for readers: a replica whose stream is new to the registry says so here."""
        return f"{self.base}:logs:new"

    @property
    def ownership_prefix(self) -> str:
        return self.base

    def owner(self, node_id: str) -> str:
        return f"{self.base}:owner:{node_id}"

    def replica(self, replica_id: str) -> str:
        return f"{self.base}:replica:{replica_id}"

    @property
    def leader(self) -> str:
        return f"{self.base}:leader"
