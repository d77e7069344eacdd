"""A member that stops leaves its consumer group at once, also in the group's first generation.

tansu numbers a group's first generation 0 where Kafka starts at 1, and aiokafka sends LeaveGroup
only for a generation above 0: a replica stopped before any second rebalance stayed a member
until its session expired, so the others waited that long for its partitions (a SIGTERM's
hand-over took 9.5 s instead of 3.6 s). Checked on the real broker by asking it who is in the
group right after the stop, well before the session timeout could have removed the member.
"""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from aiokafka.admin import AIOKafkaAdminClient

from signalman.consumer import ensure_topics
from signalman.kafka_clients import leave_group, member_id
from tests.signalman.conftest import plain_consumer, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

SESSION_TIMEOUT_MS = 30_000  # a member still listed right after stopping did not leave


async def members(admin: AIOKafkaAdminClient, group: str) -> list[str]:
    (response,) = await admin.describe_consumer_groups([group])
    # (error_code, group, state, protocol_type, protocol, members), each member's id first
    (described,) = response.groups
    return [m[0] for m in described[5]]


async def test_a_member_stopped_in_the_first_generation_leaves_the_group_at_once(
    kafka_broker: Any,
) -> None:
    suffix = uuid.uuid4().hex[:8]
    topic, group = f"leave-{suffix}", f"leave-{suffix}"
    await ensure_topics(kafka_broker.bootstrap, {topic: 2})
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka_broker.bootstrap)
    await admin.start()
    consumer = plain_consumer(kafka_broker.bootstrap, group, SESSION_TIMEOUT_MS)
    try:
        await consumer.start()
        consumer.subscribe([topic])

        async def joined() -> bool:
            await consumer.getmany(timeout_ms=200)
            return bool(consumer.assignment())

        await wait_until(joined, timeout=30, what="the first assignment")
        me = member_id(consumer)
        assert await members(admin, group) == [me]
        assert await leave_group(consumer, group) in (None, 0)  # None: aiokafka sent it itself
        await consumer.stop()
        assert await members(admin, group) == []
    finally:
        await consumer.stop()
        await admin.close()
