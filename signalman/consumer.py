"""Consumer-group membership: process only the partitions this replica owns, commit after append.

Every replica joins one group. On assignment the replica takes the partition's advisory lock and a
new fencing token (``ownership.PartitionLocks``) and raises the token in the history before it
processes anything; on revocation it waits for the in-flight batch (whose offsets are committed
when it finishes), then releases the lock. The processing lock is held only while a batch is
processed, never across ``getmany``: aiokafka's rebalance listener runs while ``getmany`` waits and
must be able to take it (eager rebalances are stop-the-world).

Losing the lock connection (PostgreSQL restarted, network) is losing every lock: the replica stops
processing at once but stays in the group, reconnects with backoff and takes its locks again with
new fencing tokens (no rebalance, so a PostgreSQL restart costs the group nothing). Only when the
connection stays down past ``lock_rejoin_after_s`` does it leave the group, so replicas that can
still reach PostgreSQL take the partitions over. Every step of joining and taking ownership is
bounded by a timeout. A join that does not complete within ``join_timeout_s`` is reported and
acted on: a leader that left the forming group is made to expire (the dev broker tansu keeps it
as leader otherwise, and the group stays stalled), or else the member restarts its consumer.

A member whose replica died is removed from the group by the survivors as soon as PostgreSQL
shows its lock connection gone (``membership.PeerWatch``), instead of after its session timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

import structlog
from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError, TopicAlreadyExistsError
from opentelemetry import metrics

from pkg.clients.backoff import Backoff
from pkg.common import history
from pkg.common.clock import SYSTEM_CLOCK, Clock
from pkg.common.kafkaconn import kafka_options
from pkg.events.kafka import trace_of
from signalman.deadletter import attempts_of
from signalman.history import History, SourcePos
from signalman.kafka_clients import (
    expire_departed_leader,
    leave_group,
    member_id,
    rejoin_now,
    remove_member,
)
from signalman.membership import NONE, UNKNOWN_MEMBER_ID, PeerWatch
from signalman.ownership import OwnershipLost, PartitionLocks
from signalman.processor import Processor, RecordIn

log = structlog.get_logger("signalman.consumer")
# At most this many records per batch, and read ahead while a batch is processed.
READ_AHEAD_MAX = 500
# A history that failed over lacks at most the replication lag's appends; a watermark farther
# back than this is not re-read (see GroupMember._reread_lost).
MAX_REREAD = 100_000
# A stopping replica's hand-over: at most this long to commit what it processed, then each step
# of leaving the group (aiokafka's coordination routine, the LeaveGroup) at most LEAVE_STEP_S.
# Together well under the server's LEAVE_BOUND_S, so the leave happens, not the bound.
STOP_COMMIT_BOUND_S = 1.0
LEAVE_STEP_S = 1.5
# A commit slower than this is logged (the broker is busy or the group is rebalancing).
SLOW_COMMIT_S = 1.0
_join_stalls = metrics.get_meter("signalman").create_counter(
    "signalman_group_join_stalls",
    description="group joins that had not completed within the join timeout (acted on: a "
    "departed leader expired, or the consumer restarted)",
)

# A member about to join tells the others through PostgreSQL (NOTIFY on the lock connection), and
# they rejoin at once instead of at their next heartbeat. On tansu, where a follower's SyncGroup
# that arrives before the leader's waits another second, this is what lets the newcomer's join
# end right after the leader's: partitions moving to a restarted replica were unprocessed
# 1.8-2.0 s (survivor's revoke to newcomer's assignment), 1.2 s when the survivor rejoined first
# (plain aiokafka, 2 s session). The lead is how long the newcomer waits after the notice.
JOIN_NOTICE_CHANNEL = "signalman_group_join"
JOIN_NOTICE_LEAD_S = 0.15

ExpireLeader = Callable[[Any, str, float], Awaitable[str | None]]


class GroupSettings(Protocol):
    """The settings a group member reads (``api_realtime.config.SignalmanConfig`` has them)."""

    @property
    def kafka_bootstrap(self) -> str: ...
    @property
    def topic(self) -> str: ...
    @property
    def dlq_topic(self) -> str: ...
    @property
    def partitions(self) -> int: ...
    @property
    def group_id(self) -> str: ...
    @property
    def replica_id(self) -> str: ...
    @property
    def session_timeout_ms(self) -> int: ...
    @property
    def heartbeat_interval_ms(self) -> int: ...
    @property
    def fetch_max_wait_ms(self) -> int: ...
    @property
    def commit_interval_ms(self) -> int: ...
    @property
    def lock_rejoin_after_s(self) -> float: ...
    @property
    def peer_evict_after_s(self) -> float: ...


@dataclass
class Owned:
    fence: int
    position: int = -1  # next offset to process (-1: unknown until the first record)
    # The last offset this member appended (or found appended) to the history: what a history
    # that failed over must still hold (-1: nothing yet; History.append_many's ``expect``).
    appended: int = -1


async def ensure_topics(bootstrap: str, topics: dict[str, int], timeout_s: float = 10.0) -> None:
    """Create the topics that do not exist yet (partition counts are only used on creation)."""
    admin = AIOKafkaAdminClient(
        **kafka_options(bootstrap), request_timeout_ms=int(timeout_s * 1000)
    )
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        missing = [NewTopic(t, num_partitions=n, replication_factor=1)
                   for t, n in topics.items() if t not in existing]  # fmt: skip
        if missing:
            with contextlib.suppress(TopicAlreadyExistsError):
                await admin.create_topics(missing)
            log.info("topics_created", topics=[t.name for t in missing])
    finally:
        await admin.close()


def _expire(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


class _Listener(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, member: GroupMember) -> None:
        self.member = member

    async def on_partitions_revoked(self, revoked: list[TopicPartition]) -> None:
        await self.member.revoked(list(revoked))

    async def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
        await self.member.assigned(list(assigned))


class GroupMember:
    """One replica's membership in the consumer group and its processing loop."""

    def __init__(
        self,
        cfg: GroupSettings,
        processor: Processor,
        history: History,
        locks: PartitionLocks | None,
        *,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        self.cfg = cfg
        self.processor = processor
        self.history = history
        self.locks = locks
        self.clock = clock
        self.owned: dict[TopicPartition, Owned] = {}
        self.consumer: Any = None
        self._processing = asyncio.Lock()
        self._commit_task: asyncio.Task[None] | None = None
        self._pending_offsets: dict[TopicPartition, int] = {}
        self._commit_pacing = False
        # Records taken from the consumer and not processed yet (in order), by the read-ahead.
        self._ahead: dict[TopicPartition, list[Any]] = {}
        self._ahead_waiter: asyncio.Future[None] | None = None  # the loop waits for records
        self._ahead_room = asyncio.Event()  # the read-ahead waits for room (READ_AHEAD_MAX)
        self._restart = asyncio.Event()
        self._restart_reason = ""
        self._stopping = asyncio.Event()
        self.generation_changes = 0
        # Ownership lifecycle: what the group assigned us (owned or still to lock), transitions
        # serialised by one lock, and the timestamps the ownership keeper's bounds are measured
        # from.
        self.assignment: set[TopicPartition] = set()
        self._ownership = asyncio.Lock()
        self._joining_since: float | None = None
        self._lock_down_since: float | None = None
        self._retry_at = 0.0
        self.lock_reconnects = 0
        session_s = cfg.session_timeout_ms / 1000
        # A rebalance listener must return well within the session timeout (no heartbeats are
        # sent while it runs); what it cannot lock in time stays pending for the keeper.
        self.acquire_timeout_s = max(1.0, session_s / 2)
        # Stay in the group through a short PostgreSQL outage; leave on a long one so that
        # replicas that can still reach it take the partitions over (0: never leave).
        self.lock_rejoin_after_s = cfg.lock_rejoin_after_s
        # tansu holds a join up to half the session, Kafka up to the rebalance timeout: past
        # this a join is stuck. Seen on tansu when the leader left while the group was forming:
        # it stays the group's leader, the followers' SyncGroup never gets an assignment, and
        # a member that restarts joins the same leaderless round (measured: stalled again).
        # So a stalled member first makes such a departed leader expire
        # (``kafka_clients.expire_departed_leader``), and restarts its consumer only when
        # there was none; the next stall report comes a join timeout later at the earliest.
        self.join_timeout_s = max(8.0, 2 * session_s + 5)
        self._join_reported_at = 0.0
        self.join_stalls = 0
        self._unstall_task: asyncio.Task[None] | None = None
        self.expire_leader: ExpireLeader = expire_departed_leader
        self._notices_on: int | None = None  # the lock connection our join listener is on
        self.join_notices = 0  # rejoins done at another member's notice
        self.start_timeout_s = 15.0
        self.keeper_interval_s = 0.1
        # Survivors remove a dead member from the group at once (its lock connection is gone)
        # instead of waiting for its session timeout; off without PostgreSQL.
        self.peers: PeerWatch | None = None
        if locks is not None and cfg.peer_evict_after_s > 0:
            self.peers = PeerWatch(
                cfg.group_id,
                cfg.replica_id,
                locks.query,
                self._remove_member,
                evict_after_s=cfg.peer_evict_after_s,
                # A record older than a PostgreSQL restart: its member may still be reconnecting
                # (it stays in the group that long without its lock connection).
                stale_after_s=cfg.lock_rejoin_after_s or 30.0,
                clock=clock,
            )

    # -- rebalance listener -------------------------------------------------------------------
    async def revoked(self, revoked: list[TopicPartition]) -> None:
        """A rebalance starts: finish the batch in flight, commit, then release the locks."""
        self._joining_since = self.clock.monotonic()
        async with self._ownership, self._processing:
            try:
                # Bounded: the listener must return within the rebalance timeout. Offsets not
                # committed here are re-read by the next owner and skipped by the history.
                await asyncio.wait_for(self._flush_commit(), self.acquire_timeout_s)
            except Exception as exc:
                log.warning("revoke_commit_failed", error=repr(exc)[:200])
            self.assignment.difference_update(revoked)
            for tp in revoked:
                gone = self.owned.pop(tp, None)
                if gone is not None:
                    self._history(tp, "release", gone.fence)
                # Read ahead but not processed: not ours to process any more, and nothing is
                # lost (only processed offsets were committed; the next owner reads from there).
                self._ahead.pop(tp, None)
                if self.locks is not None:
                    # Also what was locked but never owned (its history claim failed): a lock
                    # kept would make the next owner evict this whole connection.
                    await self.locks.release_partition(tp.topic, tp.partition)
        if revoked:
            log.info("partitions_revoked", partitions=sorted(tp.partition for tp in revoked))

    async def assigned(self, assigned: list[TopicPartition]) -> None:
        """The group gave us ``assigned``: lock and claim each before processing it.

        What cannot be locked now (PostgreSQL down, a holder not gone yet) stays paused and
        pending; the ownership keeper retries it. The member never leaves the group for it.
        """
        self.generation_changes += 1
        started = self.clock.monotonic()
        # How long the group took to hand out this assignment (revocation, JoinGroup and
        # SyncGroup round trips): the broker's share of a takeover, logged beside ours.
        join_s = None if self._joining_since is None else started - self._joining_since
        self._joining_since = None
        self.assignment = set(assigned)
        self._pause_unowned()
        await self._acquire(self.assignment)
        log.info(
            "partitions_assigned",
            partitions=sorted(tp.partition for tp in assigned),
            fences={tp.partition: o.fence for tp, o in self.owned.items()},
            pending=sorted(tp.partition for tp in self.assignment - self.owned.keys()),
            join_s=None if join_s is None else round(join_s, 3),
            acquire_s=round(self.clock.monotonic() - started, 3),
        )

    # -- ownership ----------------------------------------------------------------------------
    async def _acquire(self, tps: set[TopicPartition]) -> bool:
        """Lock and claim each of ``tps`` still assigned and not owned; True if all are owned."""
        async with self._ownership:
            todo = sorted(tp for tp in tps if tp in self.assignment and tp not in self.owned)
            # One connection serialises the lock queries, but the history claims (Redis) of the
            # partitions overlap with them.
            results = await asyncio.gather(*(self._own(tp) for tp in todo), return_exceptions=True)
        failed = {tp.partition: repr(r)[:160] for tp, r in zip(todo, results, strict=True)
                  if isinstance(r, BaseException)}  # fmt: skip
        if failed:
            log.warning("partition_acquire_failed", errors=failed)
        return not failed

    async def _own(self, tp: TopicPartition) -> None:
        sent = time.time()
        fence = 0
        if self.locks is not None:
            fence = await self.locks.acquire_partition(
                tp.topic, tp.partition, timeout_s=self.acquire_timeout_s
            )
        claimed = await asyncio.wait_for(
            self.history.claim(tp.topic, tp.partition, fence), self.acquire_timeout_s
        )
        if tp not in self.assignment:  # revoked meanwhile: let it go again
            if self.locks is not None:
                await self.locks.release_partition(tp.topic, tp.partition)
            return
        self.owned[tp] = Owned(max(fence, claimed))
        self._history(tp, "acquire", self.owned[tp].fence, t_sent=round(sent, 6))
        consumer = self.consumer
        if consumer is not None and tp in consumer.assignment():
            consumer.resume(tp)

    def _pause_unowned(self) -> None:
        """Stop fetching what we may not process (re-fetching it in a loop would only burn CPU)."""
        consumer = self.consumer
        if consumer is None:
            return
        for tp in consumer.assignment() - self.owned.keys():
            consumer.pause(tp)

    async def _drop_ownership(self, reason: str) -> None:
        """Stop processing every partition at once (the batch in flight finishes first)."""
        async with self._ownership, self._processing:
            dropped = sorted(tp.partition for tp in self.owned)
            for tp, owned in self.owned.items():
                self._history(tp, "lost", owned.fence)
            self.owned.clear()
            self._pause_unowned()
        log.warning("ownership_dropped", reason=reason, partitions=dropped)

    def _request_restart(self, reason: str) -> None:
        self._restart_reason = reason
        self._restart.set()

    async def _keep_ownership(self) -> None:
        """Runs beside ``_consume``: keeps the lock connection up and every assigned partition
        locked, or stops processing what is not; reports a join that does not complete."""
        backoff = Backoff(base=0.2, cap=2.0, clock=self.clock)
        while not self._restart.is_set():
            try:
                await self._keep_ownership_once(backoff)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # never let the keeper die: log and try again later
                log.warning("ownership_keeper_failed", error=repr(exc)[:200])
                self._retry_at = self.clock.monotonic() + backoff.next_delay()
            await self.clock.asleep(self.keeper_interval_s)

    async def _keep_ownership_once(self, backoff: Backoff) -> None:
        now = self.clock.monotonic()
        joining_s = 0.0 if self._joining_since is None else now - self._joining_since
        unstalling = self._unstall_task is not None and not self._unstall_task.done()
        if (joining_s > self.join_timeout_s and not unstalling
                and now - self._join_reported_at > self.join_timeout_s):  # fmt: skip
            self._join_reported_at = now
            self.join_stalls += 1
            _join_stalls.add(1)
            log.error("group_join_stalled", waited_s=round(joining_s, 1))
            # A task: expiring a leader waits for two joins the broker holds, and the keeper
            # must go on watching the lock connection meanwhile.
            self._unstall_task = asyncio.create_task(self._unstall(joining_s))
        locks = self.locks
        if locks is not None and (locks.lost.is_set() or not locks.connected):
            if self._lock_down_since is None:
                self._lock_down_since = now
                self._retry_at = now
                await self._drop_ownership("lock connection lost")
            down_s = now - self._lock_down_since
            if 0 < self.lock_rejoin_after_s < down_s:
                log.warning("lock_connection_down_leaving_group", down_s=round(down_s, 1))
                self._request_restart(f"lock connection down for {round(down_s, 1)} s")
                return
            if now < self._retry_at:
                return
            try:
                await locks.connect()
            except Exception as exc:
                delay = backoff.next_delay()
                self._retry_at = self.clock.monotonic() + delay
                log.warning("lock_reconnect_failed", error=repr(exc)[:200],
                            retry_in_s=round(delay, 2))  # fmt: skip
                return
            backoff.reset()
            self.lock_reconnects += 1
            down_s += self.clock.monotonic() - now
            log.info("lock_connection_restored", down_s=round(down_s, 2))
            self._lock_down_since = None
            self._retry_at = 0.0
        if self.assignment - self.owned.keys() and self.clock.monotonic() >= self._retry_at:
            before = set(self.owned)
            if await self._acquire(self.assignment):
                backoff.reset()
                fences = {tp.partition: o.fence for tp, o in self.owned.items() if tp not in before}
                if fences:  # (empty when the listener took them meanwhile)
                    log.info("pending_partitions_acquired", fences=fences)
            else:
                self._retry_at = self.clock.monotonic() + backoff.next_delay()
        await self._listen_for_joins()
        await self._watch_peers()

    async def _unstall(self, joining_s: float) -> None:
        """A join stalled: expire a departed leader if the broker still names one, else restart
        the consumer (a new member, after the run loop's backoff)."""
        leader: str | None = None
        consumer = self.consumer
        if consumer is not None:
            timeout_s = self.cfg.session_timeout_ms / 1000 + 5
            try:
                leader = await self.expire_leader(consumer, self.cfg.group_id, timeout_s)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("departed_leader_check_failed", error=repr(exc)[:200])
        if leader is None:
            log.warning("group_join_stalled_restarting", waited_s=round(joining_s, 1))
            self._request_restart(f"group join stalled for {round(joining_s, 1)} s")
        else:
            # The broker evicts it a session timeout after our join for it, then the next join
            # round elects a live member: no new report (and restart) before that had its time.
            self._join_reported_at = self.clock.monotonic() + self.cfg.session_timeout_ms / 1000

    async def _remove_member(self, member: str) -> int:
        if self.consumer is None:
            raise OwnershipLost("no consumer to send LeaveGroup with")
        return await remove_member(self.consumer, self.cfg.group_id, member)

    async def _listen_for_joins(self) -> None:
        """Listen for other members' join notices on the lock connection (once per connection:
        a listener goes with the connection it was added on)."""
        locks = self.locks
        if locks is None or not locks.connected or self._notices_on == locks.connects:
            return
        self._notices_on = locks.connects  # tried once per connection, whatever the outcome
        try:
            await locks.query("add_listener", JOIN_NOTICE_CHANNEL, self._on_join_notice)
        except Exception as exc:
            log.info("join_notices_unavailable", error=repr(exc)[:200])

    def _on_join_notice(self, _conn: Any, _pid: int, _channel: str, payload: str) -> None:
        group, _, replica = payload.partition("\n")
        if group != self.cfg.group_id or replica == self.cfg.replica_id:
            return
        if self._stopping.is_set() or self.consumer is None or not self.assignment:
            return  # not in a settled group: our own join is under way or we are leaving
        if rejoin_now(self.consumer):
            self.join_notices += 1
            log.info("rejoining_for_new_member", replica=replica)

    async def _announce_join(self) -> None:
        """Tell the others we are about to join, and give them a head start (see
        ``JOIN_NOTICE_LEAD_S``); best effort: without it they rejoin at their next heartbeat."""
        if self.locks is None:
            return
        payload = f"{self.cfg.group_id}\n{self.cfg.replica_id}"
        try:
            await self.locks.query("execute", "SELECT pg_notify($1, $2)", JOIN_NOTICE_CHANNEL,
                                   payload)  # fmt: skip
        except Exception as exc:
            log.info("join_notice_failed", error=repr(exc)[:200])
            return
        await self.clock.asleep(JOIN_NOTICE_LEAD_S)

    async def _watch_peers(self) -> None:
        """Record which member this replica is; remove members whose replica died."""
        peers, locks, consumer = self.peers, self.locks, self.consumer
        if peers is None or locks is None or consumer is None or not locks.connected:
            return
        me = member_id(consumer)
        if not me:
            return  # not joined yet
        try:
            await peers.register(me, locks.connects)
            if peers.due():
                await peers.check(me)
        except Exception as exc:
            # Never the keeper's problem: it sees a lost connection itself, a LeaveGroup that
            # failed is tried again at the next check, and the session timeout still applies.
            log.info("peer_watch_failed", error=repr(exc)[:200])

    # -- lifecycle ----------------------------------------------------------------------------
    async def _start_consumer(self) -> None:
        cfg = self.cfg
        self._restart.clear()  # before the listener can request a restart of this consumer
        self._restart_reason = ""
        self.assignment.clear()
        self.owned.clear()
        self._lock_down_since = None
        self._retry_at = 0.0
        if self.locks is not None and not self.locks.connected:
            # Join only with a lock connection: a member that cannot lock what it is assigned
            # would hold partitions nobody processes.
            await self.locks.connect()
        await asyncio.wait_for(
            ensure_topics(
                cfg.kafka_bootstrap, {cfg.topic: cfg.partitions, cfg.dlq_topic: cfg.partitions}
            ),
            self.start_timeout_s,
        )
        self.consumer = AIOKafkaConsumer(
            **kafka_options(cfg.kafka_bootstrap),
            group_id=cfg.group_id,
            client_id=f"signalman-{cfg.replica_id}",
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            session_timeout_ms=cfg.session_timeout_ms,
            heartbeat_interval_ms=cfg.heartbeat_interval_ms,
            rebalance_timeout_ms=cfg.session_timeout_ms,
            max_poll_interval_ms=max(cfg.session_timeout_ms * 3, 30_000),
            # tansu answers a fetch only after max wait even when data is there (real Kafka
            # answers at min bytes); a short wait keeps latency low on both.
            fetch_max_wait_ms=cfg.fetch_max_wait_ms,
        )
        self._joining_since = self.clock.monotonic()
        # Subscribe after start: a consumer subscribed before start() waits inside start() for
        # its first assignment, unbounded and silent (a stuck join hung replicas for minutes).
        # Joining in the background lets the keeper see a stuck join and restart the member.
        await asyncio.wait_for(self.consumer.start(), self.start_timeout_s)
        await self._announce_join()
        self.consumer.subscribe([cfg.topic], listener=_Listener(self))

    async def _stop_consumer(self) -> None:
        """Commit what was processed (bounded), leave the group, release every lock, stop the
        consumer: in that order, each step's duration logged (``consumer_stopped``)."""
        started = self.clock.monotonic()
        stopping = self._stopping.is_set()
        unstall, self._unstall_task = self._unstall_task, None
        if unstall is not None and not unstall.done():
            unstall.cancel()
        if self.consumer is not None:
            log.info("consumer_stopping", stopping=stopping,
                     commit_in_flight=self._commit_task is not None
                     and not self._commit_task.done(),
                     pending_offsets=len(self._pending_offsets))  # fmt: skip
        await self._flush_before_leaving(STOP_COMMIT_BOUND_S if stopping else 5.0)
        self._pending_offsets.clear()
        flushed_s = self.clock.monotonic() - started
        consumer, self.consumer = self.consumer, None
        self.owned.clear()
        self.assignment.clear()
        self._joining_since = None
        # Only a replica that is stopping sends the first-generation LeaveGroup itself. A restart
        # of the member (a failure, a long PostgreSQL outage) leaves as aiokafka does: on tansu a
        # LeaveGroup of every member of generation 0 at once can leave a departed member as the
        # group's leader and hold the rejoin (test_postgres_restart's rejoin missed its 25 s
        # bound in 1 of 4 quiet runs with it, 0 of 4 without).
        left = consumer is None or not stopping or await self._leave_group(consumer)
        left_s = self.clock.monotonic() - started
        if self.peers is not None and left:
            with contextlib.suppress(Exception):  # best effort: a leftover is found gone later
                await asyncio.wait_for(self.peers.forget_self(), 2.0)
        # Nothing is processed any more: the locks go before the client's stop (up to 10 s), so
        # the next owner locks the partitions as soon as the group hands them over.
        if self.locks is not None:
            await self.locks.close()  # closing the connection releases every lock it held
        if consumer is not None:
            try:
                await asyncio.wait_for(consumer.stop(), 10.0)
            except Exception as exc:
                log.warning("consumer_stop_failed", error=repr(exc)[:200])
            log.info("consumer_stopped", stopping=stopping, commit_s=round(flushed_s, 3),
                     left_s=round(left_s, 3),
                     total_s=round(self.clock.monotonic() - started, 3))  # fmt: skip

    async def _flush_before_leaving(self, bound_s: float) -> None:
        """Commit what was processed, for at most ``bound_s``: a commit not made only makes the
        next owner re-read those records (the history's watermark skips them), while a leave
        held up by a commit the broker does not answer (a rebalance under way) kept a stopping
        replica's partitions unprocessed for 5 s."""
        started = self.clock.monotonic()
        try:
            await asyncio.wait_for(self._flush_commit(), bound_s)
        except Exception as exc:
            if self._commit_task is not None:
                self._commit_task.cancel()  # wait_for ended only the wait, not the commit
            self._commit_task = None
            log.warning("commit_flush_slow", bound_s=bound_s, error=repr(exc)[:200],
                        waited_s=round(self.clock.monotonic() - started, 3))  # fmt: skip

    async def _leave_group(self, consumer: Any) -> bool:
        """Leave the group now, so the others rebalance without waiting for our session to
        expire; False when the group may not have heard it. Then our membership record stays,
        and the peers remove us once our lock connection is closed (``PeerWatch``)."""
        member = member_id(consumer)
        try:
            code = await asyncio.wait_for(
                leave_group(consumer, self.cfg.group_id, LEAVE_STEP_S), 3 * LEAVE_STEP_S + 1.0
            )
        except Exception as exc:
            log.warning("group_leave_request_failed", member_id=member, error=repr(exc)[:200])
            return False
        if code not in (None, NONE, UNKNOWN_MEMBER_ID):
            log.warning("group_leave_refused", member_id=member, error_code=code)
            return False
        if member:
            log.info("group_left", member_id=member, error_code=code)
        return True

    async def run(self) -> None:
        """Consume until ``stop``; any failure leaves the group and rejoins after a backoff."""
        backoff = Backoff(base=0.2, cap=5.0, clock=self.clock)
        while not self._stopping.is_set():
            keeper: asyncio.Task[None] | None = None
            try:
                await self._start_consumer()
                backoff.reset()
                keeper = asyncio.create_task(self._keep_ownership(), name="ownership-keeper")
                await self._consume()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning(
                    "consumer_restarting", error=repr(exc)[:300], attempt=backoff.attempt + 1
                )
            finally:
                if keeper is not None:
                    keeper.cancel()
                    with contextlib.suppress(asyncio.CancelledError, Exception):
                        await keeper
                await self._stop_consumer()
            if not self._stopping.is_set():
                await backoff.wait()

    async def stop(self) -> None:
        self._stopping.set()

    async def close(self) -> None:
        """Leave the group and release every partition lock (also when ``run`` never ran)."""
        await self._stop_consumer()

    # -- processing ----------------------------------------------------------------------------
    async def _consume(self) -> None:
        self._ahead = {}  # records of a previous consumer are not ours to process
        self._ahead_room.set()
        # aiokafka sends the next fetch only once the records it holds are taken: one reader
        # takes them as they arrive, also while a batch is processed, so the next Kafka round
        # trip overlaps the batch (otherwise every record also waited for the batch before it).
        # It is the only caller of getmany; a reader started and cancelled around every batch
        # cost a task, a cancelled fetch wait and an asyncio.wait per batch.
        reader = asyncio.create_task(self._read_ahead(), name="read-ahead")
        try:
            while not self._stopping.is_set():
                if self._restart.is_set():
                    raise OwnershipLost(self._restart_reason or "member restart requested")
                if reader.done():
                    reader.result()  # the consumer failed (stopped, fatal error): restart
                    raise OwnershipLost("the read-ahead of the consumer ended")
                batches = await self._next_batches()
                if not batches:
                    continue
                fetched_at = self.clock.time()
                async with self._processing:
                    offsets: dict[TopicPartition, int] = {}
                    progressed = await self._process_batches(batches, offsets, fetched_at)
                    self._schedule_commit(offsets)
                if not progressed:
                    await self.clock.asleep(0.05)  # waiting for ownership: no spin on refetches
        finally:
            reader.cancel()
            await asyncio.wait({reader})

    async def _next_batches(self) -> dict[TopicPartition, list[Any]]:
        """The records read so far, or wait up to 200 ms for some."""
        if not self._ahead:
            # Awaited directly, with a timer: ``asyncio.wait`` would add a done-callback step
            # before this task wakes, one more turn of a loop that also runs every session's
            # writer (each turn of it is what an event's Kafka hop here is made of).
            loop = asyncio.get_running_loop()
            waiter = self._ahead_waiter = loop.create_future()
            timer = loop.call_later(0.2, _expire, waiter)
            try:
                await waiter
            finally:
                timer.cancel()
                self._ahead_waiter = None
        ahead, self._ahead = self._ahead, {}
        self._ahead_room.set()
        return ahead

    async def _read_ahead(self) -> None:
        """Take fetched records into ``_ahead`` as they arrive, at most ``READ_AHEAD_MAX``
        waiting. Safe to cancel at any point: getmany hands records over only when it returns;
        a rewind (``seek``) drops what aiokafka holds of the partition, so what is read after
        it starts at the rewound offset."""
        try:
            while True:
                if sum(len(r) for r in self._ahead.values()) >= READ_AHEAD_MAX:
                    self._ahead_room.clear()
                    await self._ahead_room.wait()
                    continue
                more = await self.consumer.getmany(timeout_ms=1_000, max_records=READ_AHEAD_MAX)
                if not more:
                    continue
                for tp, records in more.items():
                    self._ahead.setdefault(tp, []).extend(records)
                self._wake_loop()
        finally:
            self._wake_loop()  # a failed consumer: the loop sees it at once and restarts

    def _wake_loop(self) -> None:
        waiter = self._ahead_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _rewind(self, tp: TopicPartition, offset: int) -> None:
        """Fetch ``tp`` again from ``offset``. What was read ahead of it goes too, in the same
        step: processing those later records first would move the history's watermark past the
        rewound ones, which would then be skipped as duplicates (lost)."""
        self.consumer.seek(tp, offset)
        self._ahead.pop(tp, None)

    async def _process_batches(
        self,
        batches: dict[TopicPartition, list[Any]],
        offsets: dict[TopicPartition, int],
        fetched_at: float | None = None,
    ) -> bool:
        """Process the fetched records of every partition we own; False when none were ours.

        One history append for all of them (each record still checked against its own
        partition's fence and watermark): an append per partition cost a Redis command, a task
        and a round trip each, per fetch.
        """
        mine: dict[TopicPartition, tuple[Owned, list[Any]]] = {}
        for tp, records in batches.items():
            owned = self.owned.get(tp)
            if owned is not None:
                mine[tp] = (owned, records)
            elif tp in self.consumer.assignment():
                # Not ours yet (the fetcher can run ahead of the listener still taking the lock).
                # Rewind, so these records are fetched again once we do own it; skipping them
                # would move the position past records nobody processed.
                self._rewind(tp, records[0].offset)
            else:
                self._ahead.pop(tp, None)  # not ours any more
        if not mine:
            return False
        batch = [
            RecordIn(r.value, r.key, SourcePos(tp.topic, tp.partition, r.offset),
                     attempts_of(r.headers), trace_of(r.headers))
            for tp, (_, records) in mine.items() for r in records
        ]  # fmt: skip
        fences = {(tp.topic, tp.partition): owned.fence for tp, (owned, _) in mine.items()}
        expect = {(tp.topic, tp.partition): owned.appended for tp, (owned, _) in mine.items()
                  if owned.appended >= 0}  # fmt: skip
        sent_at = time.time() if history.enabled() else 0.0
        try:
            outcomes = await self.processor.handle_batch(batch, fences, fetched_at, expect)
        except Exception as exc:
            # History or dead-letter topic unreachable: retry the whole batch later (what was
            # appended is skipped as duplicate then); never skip a record.
            log.warning("partition_processing_failed",
                        partitions=sorted(tp.partition for tp in mine),
                        error=repr(exc)[:200])  # fmt: skip
            for tp, (_, records) in mine.items():
                self._rewind(tp, records[0].offset)
            await self.clock.asleep(0.5)
            return True
        fenced = {(r.source.topic, r.source.partition) for r, o in zip(batch, outcomes, strict=True)
                  if o.status == "fenced"}  # fmt: skip
        if fenced:
            for tp in mine:
                if (tp.topic, tp.partition) in fenced:
                    gone = self.owned.pop(tp, None)
                    if gone is not None:
                        self._history(tp, "lost", gone.fence)
            parts = sorted(p for _, p in fenced)
            raise OwnershipLost(f"partitions {parts} are fenced by a newer owner")
        if sent_at:
            appended = {
                (r.source.topic, r.source.partition)
                for r, o in zip(batch, outcomes, strict=True)
                if o.status == "appended"
            }
            for tp, (owned, _) in mine.items():
                if (tp.topic, tp.partition) in appended:
                    self._history(tp, "write", owned.fence, t_sent=round(sent_at, 6))
        behind: dict[tuple[str, int], int] = {}
        for r, o in zip(batch, outcomes, strict=True):
            part = (r.source.topic, r.source.partition)
            if o.status == "behind":
                behind[part] = o.watermark
            elif o.status in ("appended", "duplicate"):
                holder = self.owned.get(TopicPartition(*part))
                if holder is not None:
                    holder.appended = max(holder.appended, r.source.offset)
        for tp, (owned, records) in mine.items():
            wm = behind.get((tp.topic, tp.partition))
            if wm is None:
                owned.position = offsets[tp] = records[-1].offset + 1
            else:
                self._reread_lost(tp, owned, wm, records[0].offset)
                offsets[tp] = owned.position
        return True

    def _reread_lost(self, tp: TopicPartition, owned: Owned, watermark: int, first: int) -> None:
        """The history failed over to a replica that lacked our last appends of ``tp`` (it
        holds them up to ``watermark``): read the partition again from there and commit that
        position, so the lost events are appended again instead of leaving a hole (at least
        once: live subscribers who got one of them from the old primary may get it again)."""
        lost = first - (watermark + 1)
        if lost > MAX_REREAD:
            # Farther back than a failover loses: give up the expectation and go on (what the
            # history lacks is reported to resuming subscribers by its new epoch).
            log.error("history_lost_appends_not_reread", partition=tp.partition,
                      watermark=watermark, position=first)  # fmt: skip
            owned.appended = -1
            owned.position = first
            self._rewind(tp, first)
            return
        log.warning("history_lost_appends_reread", partition=tp.partition,
                    watermark=watermark, missing=lost)  # fmt: skip
        owned.appended = watermark
        owned.position = watermark + 1
        self._rewind(tp, watermark + 1)

    def _history(self, tp: TopicPartition, op: str, fence: int, **extra: Any) -> None:
        history.record("partition", f"{tp.topic}/{tp.partition}", op, fence,
                       self.cfg.replica_id, **extra)  # fmt: skip

    def _schedule_commit(self, offsets: dict[TopicPartition, int]) -> None:
        """Commit in the background, never on the processing path: a slow commit (seen taking
        over a second on a busy broker) must not hold back delivery. Offsets that arrive while
        a commit is in flight, or within ``commit_interval_ms`` after it, are merged and
        committed next, so commits stay in order and cost the broker a few requests a second
        instead of one per fetched batch (re-reading uncommitted records after a crash is cheap:
        the history skips them by watermark)."""
        self._pending_offsets.update(offsets)
        if self._pending_offsets and (self._commit_task is None or self._commit_task.done()):
            self._commit_task = asyncio.create_task(self._commit_loop(paced=True))

    async def _commit_loop(self, paced: bool = False) -> None:
        while self._pending_offsets:
            offsets, self._pending_offsets = self._pending_offsets, {}
            await self._commit(offsets)
            if paced and self.cfg.commit_interval_ms > 0:
                self._commit_pacing = True
                try:
                    await self.clock.asleep(self.cfg.commit_interval_ms / 1000)
                finally:
                    self._commit_pacing = False

    async def _flush_commit(self) -> None:
        """Wait until every processed offset is committed (revocation, shutdown)."""
        while self._commit_task is not None and not self._commit_task.done():
            if self._commit_pacing:  # only pausing between commits: what is pending goes now
                self._commit_task.cancel()
            await asyncio.wait({self._commit_task})
            if not self._commit_task.cancelled() and self._commit_task.exception() is not None:
                log.warning("commit_task_failed", error=repr(self._commit_task.exception())[:200])
        if self._pending_offsets and self.consumer is not None:
            await self._commit_loop()
        self._commit_task = None

    async def _commit(self, offsets: dict[TopicPartition, int]) -> None:
        """One commit for every partition of the batch, after their appends returned."""
        if not offsets:
            return
        started = self.clock.monotonic()
        try:
            await self.consumer.commit(offsets)
            took_s = self.clock.monotonic() - started
            if took_s > SLOW_COMMIT_S:
                log.info("commit_slow", took_s=round(took_s, 3),
                         partitions=sorted(tp.partition for tp in offsets))  # fmt: skip
        except KafkaError as exc:
            # A rebalance is under way; the next owner re-reads from the last commit and the
            # history's watermark skips what we appended.
            log.info("commit_failed", partitions=sorted(tp.partition for tp in offsets),
                     error=repr(exc)[:200])  # fmt: skip

    def lag(self) -> dict[TopicPartition, int]:
        """Records behind the end of each owned partition (this replica's view)."""
        out: dict[TopicPartition, int] = {}
        if self.consumer is None:
            return out
        for tp, owned in self.owned.items():
            high = self.consumer.highwater(tp)
            if high is not None and owned.position >= 0:
                out[tp] = max(0, high - owned.position)
        return out
