"""Dead group members found through PostgreSQL (``membership.PeerWatch``) on a real server.

Each watch records its member on its own lock connection; a peer counts as dead when that
connection's backend is gone. The LeaveGroup is a recording fake here (the Kafka side is covered
by the replica test in ``test_dead_member_removal.py``); time is a FakeClock.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from pkg.common.clock import FakeClock
from signalman.membership import UNKNOWN_MEMBER_ID, PeerWatch
from signalman.ownership import PartitionLocks

pytestmark = pytest.mark.integration

EVICT_AFTER_S = 1.0
STALE_AFTER_S = 30.0


class Remover:
    """Records LeaveGroup calls and answers with ``code``."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.code = 0

    async def __call__(self, member: str) -> int:
        self.calls.append(member)
        return self.code


class Peer:
    def __init__(self, locks: PartitionLocks, watch: PeerWatch, remover: Remover) -> None:
        self.locks, self.watch, self.remover = locks, watch, remover

    async def join(self, member: str) -> None:
        if not self.locks.connected:
            await self.locks.connect()
        await self.watch.register(member, self.locks.connects)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
async def peers(postgres_server: Any, clock: FakeClock) -> AsyncIterator[Callable[..., Peer]]:
    group = f"g-{uuid.uuid4().hex[:8]}"
    made: list[PartitionLocks] = []

    def make(owner: str, dsn: str | None = None) -> Peer:
        locks = PartitionLocks(dsn or postgres_server.dsn, owner)
        made.append(locks)
        remover = Remover()
        watch = PeerWatch(
            group, owner, locks.query, remover, evict_after_s=EVICT_AFTER_S,
            stale_after_s=STALE_AFTER_S, interval_s=0.25, clock=clock,
        )  # fmt: skip
        return Peer(locks, watch, remover)

    try:
        yield make
    finally:
        for locks in made:
            await locks.close()


async def joined(peers: Callable[..., Peer], *, b_dies: bool = False) -> tuple[Peer, Peer]:
    """Peers ``a`` and ``b`` recorded as members ``member-a`` and ``member-b``; with ``b_dies``,
    b's lock connection is then closed (what PostgreSQL sees when its process is killed -9)."""
    a, b = peers("a"), peers("b")
    await a.join("member-a")
    await b.join("member-b")
    if b_dies:
        await b.locks.close()
    return a, b


async def test_a_live_peer_is_never_removed(peers: Callable[..., Peer], clock: FakeClock) -> None:
    a, _ = await joined(peers)  # b idles (a paused process keeps its connection just the same)
    for _ in range(5):
        assert await a.watch.check("member-a") == []
        clock.advance(10 * EVICT_AFTER_S)
    assert a.remover.calls == [] and a.watch.removed == 0


async def test_a_peer_whose_connection_ended_is_removed_after_the_wait(
    peers: Callable[..., Peer], clock: FakeClock
) -> None:
    a, _ = await joined(peers, b_dies=True)
    assert await a.watch.check("member-a") == []  # gone, but not for long enough yet
    clock.advance(EVICT_AFTER_S / 2)
    assert await a.watch.check("member-a") == []
    clock.advance(EVICT_AFTER_S / 2)
    assert await a.watch.check("member-a") == ["member-b"]
    assert a.remover.calls == ["member-b"] and a.watch.removed == 1
    clock.advance(EVICT_AFTER_S)
    assert await a.watch.check("member-a") == []  # its record went with it: removed once
    assert a.remover.calls == ["member-b"]


async def test_a_peer_already_out_of_the_group_is_forgotten_without_counting(
    peers: Callable[..., Peer], clock: FakeClock
) -> None:
    a, _ = await joined(peers, b_dies=True)
    a.remover.code = UNKNOWN_MEMBER_ID  # its session expired first
    await a.watch.check("member-a")
    clock.advance(EVICT_AFTER_S)
    assert await a.watch.check("member-a") == ["member-b"]
    assert a.watch.removed == 0
    clock.advance(EVICT_AFTER_S)
    await a.watch.check("member-a")
    assert a.remover.calls == ["member-b"]


async def test_a_refused_removal_is_tried_again(
    peers: Callable[..., Peer], clock: FakeClock
) -> None:
    a, _ = await joined(peers, b_dies=True)
    a.remover.code = 16  # NOT_COORDINATOR: the record stays, a later check tries again
    await a.watch.check("member-a")
    clock.advance(EVICT_AFTER_S)
    assert await a.watch.check("member-a") == []
    a.remover.code = 0
    clock.advance(0.25)
    assert await a.watch.check("member-a") == []  # not at every check: after retry_after_s
    clock.advance(a.watch.retry_after_s)
    assert await a.watch.check("member-a") == ["member-b"]
    assert a.remover.calls == ["member-b", "member-b"] and a.watch.removed == 1


async def test_a_removal_that_raises_is_tried_again(
    peers: Callable[..., Peer], clock: FakeClock
) -> None:
    a, _ = await joined(peers, b_dies=True)

    async def unsupported(member: str) -> int:
        raise RuntimeError("the broker does not support LeaveGroup v1")

    a.watch.remove = unsupported
    await a.watch.check("member-a")
    clock.advance(EVICT_AFTER_S)
    assert await a.watch.check("member-a") == []  # the watch itself does not fail
    a.watch.remove = a.remover
    clock.advance(a.watch.retry_after_s)
    assert await a.watch.check("member-a") == ["member-b"]


async def test_a_member_that_rejoined_under_a_new_id_is_not_dead(
    peers: Callable[..., Peer], clock: FakeClock
) -> None:
    a, b = await joined(peers)
    await b.join("member-b2")  # same replica, same connection, new group member id
    await a.watch.check("member-a")
    clock.advance(10 * EVICT_AFTER_S)
    assert await a.watch.check("member-a") == [] and a.remover.calls == []


async def test_a_reconnected_peer_is_not_removed(
    peers: Callable[..., Peer], clock: FakeClock
) -> None:
    a, b = await joined(peers, b_dies=True)
    await a.watch.check("member-a")  # seen gone...
    await b.join("member-b")  # ...but back (a new lock connection) before the wait is over
    clock.advance(10 * EVICT_AFTER_S)
    assert await a.watch.check("member-a") == [] and a.remover.calls == []


async def test_after_a_postgres_restart_records_from_before_wait_longer(
    postgres_factory: Callable[..., Any], peers: Callable[..., Peer], clock: FakeClock
) -> None:
    server = postgres_factory()
    server.start()
    a, b = peers("a", server.dsn), peers("b", server.dsn)
    await a.join("member-a")
    await b.join("member-b")
    server.restart()  # every backend ends: b's record says only that the server restarted
    await b.locks.close()  # b is slow to reconnect; a is back first
    await a.locks.connect()
    await a.join("member-a")
    await a.watch.check("member-a")
    clock.advance(10 * EVICT_AFTER_S)
    assert await a.watch.check("member-a") == []  # not removed after the short wait...
    clock.advance(STALE_AFTER_S)
    assert await a.watch.check("member-a") == ["member-b"]  # ...only when it never came back
