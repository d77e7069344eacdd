"""Advisory-lock ownership on a real PostgreSQL: fencing tokens, zombie eviction, singleton."""

from __future__ import annotations

import asyncio
import os
import signal
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from signalman.ownership import LockBusy, OwnershipLost, PartitionLocks, lock_key
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


async def test_a_holder_is_evicted_even_when_each_try_is_shorter_than_the_grace(
    make_locks: Callable[[str], Any],
) -> None:
    # The group member retries a busy partition with a timeout of half its session (1.5 s at
    # 3 s) while the grace is 2 s: the grace must add up across tries (partition drill finding).
    topic = f"t-{uuid.uuid4().hex[:8]}"
    zombie, owner = make_locks("zombie"), make_locks("owner")
    await zombie.connect()
    await owner.connect()
    old = await zombie.acquire_partition(topic, 5)
    refused = 0
    for _ in range(20):
        try:
            new = await owner.acquire_partition(topic, 5, timeout_s=0.1)  # grace is 0.3 s
            break
        except LockBusy:
            refused += 1
            await asyncio.sleep(0.05)
    else:
        pytest.fail("the holder was never evicted")
    assert refused >= 1 and new > old and owner.evictions == 1


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


async def test_connect_to_a_server_that_never_answers_fails_within_the_timeout() -> None:
    # A port that accepts TCP but never speaks (a PostgreSQL still starting behind a proxy, a
    # half-dead host): connecting must fail in bounded time, never hang the consumer.
    silent: list[asyncio.StreamWriter] = []

    async def accept(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        silent.append(writer)

    server = await asyncio.start_server(accept, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    locks = PartitionLocks(f"postgresql://postgres@127.0.0.1:{port}/postgres", "a",
                           connect_timeout_s=0.5)  # fmt: skip
    started = time.monotonic()
    try:
        with pytest.raises((TimeoutError, OSError)):
            await locks.connect()
        assert time.monotonic() - started < 5.0
        assert not locks.connected
    finally:
        for writer in silent:
            writer.close()
        server.close()
        await server.wait_closed()


async def test_a_query_that_does_not_answer_times_out_and_counts_as_lost(
    make_locks: Callable[[str], Any],
) -> None:
    topic = f"t-{uuid.uuid4().hex[:8]}"
    locks = make_locks("a")
    locks.query_timeout_s = 0.5
    await locks.connect()
    first = await locks.acquire_partition(topic, 0)
    # SIGSTOP the server process of this session (PostgreSQL backends run in their own
    # session, so this is the one that stops answering): the socket stays open, nothing moves.
    backend = int(await locks.query("fetchval", "SELECT pg_backend_pid()"))
    os.kill(backend, signal.SIGSTOP)
    try:
        started = time.monotonic()
        with pytest.raises(OwnershipLost):
            await locks.acquire_partition(topic, 1)
        assert time.monotonic() - started < 5.0
        # Not knowing what it holds any more, the replica gave the connection up.
        assert locks.lost.is_set() and not locks.connected
    finally:
        os.kill(backend, signal.SIGCONT)
    await locks.connect()  # a new connection, a new and higher fence
    assert not locks.lost.is_set()
    assert await locks.acquire_partition(topic, 0) > first


async def test_closing_or_replacing_the_connection_is_not_reported_as_lost(
    make_locks: Callable[[str], Any],
) -> None:
    locks = make_locks("a")
    await locks.connect()
    await locks.connect()  # replaces the first connection
    await locks.close()
    await asyncio.sleep(0.1)  # termination callbacks run on the loop
    assert not locks.lost.is_set()


async def test_acquire_gives_up_after_its_timeout_when_the_holder_stays(
    make_locks: Callable[[str], Any],
) -> None:
    topic = f"t-{uuid.uuid4().hex[:8]}"
    holder, other = make_locks("holder"), make_locks("other")
    await holder.connect()
    await other.connect()
    await holder.acquire_partition(topic, 2)
    other.grace_s = 60.0  # no eviction within the timeout: the holder is presumed alive
    with pytest.raises(LockBusy):
        await other.acquire_partition(topic, 2, timeout_s=0.3)
    assert other.connected and holder.connected  # nothing broken, the caller retries later
