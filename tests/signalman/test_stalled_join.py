"""A group member whose join stalls recovers by itself, on the real broker.

tansu (the dev stack's broker) removes a member that sends LeaveGroup while the group is forming
but keeps it as the group's leader: the member still joining then never gets an assignment, and
restarting it does not help (the new member joins the same leaderless round). Provoked here the
way a rolling restart did it: the group's only member (its leader) leaves while a Signalman
member's join is in flight. Without the recovery the member stayed unassigned for minutes.
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import pytest

from api_realtime.config import SignalmanConfig
from signalman.consumer import GroupMember, ensure_topics
from signalman.history.memory import MemoryHistory
from signalman.kafka_clients import expire_departed_leader, leave_group, member_id
from signalman.processor import Processor
from tests.signalman.conftest import plain_consumer, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.failure, pytest.mark.timeout(90)]

PARTITIONS = 2
SESSION_TIMEOUT_MS = 2_000  # tansu holds each join 1 s with it: the stall shows within seconds


async def _no_dead_letters(_letter: Any) -> None:
    raise AssertionError("no dead letters expected")


async def test_a_member_stalled_by_a_departed_leader_gets_the_partitions(
    kafka_broker: Any,
) -> None:
    suffix = uuid.uuid4().hex[:8]
    topic, group = f"stall-{suffix}", f"stall-{suffix}"
    await ensure_topics(kafka_broker.bootstrap, {topic: PARTITIONS, f"{topic}.dlq": PARTITIONS})
    leader = plain_consumer(kafka_broker.bootstrap, group, SESSION_TIMEOUT_MS)
    config = SignalmanConfig(
        kafka_bootstrap=kafka_broker.bootstrap,
        topic=topic,
        group_id=group,
        partitions=PARTITIONS,
        session_timeout_ms=SESSION_TIMEOUT_MS,
        heartbeat_interval_ms=500,
        replica_id=f"r-{suffix}",
    )
    history = MemoryHistory()
    member = GroupMember(config, Processor(history, dead_letter=_no_dead_letters), history, None)
    # Far above a healthy join here (1-2 s), well below the default, to keep the test short.
    member.join_timeout_s = 4.0
    running: asyncio.Task[None] | None = None
    try:
        await leader.start()
        leader.subscribe([topic])

        async def leading() -> bool:
            await leader.getmany(timeout_ms=100)
            return bool(leader.assignment())

        await wait_until(leading, timeout=30, what="the first member's assignment")
        running = asyncio.create_task(member.run())

        async def joining() -> bool:
            # Our member id is known once the broker has taken the join (its held round).
            return member.consumer is not None and bool(member_id(member.consumer))

        await wait_until(joining, timeout=30, interval=0.02, what="the member's join")
        await leave_group(leader, group)  # the leader leaves the forming group

        async def owns_all() -> bool:
            return len(member.owned) == PARTITIONS

        await wait_until(owns_all, timeout=40, what="the stalled member's assignment")
        assert member.join_stalls >= 1  # it did stall: recovered, not merely never stuck
    finally:
        await member.stop()
        if running is not None:
            await asyncio.wait({running}, timeout=20)
            running.cancel()
        await member.close()
        await leader.stop()


async def test_a_leader_that_is_still_a_member_is_never_joined_for(kafka_broker: Any) -> None:
    suffix = uuid.uuid4().hex[:8]
    topic, group = f"alive-{suffix}", f"alive-{suffix}"
    await ensure_topics(kafka_broker.bootstrap, {topic: PARTITIONS})
    consumers = [
        plain_consumer(kafka_broker.bootstrap, group, SESSION_TIMEOUT_MS) for _ in range(2)
    ]
    try:
        for consumer in consumers:
            await consumer.start()
            consumer.subscribe([topic])

        async def settled() -> bool:
            for consumer in consumers:
                await consumer.getmany(timeout_ms=50)
            return all(c.assignment() for c in consumers)

        await wait_until(settled, timeout=30, what="both members assigned")
        # Whichever is the follower asks: the leader it is told of is a live member.
        for consumer in consumers:
            assert await expire_departed_leader(consumer, group, 10.0) is None
    finally:
        for consumer in consumers:
            await consumer.stop()
