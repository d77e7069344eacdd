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
import time
from typing import Any, Protocol

import structlog
from aiokafka.client import ConnectionGroup
from aiokafka.errors import KafkaError
from aiokafka.protocol.admin import DescribeGroupsRequest
from aiokafka.protocol.group import JoinGroupRequest, LeaveGroupRequest

from pkg.common.app import suspended_at

log = structlog.get_logger("signalman.kafka")


class KafkaClient(Protocol):
    """What ``start_client`` needs of an aiokafka consumer or producer."""

    async def start(self) -> None: ...

    async def stop(self) -> None: ...


# Stops of clients whose start was cancelled, finishing in the background (kept referenced).
_stopping: set[asyncio.Task[None]] = set()
# How long a cancelled start waits for its client's stop before returning (the stop goes on).
CANCELLED_STOP_WAIT_S = 0.2


async def start_client(client: KafkaClient, stop_timeout_s: float = 5.0) -> None:
    """Start ``client``; if the start fails or is cancelled, stop it, then re-raise.

    The stop is bounded by ``stop_timeout_s`` and shielded (a second cancellation leaves it
    running to its end in the background); a stop that fails is not reported over the start's
    own error, which is what the caller gets. A cancelled start (its owner is stopping) waits
    for the stop only ``CANCELLED_STOP_WAIT_S``: a consumer cancelled while joining its group
    takes seconds to stop (aiokafka's coordinator waits out the join the broker holds), which
    held a stopping Signalman replica's exit 5 s in the singleton duties' re-driver.
    """
    try:
        await client.start()
    except BaseException as exc:
        stop = asyncio.create_task(client.stop())
        _stopping.add(stop)
        stop.add_done_callback(_stop_done)
        cancelled = isinstance(exc, asyncio.CancelledError)
        wait_s = CANCELLED_STOP_WAIT_S if cancelled else stop_timeout_s
        with contextlib.suppress(Exception):
            await asyncio.wait_for(asyncio.shield(stop), wait_s)
        raise


def _stop_done(task: asyncio.Task[None]) -> None:
    _stopping.discard(task)
    if not task.cancelled() and task.exception() is not None:
        log.debug("kafka_client_stop_failed", error=repr(task.exception())[:200])


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
    response = await _to_coordinator(consumer, LeaveGroupRequest(group_id, member), timeout_s)
    return int(response.error_code)


async def _to_coordinator(consumer: Any, request: Any, timeout_s: float) -> Any:
    """Send ``request`` to ``consumer``'s group coordinator over aiokafka's coordination
    connection; its answer. ``KafkaError`` when no coordinator is known yet."""
    coordinator = getattr(consumer, "_coordinator", None)
    node = getattr(coordinator, "coordinator_id", None)
    if node is None:
        raise KafkaError("no group coordinator known yet")
    return await asyncio.wait_for(
        consumer._client.send(node, request, group=ConnectionGroup.COORDINATION), timeout_s
    )


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
    started = time.monotonic()
    closing = asyncio.ensure_future(coordinator.close())  # sends LeaveGroup for generation > 0
    done, _ = await asyncio.wait({closing}, timeout=timeout_s)
    if done:
        closing.result()
        took_s = time.monotonic() - started
        if took_s > 0.5:
            log.info("group_coordination_closed_slowly", member_id=member,
                     took_s=round(took_s, 3))  # fmt: skip
        if not member or generation != 0:
            return None
        return await remove_member(consumer, group_id, member, timeout_s)
    routine = getattr(coordinator, "_coordination_task", None)
    # Where the routine waited (a held JoinGroup, a commit retried...): the log says which.
    log.warning("group_coordination_slow", member_id=member, waited_s=timeout_s,
                waiting_in=suspended_at(routine))  # fmt: skip
    if routine is not None:
        routine.cancel()
    await asyncio.wait({closing}, timeout=timeout_s)  # ends at once: its await was cancelled
    with contextlib.suppress(Exception):
        await coordinator._stop_heartbeat_task()  # close() did not get to it
    if not member:
        return None
    return await remove_member(consumer, group_id, member, timeout_s)


def rejoin_now(consumer: Any) -> bool:
    """Make ``consumer`` rejoin its group now instead of at its next heartbeat; False when it has
    no group membership to renew (not started, or stopping)."""
    coordinator = getattr(consumer, "_coordinator", None)
    closing = getattr(coordinator, "_closing", None)
    if coordinator is None or closing is None or closing.done():
        return False
    coordinator.request_rejoin()
    return True


async def _group_members(consumer: Any, group_id: str, timeout_s: float) -> set[str]:
    """The member ids the group coordinator lists for ``group_id`` (DescribeGroups)."""
    response = await _to_coordinator(consumer, DescribeGroupsRequest([group_id]), timeout_s)
    # Every version: (error_code, group, state, protocol_type, protocol, members, ...), each
    # member's id first.
    return {str(m[0]) for g in response.groups if g[1] == group_id for m in g[5]}


async def _join_as(consumer: Any, group_id: str, member: str, timeout_s: float) -> Any:
    """Send one JoinGroup for ``member`` with ``consumer``'s own subscription (its protocols and
    timeouts) to the group coordinator; the broker's answer (held as long as it holds joins)."""
    coordinator = consumer._coordinator
    topics = consumer._subscription.topics
    protocols = []
    for assignor in coordinator._assignors:
        metadata = assignor.metadata(topics)
        protocols.append((assignor.name, metadata if isinstance(metadata, bytes)
                          else metadata.encode()))  # fmt: skip
    request = JoinGroupRequest(
        group_id,
        coordinator._session_timeout_ms,
        coordinator._rebalance_timeout_ms,
        member,
        None,
        "consumer",
        protocols,
    )
    return await _to_coordinator(consumer, request, timeout_s)


async def expire_departed_leader(consumer: Any, group_id: str, timeout_s: float) -> str | None:
    """Let the broker expire a group leader that left while the group was forming; returns its
    member id, or None when the leader is ``consumer`` itself or no leader is named.

    tansu (the dev stack's broker) removes a member that sends LeaveGroup while the group is
    forming (a join in flight) but keeps it as the group's leader: the others' SyncGroup then
    never gets an assignment, and a new member joins the same leaderless round, so the group
    stays stalled until the broker restarts. tansu only drops a leader when it evicts it for a
    missed session, which needs the leader to be a member. So: one JoinGroup under our own id
    to learn who the broker names leader, and if that is another member, one JoinGroup under
    its id, which makes it a member again that nobody heartbeats for; a session timeout later
    the broker evicts it, forgets it as leader and the next join elects a live member. Only a
    leader the broker no longer lists as a member is treated so: a JoinGroup under a live
    member's id would stand in for that member's own join. A real Kafka always elects its
    leader among the members, so there this never sends the second JoinGroup.
    """
    started = time.monotonic()
    me = member_id(consumer)
    probe = await _join_as(consumer, group_id, me, timeout_s)
    leader = str(probe.leader_id or "")
    if probe.error_code or not leader or leader == me:
        log.info("group_leader_checked", leader=leader or None, error_code=probe.error_code,
                 took_s=round(time.monotonic() - started, 3))  # fmt: skip
        return None
    if leader in await _group_members(consumer, group_id, timeout_s):
        log.info("group_leader_is_a_member", leader=leader,
                 took_s=round(time.monotonic() - started, 3))  # fmt: skip
        return None
    revived = await _join_as(consumer, group_id, leader, timeout_s)
    took_s = round(time.monotonic() - started, 3)
    log.warning("departed_group_leader_expiring", leader=leader, member_id=me,
                error_code=revived.error_code, took_s=took_s)  # fmt: skip
    return leader
