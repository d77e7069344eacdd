"""Consumer-group membership: process only the partitions this replica owns, commit after append.

Every replica joins one group. On assignment the replica takes the partition's advisory lock and a
new fencing token (``ownership.PartitionLocks``) and raises the token in the history before it
processes anything; on revocation it waits for the in-flight batch (whose offsets are committed
when it finishes), then releases the lock. The processing lock is held only while a batch is
processed, never across ``getmany``: aiokafka's rebalance listener runs while ``getmany`` waits and
must be able to take it (eager rebalances are stop-the-world).
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass
from typing import Any

import structlog
from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError, TopicAlreadyExistsError

from pkg.common.clock import SYSTEM_CLOCK, Clock
from signalman.config import SignalmanConfig
from signalman.deadletter import attempts_of
from signalman.history import History, SourcePos
from signalman.ownership import OwnershipLost, PartitionLocks
from signalman.processor import Processor, RecordIn

log = structlog.get_logger("signalman.consumer")


@dataclass
class Owned:
    fence: int
    position: int = -1  # next offset to process (-1: unknown until the first record)


async def ensure_topics(bootstrap: str, topics: dict[str, int], timeout_s: float = 10.0) -> None:
    """Create the topics that do not exist yet (partition counts are only used on creation)."""
    admin = AIOKafkaAdminClient(
        bootstrap_servers=bootstrap, request_timeout_ms=int(timeout_s * 1000)
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
        cfg: SignalmanConfig,
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
        self._restart = asyncio.Event()
        self._stopping = asyncio.Event()
        self.generation_changes = 0

    # -- rebalance listener -------------------------------------------------------------------
    async def revoked(self, revoked: list[TopicPartition]) -> None:
        async with self._processing:  # the in-flight batch finishes (and commits) first
            await self._flush_commit()
            for tp in revoked:
                if self.owned.pop(tp, None) is not None and self.locks is not None:
                    await self.locks.release_partition(tp.topic, tp.partition)
        if revoked:
            log.info("partitions_revoked", partitions=sorted(tp.partition for tp in revoked))

    async def assigned(self, assigned: list[TopicPartition]) -> None:
        self.generation_changes += 1
        try:
            for tp in assigned:
                fence = 0
                if self.locks is not None:
                    fence = await self.locks.acquire_partition(tp.topic, tp.partition)
                fence = max(fence, await self.history.claim(tp.topic, tp.partition, fence))
                self.owned[tp] = Owned(fence)
        except Exception as exc:  # cannot own safely: leave the group and rejoin from scratch
            log.error("partition_acquire_failed", error=repr(exc)[:200])
            self.owned.clear()
            self._restart.set()
            return
        log.info(
            "partitions_assigned",
            partitions=sorted(tp.partition for tp in assigned),
            fences={tp.partition: o.fence for tp, o in self.owned.items()},
        )

    # -- lifecycle ----------------------------------------------------------------------------
    async def _start_consumer(self) -> None:
        cfg = self.cfg
        await ensure_topics(
            cfg.kafka_bootstrap, {cfg.topic: cfg.partitions, cfg.dlq_topic: cfg.partitions}
        )
        if self.locks is not None and not self.locks.connected:
            await self.locks.connect()
        self.consumer = AIOKafkaConsumer(
            bootstrap_servers=cfg.kafka_bootstrap,
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
        self.consumer.subscribe([cfg.topic], listener=_Listener(self))
        await self.consumer.start()
        self._restart.clear()

    async def _stop_consumer(self) -> None:
        await self._flush_commit()
        self._pending_offsets.clear()
        consumer, self.consumer = self.consumer, None
        self.owned.clear()
        if consumer is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(consumer.stop(), 10.0)
        if self.locks is not None:
            await self.locks.close()  # closing the connection releases every lock it held

    async def run(self) -> None:
        """Consume until ``stop``; any failure leaves the group and rejoins after a backoff."""
        failures = 0
        while not self._stopping.is_set():
            try:
                await self._start_consumer()
                failures = 0
                await self._consume()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                failures += 1
                log.warning("consumer_restarting", error=repr(exc)[:300], failures=failures)
            finally:
                await self._stop_consumer()
            if not self._stopping.is_set():
                await self.clock.asleep(min(5.0, 0.2 * 2 ** min(failures, 5)))

    async def stop(self) -> None:
        self._stopping.set()

    # -- processing ----------------------------------------------------------------------------
    async def _consume(self) -> None:
        while not self._stopping.is_set():
            if self._restart.is_set():
                raise OwnershipLost("could not take ownership of an assigned partition")
            if self.locks is not None and self.locks.lost.is_set():
                raise OwnershipLost("lock connection lost")
            batches = await self.consumer.getmany(timeout_ms=200, max_records=500)
            if not batches:
                continue
            async with self._processing:
                offsets: dict[TopicPartition, int] = {}
                # Partitions are independent: their history appends go out concurrently.
                progressed = await asyncio.gather(
                    *(self._process_partition(tp, r, offsets) for tp, r in batches.items())
                )
                self._schedule_commit(offsets)
            if not any(progressed):
                await self.clock.asleep(0.05)  # waiting for ownership: do not spin on refetches

    async def _process_partition(
        self, tp: TopicPartition, records: list[Any], offsets: dict[TopicPartition, int]
    ) -> bool:
        """Process one partition's records; False when they were not ours to process."""
        owned = self.owned.get(tp)
        if owned is None:
            # Not ours yet (the fetcher can run ahead of the listener still taking the lock) or not
            # ours any more. Rewind, so these records are fetched again once we do own it;
            # skipping them would move the position past records nobody processed.
            if tp in self.consumer.assignment():
                self.consumer.seek(tp, records[0].offset)
            return False
        batch = [
            RecordIn(r.value, r.key, SourcePos(tp.topic, tp.partition, r.offset),
                     attempts_of(r.headers))
            for r in records
        ]  # fmt: skip
        try:
            outcomes = await self.processor.handle_batch(batch, owned.fence)
        except Exception as exc:
            # History or dead-letter topic unreachable: retry the whole batch later (what was
            # appended is skipped as duplicate then); never skip a record.
            log.warning("partition_processing_failed", partition=tp.partition,
                        offset=records[0].offset, error=repr(exc)[:200])  # fmt: skip
            self.consumer.seek(tp, records[0].offset)
            await self.clock.asleep(0.5)
            return True
        if any(o.status == "fenced" for o in outcomes):
            self.owned.pop(tp, None)
            raise OwnershipLost(f"partition {tp.partition} is fenced by a newer owner")
        done = records[-1].offset
        owned.position = done + 1
        offsets[tp] = done + 1
        return True

    def _schedule_commit(self, offsets: dict[TopicPartition, int]) -> None:
        """Commit in the background, never on the processing path: a slow commit (seen taking
        over a second on a busy broker) must not hold back delivery. Offsets that arrive while
        a commit is in flight are merged and committed next, so commits stay in order."""
        self._pending_offsets.update(offsets)
        if self._pending_offsets and (self._commit_task is None or self._commit_task.done()):
            self._commit_task = asyncio.create_task(self._commit_loop())

    async def _commit_loop(self) -> None:
        while self._pending_offsets:
            offsets, self._pending_offsets = self._pending_offsets, {}
            await self._commit(offsets)

    async def _flush_commit(self) -> None:
        """Wait until every processed offset is committed (revocation, shutdown)."""
        while self._commit_task is not None and not self._commit_task.done():
            with contextlib.suppress(Exception):
                await self._commit_task
        if self._pending_offsets and self.consumer is not None:
            await self._commit_loop()
        self._commit_task = None

    async def _commit(self, offsets: dict[TopicPartition, int]) -> None:
        """One commit for every partition of the batch, after their appends returned."""
        if not offsets:
            return
        try:
            await self.consumer.commit(offsets)
        except KafkaError as exc:
            # A rebalance is under way; the next owner re-reads from the last commit and the
            # history's watermark skips what we appended.
            log.info("commit_failed", partitions=sorted(tp.partition for tp in offsets),
                     error=repr(exc)[:200])  # fmt: skip

    def lag(self) -> dict[TopicPartition, int]:
        out = {}
        if self.consumer is None:
            return out
        for tp, owned in self.owned.items():
            high = self.consumer.highwater(tp)
            if high is not None and owned.position >= 0:
                out[tp] = max(0, high - owned.position)
        return out
