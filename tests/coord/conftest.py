"""Fixtures for the coordination primitives: a Redis client on the session server, and a key
prefix unique to each test so tests share the server without seeing each other's keys."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis

from pkg.devstack.servers import RedisServer


@pytest.fixture
async def redis(redis_server: RedisServer) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(redis_server.url, decode_responses=True)
    try:
        yield client
    finally:
        await client.aclose()


@pytest.fixture
def prefix() -> str:
    return f"t:{uuid.uuid4().hex[:10]}"
