"""Fixtures for Bridge tests: Redis-backed stores on the session redis-server, namespaced."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest
import redis.asyncio as aioredis

from bridge.store.health import RedisHealth
from bridge.store.redis_store import RedisBucketStore, RedisCacheStore, connect


@dataclass
class RedisReplica:
    """What one Bridge replica holds: its own client and health, the shared key prefix."""

    client: aioredis.Redis
    health: RedisHealth
    cache_store: RedisCacheStore
    bucket_store: RedisBucketStore


@pytest.fixture
def prefix() -> str:
    return f"test-{secrets.token_hex(4)}"


@pytest.fixture
async def replicas(redis_server, prefix) -> AsyncIterator[list[RedisReplica]]:
    """Two replicas' worth of Redis stores, each with its own connection pool."""
    out = []
    for _ in range(2):
        # A generous timeout: on a loaded test machine a slow reply must not look like an outage
        # (outage tests make their own clients with short timeouts).
        client = connect(redis_server.url, timeout_s=5.0)
        health = RedisHealth(client)
        out.append(
            RedisReplica(
                client,
                health,
                RedisCacheStore(client, health, prefix),
                RedisBucketStore(client, health, prefix),
            )
        )
    yield out
    for r in out:
        await r.client.aclose()


# -- end-to-end: a real Foghorn and Bridge processes ------------------------------------------
import sys  # noqa: E402

from pkg.devstack.servers import free_port  # noqa: E402
from tests.bridge.fakes import SECRET  # noqa: E402
from tests.bridge.stack import FOGHORN_TOKEN  # noqa: E402


@dataclass
class FoghornProc:
    proc: object
    grpc_port: int
    http_port: int

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}/metrics"


@pytest.fixture
def foghorn(process_factory) -> FoghornProc:
    grpc_port, http_port = free_port(), free_port()
    proc = process_factory(
        "foghorn",
        [sys.executable, "-m", "api_balancing", "--grpc-port", str(grpc_port),
         "--http-port", str(http_port), "--replica-id", "fog-1"],
        env={
            "PLATFORM_TOKENS": f"{FOGHORN_TOKEN}=bridge:operator|node;nodes=*;tenants=*",
            "FOGHORN_REDIS_URL": "",
        },
        port=grpc_port,
    )  # fmt: skip
    return FoghornProc(proc, grpc_port, http_port)


def bridge_env(redis_url: str, prefix: str, foghorn_port: int, **extra: str) -> dict[str, str]:
    env = {
        "BRIDGE_REDIS_URL": redis_url,
        "BRIDGE_REDIS_PREFIX": prefix,
        "BRIDGE_REDIS_TIMEOUT_S": "5",  # loaded CI machine: slow is not down
        "BRIDGE_FOGHORN_ADDRESSES": f"127.0.0.1:{foghorn_port}",
        "BRIDGE_FOGHORN_TOKEN": FOGHORN_TOKEN,
        # The same token opens Bridge's /metrics and full /health (operators only).
        "BRIDGE_TOKENS": f"{FOGHORN_TOKEN}=bridge-ops:operator",
        "BRIDGE_JWT_HS256_SECRET": SECRET,
        "BRIDGE_TENANT_BURST": "100000",
        "BRIDGE_TENANT_RATE": "100000",
        "BRIDGE_ROUTE_CACHE_TTL_S": "30",
        "BRIDGE_CACHE_TTL_S": "30",
        "LOG_LEVEL": "WARNING",
    }
    env.update(extra)
    return env


@pytest.fixture
def start_bridges(process_factory):
    """``start_bridges(env)`` -> the ports of two Bridge replicas sharing ``env``."""

    def start(env: dict[str, str], count: int = 2) -> list[int]:
        ports = []
        for i in range(count):
            proc = process_factory(
                f"bridge-{i}",
                [sys.executable, "-m", "api_gateway", "--port", "{port}", "--id", f"bridge-{i}"],
                env=env,
            )
            start.procs.append(proc)
            ports.append(proc.port)
        return ports

    start.procs = []  # the CommandProcess of each replica, for tests that kill one
    return start
