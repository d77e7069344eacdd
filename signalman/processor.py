"""Record processing: pipeline, then a fenced idempotent append, or the dead-letter topic.

Shared by the Kafka consumer and the embedded Publish path. No Kafka or gRPC imports: the
dead-letter destination is a callable the caller provides.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass

import structlog
from opentelemetry import metrics

from pkg.common import tracing
from pkg.common.clock import SYSTEM_CLOCK, Clock
from pkg.common.metrics import Metrics, Sample
from signalman.history import AppendResult, Expected, Fences, History, SourcePos, fence_of
from signalman.pipeline import Poison, Processed, process_record
from signalman.tracing import ProcessSpans

log = structlog.get_logger("signalman.processor")
_meter = metrics.get_meter("signalman")


def _stats(name: str) -> Callable[[Processor], Iterable[Sample]]:
    def read(p: Processor) -> Iterable[Sample]:
        return [({}, getattr(p.stats, name))]

    return read


def register(registry: Metrics, processor: Processor) -> None:
    """Report ``processor``'s counts on /metrics: read from its own stats at scrape time instead
    of added to per batch (an OpenTelemetry add costs several microseconds, as much as decoding
    a record). Called by the app's wiring; the processor is held weakly."""
    for name, stat, text in (
        ("signalman_records_processed_total", "records", "records handled"),
        ("signalman_events_appended_total", "appended", "events in history"),
        ("signalman_duplicate_appends_skipped_total", "duplicates", "replayed, already in history"),
        ("signalman_dead_lettered_total", "dead_lettered", "poison records sent to the DLQ"),
        ("signalman_fenced_writes_total", "fenced", "appends refused after losing ownership"),
    ):  # fmt: skip
        registry.counter(name, text, _stats(stat), (), processor)


AGE_BUCKETS_S = (
    0.001, 0.002, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5,
    1.0, 2.5, 10.0,
)  # fmt: skip
_age = _meter.create_histogram(
    "signalman_event_age_seconds",
    unit="s",
    description="event age (now - event time) when fetched from Kafka / appended to the "
    "history / written to a subscriber, by stage: where an event's latency is spent (one "
    "event in 16, by offset)",
    # Finer than the default buckets below 100 ms, where the latency target (50 ms) lies.
    explicit_bucket_boundaries_advisory=AGE_BUCKETS_S,
)


# One event in AGE_SAMPLE_EVERY (by offset, so independent of its latency) is observed: a
# histogram observation costs 10-50 us, more than decoding the event; every event at every stage
# was 12% of a replica's CPU at 2,000 events/s, and one in 8 still 5-10% (CPU-time samples).
# One in 16 still gives a few hundred observations per stage in a benchmark's 3.5 s at 2,000/s.
AGE_SAMPLE_EVERY = 16
_STAGE_ATTRS = {s: {"stage": s} for s in ("fetched", "appended", "delivered")}


def age_sampled(offset: int) -> bool:
    """Whether the event at ``offset`` (Kafka or history offset) is one whose age is observed."""
    return offset % AGE_SAMPLE_EVERY == 0


def record_age(now: float, event_time: float, stage: str) -> None:
    """Observe how old an event is at ``stage`` (producer clocks may be skewed: never < 0)."""
    attrs = _STAGE_ATTRS.get(stage) or {"stage": stage}
    _age.record(max(0.0, now - event_time), attrs)


@dataclass(frozen=True)
class DeadLetter:
    """A poison record and why: what the dead-letter topic receives."""

    source: SourcePos
    key: bytes | None
    value: bytes | None
    reason: str
    retryable: bool
    attempts: int = 0  # re-drives this record already had


DeadLetterFn = Callable[[DeadLetter], Awaitable[None]]


@dataclass(frozen=True)
class RecordIn:
    """One consumed record as the processor needs it."""

    value: bytes | None
    key: bytes | None
    source: SourcePos
    attempts: int = 0
    trace: str = ""  # the traceparent its producer sent in the record headers ("": none)


@dataclass
class ProcessorStats:
    records: int = 0
    appended: int = 0
    duplicates: int = 0
    dead_lettered: int = 0
    fenced: int = 0
    behind: int = 0  # records not appended: the history had lost earlier appends (re-read)


@dataclass(frozen=True)
class Outcome:
    status: str  # "appended", "duplicate", "fenced", "behind", "dead-lettered"
    offsets: tuple[int, ...] = ()
    watermark: int = -1  # "behind": the partition's offset the history holds up to


_DEAD_LETTERED = Outcome("dead-lettered")


class Processor:
    """Turns one record into history entries, exactly once per source position."""

    def __init__(
        self,
        history: History,
        dead_letter: DeadLetterFn,
        clock: Clock = SYSTEM_CLOCK,
        max_event_bytes: int = 0,
    ) -> None:
        self.history = history
        self.dead_letter = dead_letter
        self.clock = clock
        # Events that no subscriber message could carry are dead-lettered at intake (0: off).
        self.max_event_bytes = max_event_bytes
        self.stats = ProcessorStats()

    async def handle(
        self,
        value: bytes | None,
        key: bytes | None,
        source: SourcePos,
        fence: int,
        attempts: int = 0,
    ) -> Outcome:
        """Process one record (see ``handle_batch``)."""
        (outcome,) = await self.handle_batch([RecordIn(value, key, source, attempts)], fence)
        return outcome

    async def handle_batch(
        self,
        records: list[RecordIn],
        fence: Fences,
        fetched_at: float | None = None,
        expect: Expected | None = None,
    ) -> list[Outcome]:
        """Process fetched records in order, appending them in one round trip. ``fence`` is the
        fencing token of every source partition (one int when they share it).

        Poison records are dead-lettered first (their acks awaited); raises when the history or
        the dead-letter topic is unreachable, in which case nothing may be committed.
        ``fetched_at`` (unix s) is when the consumer received the records: the ages at fetch and
        at append split an event's latency into the Kafka hop and our processing. ``expect``:
        the offset last appended per source partition (``History.append_many``); records of a
        partition the history holds less of come back "behind", not appended.
        """
        outcomes: list[Outcome] = [_DEAD_LETTERED] * len(records)
        if not tracing.ENABLED:
            return await self._handle(records, outcomes, fence, fetched_at, None, expect)
        # Traced: a consumer span per record that carries its producer's context, ended with
        # the record's outcome whatever happens (see signalman.tracing).
        spans = ProcessSpans(records)
        try:
            return await self._handle(records, outcomes, fence, fetched_at, spans, expect)
        finally:
            spans.end(outcomes)

    async def _handle(
        self,
        records: list[RecordIn],
        outcomes: list[Outcome],
        fence: Fences,
        fetched_at: float | None,
        spans: ProcessSpans | None,
        expect: Expected | None = None,
    ) -> list[Outcome]:
        pending: list[tuple[int, Processed, SourcePos]] = []
        for i, rec in enumerate(records):
            result = process_record(rec.value, rec.key, self.max_event_bytes)
            if isinstance(result, Poison):
                await self._dead_letter(rec, result)
            else:
                if spans is not None:
                    result = spans.carry(i, result)
                pending.append((i, result, rec.source))
        self.stats.records += len(records)  # (exported by _observe)
        if fetched_at is not None:
            for _, processed, src in pending:
                if age_sampled(src.offset):
                    record_age(fetched_at, processed.items[0][1].time, "fetched")
        appends = [(p.tenant, p.items, src) for _, p, src in pending]
        if spans is not None and spans.any:
            with spans.append_span(len(appends)):
                results = await self.history.append_many(appends, fence, expect)
        else:
            results = await self.history.append_many(appends, fence, expect)
        now = self.clock.time()
        appended = duplicates = 0
        for (i, processed, src), res in zip(pending, results, strict=True):
            outcomes[i] = Outcome(res.status, res.offsets, res.watermark)
            if res.status == "behind":
                self.stats.behind += 1
            elif res.status == "appended":
                appended += len(res.offsets)
                if age_sampled(src.offset):
                    record_age(now, processed.items[0][1].time, "appended")
            elif res.status == "duplicate":
                duplicates += 1
            else:
                self._fenced(res, src, fence_of(fence, src))
        self.stats.appended += appended
        self.stats.duplicates += duplicates
        return outcomes

    async def _dead_letter(self, rec: RecordIn, poison: Poison) -> None:
        letter = DeadLetter(rec.source, rec.key, rec.value, poison.reason, poison.retryable,
                            rec.attempts)  # fmt: skip
        await self.dead_letter(letter)
        self.stats.dead_lettered += 1
        log.warning(
            "event_dead_lettered",
            topic=rec.source.topic,
            partition=rec.source.partition,
            offset=rec.source.offset,
            reason=poison.reason,
        )

    async def append(self, processed: Processed, source: SourcePos, fence: int) -> Outcome:
        res = await self.history.append(processed.tenant, processed.items, source, fence)
        return self._account(res, source, fence)

    def _account(self, res: AppendResult, source: SourcePos, fence: int) -> Outcome:
        if res.status == "fenced":
            self._fenced(res, source, fence)
        elif res.status == "duplicate":
            self.stats.duplicates += 1
        else:
            self.stats.appended += len(res.offsets)
        return Outcome(res.status, res.offsets)

    def _fenced(self, res: AppendResult, source: SourcePos, fence: int) -> None:
        self.stats.fenced += 1
        log.warning(
            "append_fenced",
            topic=source.topic,
            partition=source.partition,
            offset=source.offset,
            fence=fence,
            current_fence=res.current_fence,
        )
