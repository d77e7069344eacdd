"""Fixtures for Foghorn HA: Redis stores of several 'replicas' in one process, record makers,
and bounded polling (no fixed sleeps)."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from api_balancing.model import GeoPoint, LoadReport, NodeIdentity, NodeRecord
from api_balancing.store.redis_store import RedisNodeStore, RedisStoreSettings
from pkg.clients import Policy
from pkg.clients.foghorn import FoghornClient
from tests.foghorn.conftest import TOKEN
from tests.waiting import eventually


def make_record(node_id: str, *, cpu: float = 10.0, fence: int = 0, owner: str = "") -> NodeRecord:
    return NodeRecord(
        identity=NodeIdentity(
            node_id=node_id,
            roles=frozenset({"edge"}),
            capabilities=frozenset({"hls"}),
            base_url=f"https://{node_id}.example",
            location=GeoPoint(52.0, 4.0),
            capacity=100,
        ),
        report=LoadReport(
            cpu_percent=cpu,
            ram_used_bytes=1,
            ram_max_bytes=10,
            upload_bps=0,
            download_bps=0,
            bandwidth_limit_bps=1_000_000_000,
        ),
        last_report_at=time.time(),
        owner=owner,
        owner_fence=fence,
    )


__all__ = ["eventually"]


@pytest.fixture
def cluster() -> str:
    return f"t{uuid.uuid4().hex[:8]}"


StoreFactory = Callable[..., Awaitable[RedisNodeStore]]


@pytest.fixture
async def store_factory(redis_server: Any, cluster: str) -> AsyncIterator[StoreFactory]:
    stores: list[RedisNodeStore] = []

    async def make(replica: str, url: str | None = None, **settings: Any) -> RedisNodeStore:
        opts = {"cluster": cluster, "read_block_ms": 200, "op_timeout_s": 1.0, **settings}
        store = RedisNodeStore(
            url or redis_server.url, RedisStoreSettings(replica_id=replica, **opts)
        )
        stores.append(store)
        await store.start()
        return store

    try:
        yield make
    finally:
        for store in stores:
            await store.close()


# -- in-process replicas (real gRPC on loopback, one shared redis-server) ----------------------

HA_ENV = {
    "FOGHORN_OWNERSHIP_TTL_S": "1.5",
    "FOGHORN_LEASE_TTL_S": "1.5",
    "FOGHORN_LEASE_RENEW_S": "0.3",
    "FOGHORN_SYNC_BLOCK_MS": "200",
    "FOGHORN_REDIS_TIMEOUT_S": "1.0",
}


@pytest.fixture(autouse=True)
def _instant_backoff() -> Any:
    from pkg.clients import set_testing

    set_testing(True)
    yield
    set_testing(False)


@pytest.fixture
async def make_replica(
    redis_server: Any, cluster: str, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[Callable[..., Awaitable[Any]]]:
    """In-process Foghorn replicas of one cluster (``FOGHORN_*`` HA env with short TTLs)."""
    from api_balancing.config import FoghornConfig, HaConfig
    from api_balancing.server import FoghornApp
    from pkg.common.config import load
    from pkg.events import MemorySink
    from tests.foghorn.conftest import TOKENS

    for key, value in {**HA_ENV, "FOGHORN_CLUSTER": cluster}.items():
        monkeypatch.setenv(key, value)
    servers: list[Any] = []

    async def make(replica_id: str, url: str | None = None, **overrides: Any) -> Any:
        config = FoghornConfig(
            grpc_port=0,
            http_port=-1,
            tokens=TOKENS,
            replica_id=replica_id,
            redis_url=url or redis_server.url,
            reap_interval_s=overrides.pop("reap_interval_s", 0.3),
            drain_delay_s=overrides.pop("drain_delay_s", 0.0),  # no caller checks health here
            ha=load(HaConfig, "FOGHORN"),
            **overrides,
        )
        server = FoghornApp(config, events=MemorySink())
        servers.append(server)
        await server.start()
        return server

    yield make
    for server in servers:
        if server.grpc is not None:
            await server.stop(grace=0.2)


@pytest.fixture
async def clients() -> AsyncIterator[Callable[[Any], FoghornClient]]:
    """Makes pkg.clients Foghorn clients (the test token) and closes them after the test."""
    made: list[FoghornClient] = []

    def make(target: Any) -> FoghornClient:
        client = FoghornClient(target, token=TOKEN, policy=Policy(timeout=10.0))
        made.append(client)
        return client

    yield make
    for client in made:
        await client.close()
