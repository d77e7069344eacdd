"""Wiring of Foghorn HA for one replica (used by ``api_balancing.server`` when
``FOGHORN_REDIS_URL`` is set): Redis store, ownership, relay, leader lease and reaper.

HA settings are ``FOGHORN_*`` variables too, in their own section of the config
(``FoghornConfig.ha``, ``api_balancing.config.HaConfig``).
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import structlog

from api_balancing.config import FoghornConfig, HaConfig
from api_balancing.fleet import Fleet
from api_balancing.ha.leader import leader_reaper
from api_balancing.ha.membership import Membership
from api_balancing.ha.owned_fleet import OwnedFleet
from api_balancing.ha.ownership import NodeOwnership
from api_balancing.ha.partition import PartitionHandover
from api_balancing.ha.relay import Relay, RelayServicer
from api_balancing.ha.replicas import ReplicaClaim
from api_balancing.sessions import SessionRegistry
from api_balancing.store.redis_store import REDIS_ERRORS, RedisNodeStore, RedisStoreSettings
from pkg.common.auth import REPLICA
from pkg.common.clock import SYSTEM_CLOCK, Clock
from pkg.common.config import ConfigError
from pkg.common.grpcserver import ServiceBinding
from pkg.common.tls import grpc_channel_credentials
from pkg.coord import LeaderLease
from pkg.proto.foghorn.v1 import relay_pb2_grpc as relay_grpc

log = structlog.get_logger("foghorn.ha")


def build_store(config: FoghornConfig) -> RedisNodeStore:
    """The Redis store for ``config`` (the server calls this when ``redis_url`` is set)."""
    ha = config.ha
    return RedisNodeStore(
        config.redis_url,
        RedisStoreSettings(
            replica_id=config.replica_id,
            cluster=ha.cluster,
            changelog_maxlen=ha.changelog_maxlen,
            exact_trim=ha.changelog_exact_trim,
            record_ttl_s=ha.record_ttl_s,
            op_timeout_s=ha.redis_timeout_s,
            read_block_ms=ha.sync_block_ms,
            linger_s=ha.write_linger_ms / 1000,
        ),
    )


def relay_token(config: FoghornConfig) -> str:
    """The token replicas call each other with: ``FOGHORN_RELAY_TOKEN``, else the one accepted
    token whose credential has the ``replica`` role. Never a node's or an operator's token: the
    relay's receiving side accepts the replica role only. Raises ``ConfigError`` when there is
    no such credential (HA without a relay cannot deliver commands across replicas)."""
    tokens = config.platform_tokens()
    wanted = config.ha.relay_token
    if wanted:
        principal = tokens.get(wanted)
        if principal is None or not principal.has_role(REPLICA):
            raise ConfigError(
                "FOGHORN_RELAY_TOKEN: not an accepted token with the replica role "
                "(replicas of a cluster accept the same tokens)"
            )
        return wanted
    candidates = [t for t, p in tokens.items() if p.has_role(REPLICA)]
    if len(candidates) != 1:
        raise ConfigError(
            "FOGHORN_RELAY_TOKEN: HA needs the relay credential; set it, or give exactly one "
            f"accepted token the replica role ({len(candidates)} have it)"
        )
    return candidates[0]


class HaRuntime:
    """Everything HA for one replica; ``start(address)`` once the gRPC port is known."""

    def __init__(
        self,
        config: FoghornConfig,
        store: RedisNodeStore,
        fleet: Fleet,
        sessions: SessionRegistry,
        *,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        self.config = config
        self.ha: HaConfig = config.ha
        self.store = store
        self.fleet = fleet
        self.ownership = NodeOwnership(store, sessions, self.ha.ownership_ttl_s, clock=clock)
        self.relay = Relay(
            config.replica_id,
            sessions,
            fleet,
            self.ownership,
            relay_token(config),
            self.ha.relay_timeout_s,
            credentials=grpc_channel_credentials(config.tls),
        )
        self.relay_servicer = RelayServicer(sessions, fleet, self.ownership, self.reaches_redis)
        self.owned_fleet = OwnedFleet(fleet, self.ownership, self.relay)
        self.lease = LeaderLease(
            store.redis,
            store.keys.leader,
            config.replica_id,
            ttl_s=self.ha.lease_ttl_s,
            renew_every_s=self.ha.lease_renew_s,
            clock=clock,
        )
        store.set_delete_guard(self.lease.guard)
        # Renewed at least every second (TTL 3 s): the claim is also the membership peers read,
        # and a replica that died must drop out of it before peers move nodes to it.
        membership_s = self.ha.rebalance_interval_s or 1.0
        self.replica_claim = ReplicaClaim(
            store.redis,
            store.keys.replica(config.replica_id),
            config.replica_id,
            min(self.ha.lease_renew_s, membership_s),
            clock=clock,
        )
        self.membership = Membership(
            store,
            store.keys,
            config.replica_id,
            sessions,
            lambda node_id: self.ownership.fence_of(node_id) is not None,
            interval_s=membership_s,
            batch=self.ha.rebalance_batch,
            rebalance=self.ha.rebalance_interval_s > 0,
            hold_s=self.replica_claim.ttl_s,
            clock=clock,
        )
        self.ownership.on_unreleased(self.membership.suspect)
        # Half the ownership TTL: the nodes of a replica cut from Redis move to a peer before
        # their owner records lapse there (relays and routing keep finding them).
        self.partition = PartitionHandover(
            config.replica_id,
            store.healthy,
            lambda: self.membership.replicas,
            sessions,
            self.relay.ask_store_reachable,
            after_s=self.ha.ownership_ttl_s / 2,
            clock=clock,
        )
        self.reaper, self.orphans = leader_reaper(
            self.lease, fleet, self.ownership, config.reap_interval_s, clock=clock
        )
        self._tasks: list[asyncio.Task[Any]] = []

    @property
    def replica_id(self) -> str:
        return self.config.replica_id

    def binding(self) -> ServiceBinding:
        """The internal relay service, mounted on the replica's gRPC server."""
        return ServiceBinding(
            relay_grpc.add_RelayServicer_to_server, self.relay_servicer, "foghorn.v1.Relay"
        )

    async def start(self, address: str) -> None:
        """Begin owning streams as ``address`` (where other replicas relay to)."""
        self.ownership.address = address
        await self.replica_claim.claim(address)  # refuses a second process with this id
        self._tasks = [
            asyncio.create_task(self.replica_claim.run(), name="foghorn-replica-claim"),
            asyncio.create_task(self.lease.run(), name="foghorn-lease"),
            asyncio.create_task(self.reaper.run(), name="foghorn-reaper"),
            asyncio.create_task(self.membership.run(), name="foghorn-membership"),
            asyncio.create_task(self.partition.run(), name="foghorn-partition"),
        ]
        log.info("foghorn HA started", replica=self.config.replica_id, address=address)

    async def reaches_redis(self) -> bool:
        """What this replica answers a peer asking whether it reaches Redis (``ha.partition``):
        in sync, and a PING answered now."""
        if not self.store.healthy():
            return False
        try:
            await asyncio.wait_for(self.store.redis.ping(), self.ha.redis_timeout_s)
        except REDIS_ERRORS:
            return False
        return True

    async def withdraw(self) -> list[str]:
        """The first step of a stop: leave the membership (peers stop moving nodes here and
        drop this replica from the list they give nodes); the peers' addresses to hand this
        replica's nodes to, least loaded first."""
        await self.replica_claim.release()
        return await self.membership.withdraw()

    async def stop(self) -> None:
        """Release what this replica holds so others need not wait for TTLs."""
        await self.store.flush()  # staged reports land while the ownership is still ours
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(BaseException):
                await task
        self._tasks.clear()
        for node_id in self.ownership.owned():
            with contextlib.suppress(Exception):
                await self.ownership.release(node_id)
        await self.replica_claim.release()
        await self.relay.close()

    def describe(self) -> dict[str, Any]:
        """The HA part of /health."""
        status = self.store.health.status
        lease = self.lease.state
        loop = self.store.sync_loop
        c = self.store.counters
        return {
            "status": "ok" if status.ok else "degraded",
            "reason": status.reason,
            "since": status.since,
            "cluster": self.ha.cluster,
            "leader": bool(lease),
            "leader_epoch": lease.epoch if lease else None,
            "owned_nodes": len(self.ownership.owned()),
            "takeovers": self.ownership.takeovers,
            "rehydrations": loop.rehydrations if loop else 0,
            "last_rehydrate_s": round(loop.last_rehydrate_s, 3) if loop else 0.0,
            "last_gap": loop.last_gap if loop else "",
            "sync_lag_p99_ms": round(loop.lag_ms.percentile(0.99), 2) if loop else 0.0,
            "writes": c.writes,
            "writes_rejected": c.writes_rejected,
            "writes_deferred": c.writes_deferred,
            "writes_staged": self.store.staging.staged,
            "writes_coalesced": self.store.staging.coalesced,
            "write_waits": self.store.staging.waits,
            "write_batches": c.batches,
            "remote_applied": c.remote_applied,
            "remote_stale": c.remote_stale,
            "republished": c.republished,
            "relayed": self.relay.relayed,
            "relay_delivered": self.relay_servicer.delivered,
            **self.membership.describe(),
            "partition": self.partition.describe(),
        }
