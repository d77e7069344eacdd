"""aiokafka helpers: starting clients safely, and group membership calls aiokafka lacks (or makes
only where Kafka numbers generations).

Starting: a start that does not complete leaves nothing open.

An aiokafka consumer or producer opens connections (and a consumer with topics already joins its
group) inside ``start()``. If ``start()`` fails or is cancelled half-way (a broker down, a replica
stopping meanwhile), the half-started client must still be stopped: otherwise its connections and
background tasks stay open (aiokafka warns "Unclosed AIOKafkaConsumer") until garbage collection.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any, Protocol

import structlog
from aiokafka.client import ConnectionGroup
from aiokafka.errors import KafkaError
from aiokafka.protocol.group import LeaveGroupRequest

log = structlog.get_logger("signalman.kafka")


class KafkaClient(Protocol):
    """What ``start_client`` needs of an aiokafka consumer or producer."""

    async def start(self) -> None: ...

    async def stop(self) -> None: ...


async def start_client(client: KafkaClient, stop_timeout_s: float = 5.0) -> None:
    """Start ``client``; if the start fails or is cancelled, stop it, then re-raise.

    The stop is bounded by ``stop_timeout_s`` and shielded (a second cancellation leaves it
    running to its end in the background); a stop that fails is not reported over the start's
    own error, which is what the caller gets.
    """
    try:
        await client.start()
    except BaseException:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(asyncio.shield(client.stop()), stop_timeout_s)
        raise


def member_id(consumer: Any) -> str:
    """The group member id ``consumer`` joined under ("" before its first join)."""
    coordinator = getattr(consumer, "_coordinator", None)
    return str(getattr(coordinator, "member_id", "") or "")


async def remove_member(consumer: Any, group_id: str, member: str, timeout_s: float = 3.0) -> int:
    """Send LeaveGroup for ``member`` (another member of ``consumer``'s group) to the group
    coordinator; returns the Kafka error code (0: removed, 25: not a member).

    aiokafka has no public call for it (Kafka's admin API removes members by static instance id
    only), so this uses the consumer's own client and its known coordinator: the same
    request aiokafka sends when a consumer leaves by itself, with the other member's id.
    Raises ``KafkaError`` when no coordinator is known (a rebalance or a broker change is under
    way: the caller tries again later).
    """
    coordinator = getattr(consumer, "_coordinator", None)
    node = getattr(coordinator, "coordinator_id", None)
    if node is None:
        raise KafkaError("no group coordinator known yet")
    request = LeaveGroupRequest(group_id, member)
    response = await asyncio.wait_for(
        consumer._client.send(node, request, group=ConnectionGroup.COORDINATION), timeout_s
    )
    return int(response.error_code)


async def leave_group(consumer: Any, group_id: str, timeout_s: float = 3.0) -> int | None:
    """Stop ``consumer``'s group membership (no more heartbeats or joins) and make sure the group
    hears that it left; returns the Kafka error code of the LeaveGroup sent here, or None when
    aiokafka sent it (its answer is not checked there) or there was no membership to leave.

    aiokafka leaves only a generation above 0 (Kafka's first is 1), but tansu numbers its first
    generation 0: a member that never saw a second rebalance left silently, and the others kept
    its partitions unprocessed until its session expired (9.5 s instead of 3.6 s for a
    SIGTERM). The coordinator is closed first, so nothing rejoins after the LeaveGroup; the
    client stays open for it until ``consumer.stop()``.
    """
    coordinator = getattr(consumer, "_coordinator", None)
    if coordinator is None:
        return None
    member, generation = member_id(consumer), int(coordinator.generation)
    # close() first lets aiokafka's coordination routine finish what it is doing, unbounded: a
    # JoinGroup or SyncGroup the broker holds (tansu: up to half / 0.8 of the session timeout)
    # or a retried coordinator lookup kept a stopping replica in the group for 5 s, and the
    # hand-over waited for it. A routine still busy after ``timeout_s`` is cancelled and the
    # LeaveGroup sent here, whatever the generation (the broker answers it after the held join).
    closing = asyncio.ensure_future(coordinator.close())  # sends LeaveGroup for generation > 0
    done, _ = await asyncio.wait({closing}, timeout=timeout_s)
    if done:
        closing.result()
        if not member or generation != 0:
            return None
        return await remove_member(consumer, group_id, member, timeout_s)
    routine = getattr(coordinator, "_coordination_task", None)
    log.warning("group_coordination_slow", member_id=member, waited_s=timeout_s)
    if routine is not None:
        routine.cancel()
    await asyncio.wait({closing}, timeout=timeout_s)  # ends at once: its await was cancelled
    with contextlib.suppress(Exception):
        await coordinator._stop_heartbeat_task()  # close() did not get to it
    if not member:
        return None
    return await remove_member(consumer, group_id, member, timeout_s)
