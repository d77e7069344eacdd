"""Each store's coordination primitives satisfy the protocols services depend on, and behave
alike through them: a fence per acquisition that only grows, a fence check that refuses an
older fence."""

from __future__ import annotations

import uuid
from typing import Any

import redis.asyncio as aioredis

from pkg.coord.advisory import AdvisoryLease, PartitionLocks
from pkg.coord.fencing import FencedHash
from pkg.coord.lease import LeaderLease
from pkg.coord.ownership import OwnerClaims, Ownership
from pkg.coord.protocols import FenceCheck, FencedOwnership, Lease
from signalman.history.redis import RedisHistory


async def test_redis_and_postgres_ownership_issue_growing_fences(
    redis: aioredis.Redis, prefix: str, postgres_server: Any
) -> None:
    claims = OwnerClaims(Ownership(redis, prefix, ttl_ms=5000), "r1", "a:1")
    locks = PartitionLocks(postgres_server.dsn, f"r-{uuid.uuid4().hex[:6]}")
    await locks.connect()
    try:
        impls: list[FencedOwnership] = [claims, locks]
        for impl in impls:
            assert isinstance(impl, FencedOwnership)
            resource = f"t{uuid.uuid4().hex[:6]}/1"
            first = await impl.acquire_fenced(resource)
            second = await impl.acquire_fenced(resource)
            assert second > first
            await impl.release_resource(resource)
    finally:
        await locks.close()


async def test_redis_and_postgres_leases_have_epochs(
    redis: aioredis.Redis, prefix: str, postgres_server: Any
) -> None:
    locks = PartitionLocks(postgres_server.dsn, f"r-{uuid.uuid4().hex[:6]}")
    await locks.connect()
    try:
        leases: list[Lease] = [
            LeaderLease(redis, f"{prefix}:leader", "me", ttl_s=5, renew_every_s=1),
            AdvisoryLease(locks, f"duty-{uuid.uuid4().hex[:6]}"),
        ]
        for lease in leases:
            assert isinstance(lease, Lease)
            await lease.run_once()
            assert lease.is_leader() and (lease.epoch or 0) >= 1
            assert await lease.release()
            assert not lease.is_leader()
    finally:
        await locks.close()


async def test_fence_checks_refuse_an_older_fence(redis: aioredis.Redis, prefix: str) -> None:
    history = RedisHistory("", prefix=prefix, client=redis)
    await history.claim("ev", 0, 7)
    await redis.hset(f"{prefix}:state", mapping={"_fence": "7"})
    checks: list[tuple[FenceCheck, str]] = [
        (history, "ev/0"),
        (FencedHash(redis), f"{prefix}:state"),
    ]
    for check, resource in checks:
        assert isinstance(check, FenceCheck)
        assert await check.check_fence(resource, 7)
        assert await check.check_fence(resource, 8)
        assert not await check.check_fence(resource, 6)
