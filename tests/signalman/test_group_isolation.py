"""Consumer groups sharing one PostgreSQL never lock, fence or evict each other, and a replica
only ever terminates its own group's lock sessions (real PostgreSQL)."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import asyncpg
import pytest

from signalman.ownership import LockBusy, PartitionLocks

pytestmark = pytest.mark.integration


@pytest.fixture
async def make_locks(postgres_server: Any) -> AsyncIterator[Callable[..., PartitionLocks]]:
    made: list[PartitionLocks] = []

    def make(owner: str, group: str) -> PartitionLocks:
        locks = PartitionLocks(postgres_server.dsn, owner, group=group, grace_s=0.2)
        made.append(locks)
        return locks

    try:
        yield make
    finally:
        for locks in made:
            await locks.close()


async def test_two_groups_own_the_same_partition_with_their_own_fences(
    make_locks: Callable[..., PartitionLocks],
) -> None:
    topic = f"t-{uuid.uuid4().hex[:8]}"
    blue, green = make_locks("r1", "blue"), make_locks("r1", "green")
    await blue.connect()
    await green.connect()
    assert await blue.acquire_partition(topic, 0) == 1
    # Same topic and partition, another group: no waiting, no eviction, its own fence.
    assert await green.acquire_partition(topic, 0, timeout_s=1.0) == 1
    assert await green.bump(topic, 0) == 2 and await blue.bump(topic, 0) == 2
    assert blue.evictions == green.evictions == 0
    assert blue.connected and green.connected


async def test_a_groups_first_fence_is_above_the_group_less_one(
    make_locks: Callable[..., PartitionLocks], postgres_server: Any
) -> None:
    """Upgrading to group-scoped fences never issues a fence lower than one recorded before."""
    topic = f"t-{uuid.uuid4().hex[:8]}"
    legacy = make_locks("old", "")
    await legacy.connect()
    for _ in range(5):
        await legacy.bump(topic, 2)
    scoped = make_locks("new", "signalman")
    await scoped.connect()
    assert await scoped.acquire_partition(topic, 2, timeout_s=1.0) == 6


async def test_a_foreign_backend_holding_the_key_is_never_terminated(
    make_locks: Callable[..., PartitionLocks], postgres_server: Any
) -> None:
    topic = f"t-{uuid.uuid4().hex[:8]}"
    locks = make_locks("r1", "blue")
    await locks.connect()
    key = locks.partition_key(topic, 1)
    foreign = await asyncpg.connect(
        postgres_server.dsn, server_settings={"application_name": "billing-batch"}
    )
    try:
        assert await foreign.fetchval("SELECT pg_try_advisory_lock($1)", key)
        with pytest.raises(LockBusy):
            await locks.acquire_partition(topic, 1, timeout_s=1.0)
        assert locks.evictions == 0
        assert await foreign.fetchval("SELECT 1") == 1  # still alive, still holding
    finally:
        await foreign.close()


async def test_another_groups_session_is_never_terminated(
    make_locks: Callable[..., PartitionLocks],
) -> None:
    """Even holding a colliding key, a session of another group is not ours to evict."""
    topic = f"t-{uuid.uuid4().hex[:8]}"
    blue, green = make_locks("r1", "blue"), make_locks("r2", "green")
    await blue.connect()
    await green.connect()
    assert await green.try_lock(blue.partition_key(topic, 0))  # as if two names collided
    with pytest.raises(LockBusy):
        await blue.acquire_partition(topic, 0, timeout_s=1.0)
    assert blue.evictions == 0 and green.connected


async def test_a_zombie_of_the_same_group_is_still_evicted(
    make_locks: Callable[..., PartitionLocks],
) -> None:
    topic = f"t-{uuid.uuid4().hex[:8]}"
    zombie, owner = make_locks("zombie", "blue"), make_locks("owner", "blue")
    await zombie.connect()
    await owner.connect()
    old = await zombie.acquire_partition(topic, 0)
    assert await owner.acquire_partition(topic, 0, timeout_s=10) > old
    assert owner.evictions == 1
