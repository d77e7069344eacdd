"""A member about to join tells the others through PostgreSQL, and they rejoin at once.

Without the notice a running member sees the rebalance at its next heartbeat; on tansu the
newcomer's SyncGroup then arrives before the leader's and waits another second, so partitions
moving to a restarted replica stood still 1.8-2.0 s instead of ~1.2 s. Real tansu and
PostgreSQL; the heartbeat is long here so that only the notice explains a prompt rejoin.
"""

from __future__ import annotations

import asyncio
import uuid
from contextlib import AsyncExitStack
from typing import Any

import pytest

from api_realtime.config import SignalmanConfig
from pkg.coord.advisory import PartitionLocks
from signalman.consumer import GroupMember, ensure_topics
from signalman.history.memory import MemoryHistory
from signalman.processor import Processor
from tests.signalman.conftest import wait_until

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]

PARTITIONS = 2


async def _no_dead_letters(_letter: Any) -> None:
    raise AssertionError("no dead letters expected")


async def test_a_running_member_rejoins_at_a_newcomers_notice(
    kafka_broker: Any, postgres_server: Any
) -> None:
    suffix = uuid.uuid4().hex[:8]
    topic, group = f"notice-{suffix}", f"notice-{suffix}"
    await ensure_topics(kafka_broker.bootstrap, {topic: PARTITIONS, f"{topic}.dlq": PARTITIONS})
    members: dict[str, GroupMember] = {}
    async with AsyncExitStack() as stack:

        def start(name: str) -> GroupMember:
            config = SignalmanConfig(
                kafka_bootstrap=kafka_broker.bootstrap,
                topic=topic,
                group_id=group,
                partitions=PARTITIONS,
                # A heartbeat every 2 s: without the notice, the rebalance is seen that late.
                session_timeout_ms=6_000,
                heartbeat_interval_ms=2_000,
                replica_id=name,
                postgres_dsn=postgres_server.dsn,
            )
            history = MemoryHistory()
            locks = PartitionLocks(postgres_server.dsn, name, group=group, grace_s=0.3)
            member = GroupMember(
                config, Processor(history, dead_letter=_no_dead_letters), history, locks
            )
            task = asyncio.create_task(member.run())

            async def stop() -> None:
                await member.stop()
                await asyncio.wait({task}, timeout=20)
                task.cancel()
                await member.close()

            stack.push_async_callback(stop)
            members[name] = member
            return member

        a = start("a")
        await wait_until(lambda: len(a.owned) == PARTITIONS, timeout=40, what="a owns all")
        generations = a.generation_changes
        b = start("b")
        await wait_until(lambda: a.generation_changes > generations, timeout=40,
                         what="a rejoined")  # fmt: skip
        assert a.join_notices == 1  # at b's notice, not at a heartbeat
        await wait_until(lambda: len(a.owned) + len(b.owned) == PARTITIONS and bool(b.owned),
                         timeout=40, what="the partitions split")  # fmt: skip
