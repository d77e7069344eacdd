"""The consumer's hot path (``GroupMember._consume``): read-ahead, rewinds, commits after appends.

These drive the processing loop with a stand-in for aiokafka's consumer (getmany / seek /
commit over in-memory partition logs) and the in-memory history, so each interleaving is exact;
the same paths run against a real broker and Redis in ``test_replicas.py`` and
``test_integration_kafka.py``.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from dataclasses import dataclass
from typing import Any

import pytest
from aiokafka import TopicPartition

from api_realtime.config import SignalmanConfig
from pkg.common.clock import SYSTEM_CLOCK, Clock, FakeClock
from pkg.events import Event
from pkg.events.envelope import encode_event
from signalman.consumer import GroupMember, Owned
from signalman.history.memory import MemoryHistory
from signalman.processor import DeadLetter, Processor
from tests.signalman.conftest import wait_until

TOPIC = "events"
TENANTS = ["acme", "globex"]


@dataclass(frozen=True)
class Record:
    offset: int
    key: bytes
    value: bytes
    headers: tuple[tuple[str, bytes], ...] = ()


class PartitionLogs:
    """aiokafka's consumer as the hot path uses it, over fixed partition logs. ``getmany`` hands
    out at most ``chunk`` records per partition per call, like one fetch response."""

    def __init__(self, logs: dict[TopicPartition, list[Record]], history: MemoryHistory) -> None:
        self.logs = logs
        self.history = history
        self.position = dict.fromkeys(logs, 0)
        self.chunk = 5
        self.getmany_calls = 0
        self.commits: list[dict[TopicPartition, int]] = []
        self.commit_times: list[float] = []
        self.committed_beyond_history: list[tuple[TopicPartition, int, int]] = []

    def assignment(self) -> set[TopicPartition]:
        return set(self.logs)

    def seek(self, tp: TopicPartition, offset: int) -> None:
        self.position[tp] = offset

    async def getmany(self, timeout_ms: int = 0, max_records: int | None = None) -> Any:
        self.getmany_calls += 1
        await asyncio.sleep(0)  # a fetch: other tasks run meanwhile
        out = {}
        for tp, log in self.logs.items():
            taken = log[self.position[tp] : self.position[tp] + self.chunk]
            if taken:
                out[tp] = taken
                self.position[tp] += len(taken)
        if not out and timeout_ms:
            await asyncio.sleep(0.001)
        return out

    async def commit(self, offsets: dict[TopicPartition, int]) -> None:
        for tp, offset in offsets.items():
            appended = await self.history.watermark(tp.topic, tp.partition)
            if offset - 1 > appended:
                self.committed_beyond_history.append((tp, offset, appended))
        self.commits.append(dict(offsets))
        self.commit_times.append(time.monotonic())


class FlakyHistory(MemoryHistory):
    """Fails the ``fail_call``-th append (after a pause, so read-ahead happens meanwhile);
    ``hold`` keeps every append waiting until it is set."""

    def __init__(self, fail_call: int = 0) -> None:
        super().__init__(max_len=10_000)
        self.fail_call = fail_call
        self.calls = 0
        self.failed = 0
        self.hold = asyncio.Event()
        self.hold.set()

    async def append_many(self, records: Any, fence: Any, expect: Any = None) -> Any:
        self.calls += 1
        await self.hold.wait()
        if self.calls == self.fail_call:
            await asyncio.sleep(0.01)
            self.failed += 1
            raise ConnectionError("history unreachable")
        return await super().append_many(records, fence, expect)


def partition_logs(per_partition: int) -> dict[TopicPartition, list[Record]]:
    logs = {}
    for p, tenant in enumerate(TENANTS):
        events = [Event("stream.started", tenant, {"seq": i}) for i in range(per_partition)]
        logs[TopicPartition(TOPIC, p)] = [
            Record(i, tenant.encode(), encode_event(e)) for i, e in enumerate(events)
        ]
    return logs


async def no_dead_letters(letter: DeadLetter) -> None:
    raise AssertionError(f"unexpected dead letter: {letter.reason}")


def member_over(
    logs: dict[TopicPartition, list[Record]], history: FlakyHistory, clock: Clock | None = None
) -> Any:
    cfg = SignalmanConfig(kafka_bootstrap="unused:0", commit_interval_ms=100)
    clock = clock or FakeClock()
    member = GroupMember(
        cfg, Processor(history, no_dead_letters, clock), history, None, clock=clock
    )
    member.consumer = PartitionLogs(logs, history)
    member.owned = {tp: Owned(fence=1) for tp in logs}
    return member


async def seqs(history: MemoryHistory, tenant: str) -> list[int]:
    return [e.event.data["seq"] for e in await history.read_after(tenant, 0, 100_000)]


def appended_all(history: MemoryHistory, count: int) -> Any:
    async def check() -> bool:
        heads = [(await history.info(t)).head_offset for t in TENANTS]
        return all(head >= count for head in heads)

    return check


def committed(consumer: PartitionLogs) -> dict[TopicPartition, int]:
    final: dict[TopicPartition, int] = {}
    for commit in consumer.commits:
        final.update(commit)
    return final


async def run_until_appended(member: Any, history: MemoryHistory, count: int) -> None:
    task = asyncio.create_task(member._consume())
    try:
        await wait_until(appended_all(history, count), timeout=15)
    finally:
        await member.stop()
        await asyncio.wait_for(task, 10)
    await member._flush_commit()


@pytest.mark.timeout(60)
async def test_a_failed_append_is_retried_from_its_first_record_before_anything_read_ahead() -> (
    None
):
    logs = partition_logs(200)
    history = FlakyHistory(fail_call=3)
    member = member_over(logs, history)
    await run_until_appended(member, history, 200)
    assert history.failed == 1
    for tenant in TENANTS:
        # Nothing read ahead of the failed batch was appended before it: no loss, no reorder.
        assert await seqs(history, tenant) == list(range(200))
    consumer = member.consumer
    assert consumer.committed_beyond_history == []  # commits only after the append
    assert committed(consumer) == dict.fromkeys(logs, 200)


@pytest.mark.timeout(60)
async def test_records_are_taken_from_the_consumer_while_a_batch_is_appended() -> None:
    logs = partition_logs(50)
    history = FlakyHistory()
    member = member_over(logs, history)
    history.hold.clear()  # the first append waits
    task = asyncio.create_task(member._consume())
    try:
        await wait_until(lambda: history.calls >= 1)
        consumer = member.consumer
        first_batch_end = 5
        # aiokafka fetches again only once its records are taken: they must not wait for the
        # append in flight.
        await wait_until(lambda: all(p > first_batch_end for p in consumer.position.values()))
        assert history.calls == 1  # still the first batch (one append for every partition)
        history.hold.set()
        await wait_until(appended_all(history, 50))
    finally:
        await member.stop()
        await asyncio.wait_for(task, 10)
    for tenant in TENANTS:
        assert await seqs(history, tenant) == list(range(50))


@pytest.mark.timeout(60)
async def test_commits_are_paced_and_the_last_offsets_are_flushed() -> None:
    logs = partition_logs(1_000)
    history = FlakyHistory()
    member = member_over(logs, history, SYSTEM_CLOCK)  # pacing is about real time
    await run_until_appended(member, history, 1_000)
    consumer = member.consumer
    assert committed(consumer) == dict.fromkeys(logs, 1_000)  # the flush commits the rest
    assert consumer.committed_beyond_history == []
    # Background commits are at least commit_interval_ms apart (the final flush is not).
    gaps = [b - a for a, b in itertools.pairwise(consumer.commit_times[:-1])]
    assert all(gap >= 0.09 for gap in gaps), gaps
    assert len(consumer.commits) < history.calls / 4  # far fewer commits than batches


async def test_records_read_ahead_for_a_revoked_partition_are_dropped_on_revocation() -> None:
    logs = partition_logs(20)
    history = FlakyHistory()
    member = member_over(logs, history)
    # What the read-ahead took while the batch before the revocation was processed.
    member._ahead = await member.consumer.getmany(max_records=500)
    revoked, kept = sorted(logs)
    assert member._ahead.keys() == {revoked, kept}
    await member.revoked([revoked])
    # Not ours any more: the next owner reads them again from the last commit.
    assert member._ahead.keys() == {kept}
    assert revoked not in member.owned
    assert [r.offset for r in member._ahead[kept]] == [0, 1, 2, 3, 4]


class FailingLogs(PartitionLogs):
    """A consumer whose fetches fail after ``ok_calls`` (a stopped or broken aiokafka client)."""

    ok_calls = 3

    async def getmany(self, timeout_ms: int = 0, max_records: int | None = None) -> Any:
        if self.getmany_calls >= self.ok_calls:
            self.getmany_calls += 1
            await asyncio.sleep(0)
            raise RuntimeError("consumer broken")
        return await super().getmany(timeout_ms, max_records)


@pytest.mark.timeout(30)
async def test_a_consumer_that_fails_to_fetch_ends_the_loop_for_a_restart() -> None:
    logs = partition_logs(50)
    history = FlakyHistory()
    member = member_over(logs, history)
    member.consumer = FailingLogs(logs, history)
    started = time.monotonic()
    with pytest.raises(RuntimeError, match="consumer broken"):
        await asyncio.wait_for(member._consume(), 10)
    # Promptly (the loop does not keep waiting for records); what was fetched was appended.
    assert time.monotonic() - started < 1.0
    assert [len(await seqs(history, t)) > 0 for t in TENANTS] == [True] * len(TENANTS)


class FailingOverHistory(FlakyHistory):
    """Before its ``lose_at``-th append, forgets the last ``lose`` appends of partition 0, as a
    Redis replica promoted without them would."""

    def __init__(self, lose_at: int, lose: int) -> None:
        super().__init__()
        self.lose_at, self.lose = lose_at, lose

    async def append_many(self, records: Any, fence: Any, expect: Any = None) -> Any:
        if self.calls + 1 == self.lose_at:
            self.lose_last(TOPIC, 0, TENANTS[0], self.lose)
        return await super().append_many(records, fence, expect)


@pytest.mark.timeout(60)
async def test_appends_a_failed_over_history_lost_are_read_again_from_its_watermark() -> None:
    logs = partition_logs(100)
    history = FailingOverHistory(lose_at=6, lose=7)
    member = member_over(logs, history)
    await run_until_appended(member, history, 100)
    # The partition was read again from where the history stood: no hole, nothing twice, in
    # order; the other partition went on untouched.
    for tenant in TENANTS:
        assert await seqs(history, tenant) == list(range(100))
    assert member.processor.stats.behind >= 1
    consumer = member.consumer
    assert consumer.committed_beyond_history == []
    assert committed(consumer) == dict.fromkeys(logs, 100)
