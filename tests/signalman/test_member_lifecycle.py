"""The group member's ownership keeper, driven step by step on a fake clock (no servers).

What it must do with the lock connection and the partitions the group assigned: never process
without the lock, re-lock inside the group after a short outage, leave only after
``lock_rejoin_after_s``, retry what the listener could not lock, and act on a stalled join
(expire a departed leader, or else restart the consumer).
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from aiokafka import TopicPartition

from api_realtime.config import SignalmanConfig
from pkg.clients.backoff import Backoff
from pkg.common.clock import FakeClock
from signalman.consumer import GroupMember
from signalman.history.memory import MemoryHistory
from signalman.ownership import LockBusy, OwnershipLost
from signalman.processor import Processor

TOPIC = "events"
TP0, TP1 = TopicPartition(TOPIC, 0), TopicPartition(TOPIC, 1)


class FakeLocks:
    """PartitionLocks' contract in memory: a connection that can drop, fences that grow."""

    def __init__(self) -> None:
        self.lost = asyncio.Event()
        self.up = True  # PostgreSQL reachable
        self._connected = True
        self.busy: set[int] = set()  # partitions someone else holds
        self.fences: dict[int, int] = {}
        self.held: set[int] = set()
        self.connects = 0

    @property
    def connected(self) -> bool:
        return self._connected

    def drop(self) -> None:
        self._connected = False
        self.lost.set()

    async def connect(self) -> None:
        if not self.up:
            raise ConnectionRefusedError("PostgreSQL is down")
        self._connected = True
        self.lost.clear()
        self.connects += 1

    async def acquire_partition(
        self, topic: str, partition: int, *, timeout_s: float | None = None
    ) -> int:
        if not self._connected:
            raise OwnershipLost("the dedicated lock connection is closed")
        if partition in self.busy:
            raise LockBusy(f"{topic}/{partition} still locked after {timeout_s} s")
        self.fences[partition] = self.fences.get(partition, 0) + 1
        self.held.add(partition)
        return self.fences[partition]

    async def release_partition(self, topic: str, partition: int) -> None:
        self.held.discard(partition)

    async def query(self, method: str, *args: Any) -> Any:
        # The peer watch's SQL (membership.py) needs a real PostgreSQL: test_membership.py.
        raise NotImplementedError("FakeLocks runs no SQL")

    async def close(self) -> None:
        self._connected = False


class FakeConsumer:
    def __init__(self, assignment: set[TopicPartition]) -> None:
        self._assignment = set(assignment)
        self.paused: set[TopicPartition] = set()

    def assignment(self) -> set[TopicPartition]:
        return set(self._assignment)

    def pause(self, tp: TopicPartition) -> None:
        self.paused.add(tp)

    def resume(self, tp: TopicPartition) -> None:
        self.paused.discard(tp)


class ClaimFails(MemoryHistory):
    """A history whose claim fails for some partitions (Redis unreachable for them)."""

    def __init__(self) -> None:
        super().__init__()
        self.failing: set[int] = set()

    async def claim(self, topic: str, partition: int, fence: int) -> int:
        if partition in self.failing:
            raise ConnectionError("history unreachable")
        return await super().claim(topic, partition, fence)


def member_with(locks: FakeLocks, clock: FakeClock, **cfg: Any) -> GroupMember:
    config = SignalmanConfig(kafka_bootstrap="unused:9092", topic=TOPIC, **cfg)
    history = ClaimFails()
    processor = Processor(history, dead_letter=_no_dead_letters, clock=clock)
    member = GroupMember(config, processor, history, locks, clock=clock)  # type: ignore[arg-type]
    member.consumer = FakeConsumer({TP0, TP1})
    return member


async def _no_dead_letters(_letter: Any) -> None:
    raise AssertionError("no dead letters expected")


async def step(member: GroupMember, backoff: Backoff, clock: FakeClock, seconds: float) -> None:
    """One keeper iteration, then let ``seconds`` pass."""
    await member._keep_ownership_once(backoff)
    clock.advance(seconds)


def fences(member: GroupMember) -> dict[int, int]:
    return {tp.partition: owned.fence for tp, owned in member.owned.items()}


async def test_lost_lock_connection_stops_processing_and_relocks_inside_the_group() -> None:
    clock, locks = FakeClock(), FakeLocks()
    member = member_with(locks, clock)
    await member.assigned([TP0, TP1])
    assert fences(member) == {0: 1, 1: 1}

    locks.up = False
    locks.drop()  # PostgreSQL restarts: every lock is gone
    backoff = Backoff(base=0.2, cap=2.0, clock=clock)
    await step(member, backoff, clock, 0.1)
    assert member.owned == {}  # nothing is processed without the lock...
    assert member.consumer.paused == {TP0, TP1}  # ...nor fetched
    for _ in range(20):  # retries with backoff while it is down
        await step(member, backoff, clock, 0.3)
    assert not member._restart.is_set()  # still a member of the group: no rebalance

    locks.up = True
    for _ in range(30):
        await step(member, backoff, clock, 0.1)
        if member.owned:
            break
    assert fences(member) == {0: 2, 1: 2}  # new, higher fencing tokens
    assert member.consumer.paused == set()
    assert member.lock_reconnects == 1 and not member._restart.is_set()


async def test_lock_connection_down_past_the_bound_leaves_the_group() -> None:
    clock, locks = FakeClock(), FakeLocks()
    member = member_with(locks, clock, lock_rejoin_after_s=5.0)
    await member.assigned([TP0, TP1])
    locks.up = False
    locks.drop()
    backoff = Backoff(base=0.2, cap=2.0, clock=clock)
    for _ in range(4):
        await step(member, backoff, clock, 1.0)
    assert not member._restart.is_set()
    for _ in range(3):
        await step(member, backoff, clock, 1.0)
    assert member._restart.is_set()  # others that still reach PostgreSQL may take over
    assert "lock connection down" in member._restart_reason


async def test_rejoin_bound_zero_stays_in_the_group_however_long_it_is_down() -> None:
    clock, locks = FakeClock(), FakeLocks()
    member = member_with(locks, clock, lock_rejoin_after_s=0.0)
    await member.assigned([TP0])
    locks.up = False
    locks.drop()
    backoff = Backoff(base=0.2, cap=2.0, clock=clock)
    for _ in range(50):
        await step(member, backoff, clock, 10.0)
    assert not member._restart.is_set() and member.owned == {}


async def test_partition_not_lockable_in_the_listener_stays_paused_until_the_keeper_gets_it() -> (
    None
):
    clock, locks = FakeClock(), FakeLocks()
    member = member_with(locks, clock)
    locks.busy = {1}  # the previous owner has not let go yet
    await member.assigned([TP0, TP1])
    assert fences(member) == {0: 1}
    assert member.consumer.paused == {TP1}
    assert not member._restart.is_set()  # the member does not leave the group for it

    backoff = Backoff(base=0.2, cap=2.0, clock=clock)
    locks.busy = set()
    for _ in range(30):
        await step(member, backoff, clock, 0.1)
        if len(member.owned) == 2:
            break
    assert fences(member) == {0: 1, 1: 1}
    assert member.consumer.paused == set()


async def test_a_partition_revoked_while_pending_is_not_taken() -> None:
    clock, locks = FakeClock(), FakeLocks()
    member = member_with(locks, clock)
    locks.busy = {1}
    await member.assigned([TP0, TP1])
    await member.revoked([TP0, TP1])
    locks.busy = set()
    await step(member, Backoff(clock=clock), clock, 1.0)
    assert member.owned == {} and locks.fences == {0: 1}


async def stalled(member: GroupMember, clock: FakeClock) -> None:
    """A rebalance starts and no assignment follows for longer than the join timeout."""
    await member.revoked([])
    backoff = Backoff(clock=clock)
    await step(member, backoff, clock, member.join_timeout_s + 1)
    await step(member, backoff, clock, 0.1)
    assert member._unstall_task is not None
    await member._unstall_task


async def test_a_stalled_join_expires_a_departed_leader_and_keeps_the_member() -> None:
    clock, locks = FakeClock(), FakeLocks()
    member = member_with(locks, clock, session_timeout_ms=6_000)
    asked: list[tuple[str, float]] = []

    async def departed_leader(_consumer: Any, group: str, timeout_s: float) -> str | None:
        asked.append((group, timeout_s))
        return "gone-member"

    member.expire_leader = departed_leader
    await stalled(member, clock)
    assert member.join_stalls == 1 and asked == [("signalman", 11.0)]
    # The join goes on: once the broker expires the leader, it elects a live member.
    assert not member._restart.is_set()


async def test_a_stalled_join_without_a_departed_leader_restarts_the_consumer() -> None:
    clock, locks = FakeClock(), FakeLocks()
    member = member_with(locks, clock, session_timeout_ms=6_000)

    async def no_leader_to_expire(_consumer: Any, _group: str, _timeout_s: float) -> str | None:
        raise ConnectionResetError("coordinator gone")

    member.expire_leader = no_leader_to_expire
    await stalled(member, clock)
    assert member.join_stalls == 1
    assert member._restart.is_set() and "stalled" in member._restart_reason


async def test_a_partition_locked_but_not_claimed_is_released_on_revocation() -> None:
    clock, locks = FakeClock(), FakeLocks()
    member = member_with(locks, clock)
    member.history.failing = {1}  # type: ignore[attr-defined]
    await member.assigned([TP0, TP1])
    assert fences(member) == {0: 1} and locks.held == {0, 1}  # 1 locked, not owned
    await member.revoked([TP0, TP1])
    assert locks.held == set()  # nothing stays locked for the next owner to evict


@pytest.mark.parametrize(
    ("field", "value"),
    [("lock_rejoin_after_s", -1.0), ("lock_grace_s", 0.0), ("lock_grace_s", float("nan"))],
)
def test_bad_ownership_settings_are_refused_naming_the_field(field: str, value: float) -> None:
    with pytest.raises(ValueError, match=field):
        SignalmanConfig(**{field: value})


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("session_timeout_ms", -5),
        ("heartbeat_interval_ms", 0),
        ("history_maxlen", 0),
        ("max_message_bytes", -1),
        ("duties_interval_s", float("nan")),
        ("fetch_max_wait_ms", -1),
        ("redrive_max_attempts", -1),
    ],
)
def test_bad_timings_and_sizes_are_refused_naming_the_variable(field: str, value: float) -> None:
    with pytest.raises(ValueError, match=f"SIGNALMAN_{field.upper()}"):
        SignalmanConfig(**{field: value})
