"""Advisory-lock ownership on a real PostgreSQL: fencing tokens, zombie eviction, singleton."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from signalman.ownership import OwnershipLost, PartitionLocks, lock_key
from tests.signalman.conftest import wait_until

pytestmark = pytest.mark.integration


@pytest.fixture
async def make_locks(postgres_server: Any) -> AsyncIterator[Callable[[str], PartitionLocks]]:
    made: list[PartitionLocks] = []

    def make(owner: str) -> PartitionLocks:
        locks = PartitionLocks(postgres_server.dsn, owner, grace_s=0.3)
        made.append(locks)
        return locks

    try:
        yield make
    finally:
        for locks in made:
            await locks.close()


async def test_each_acquisition_gets_a_higher_fence(make_locks: Callable[[str], Any]) -> None:
    topic = f"t-{uuid.uuid4().hex[:8]}"
    a = make_locks("a")
    await a.connect()
    first = await a.acquire_partition(topic, 0)
    await a.release_partition(topic, 0)
    second = await a.acquire_partition(topic, 0)
    assert (first, second) == (1, 2)


async def test_new_owner_evicts_a_holder_that_does_not_let_go(
    make_locks: Callable[[str], Any],
) -> None:
    topic = f"t-{uuid.uuid4().hex[:8]}"
    zombie, owner = make_locks("zombie"), make_locks("owner")
    await zombie.connect()
    await owner.connect()
    old = await zombie.acquire_partition(topic, 3)
    # The zombie never releases (paused). The new owner waits the grace period, then terminates
    # the zombie's dedicated connection, which frees every lock it held.
    new = await owner.acquire_partition(topic, 3)
    assert new > old and owner.evictions == 1
    await wait_until(zombie.lost.is_set, timeout=10)
    with pytest.raises(OwnershipLost):
        await zombie.try_lock(lock_key(f"signalman:{topic}", 3))


async def test_only_one_replica_holds_the_singleton(make_locks: Callable[[str], Any]) -> None:
    name = f"g-{uuid.uuid4().hex[:8]}"
    a, b = make_locks("a"), make_locks("b")
    await a.connect()
    await b.connect()
    assert await a.try_singleton(name)
    assert not await b.try_singleton(name)
    await a.close()  # the holder's connection goes: the lock goes with it
    await wait_until(lambda: b.try_singleton(name), timeout=10)


def test_lock_keys_differ_per_topic_and_partition() -> None:
    keys = {lock_key(f"signalman:{t}", p) for t in ("a", "b") for p in range(4)}
    assert len(keys) == 8
    with pytest.raises(ValueError):
        lock_key("x", 70_000)
