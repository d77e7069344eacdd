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
        client = connect(redis_server.url)
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
