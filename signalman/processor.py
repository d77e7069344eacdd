"""Record processing: pipeline, then a fenced idempotent append, or the dead-letter topic.

Shared by the Kafka consumer and the embedded Publish path. No Kafka or gRPC imports: the
dead-letter destination is a callable the caller provides.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import structlog
from opentelemetry import metrics

from pkg.common.clock import SYSTEM_CLOCK, Clock
from signalman.history import AppendResult, History, SourcePos
from signalman.pipeline import Poison, Processed, process_record

log = structlog.get_logger("signalman.processor")
_meter = metrics.get_meter("signalman")
_processed = _meter.create_counter("signalman_records_processed", description="records handled")
_appended = _meter.create_counter("signalman_events_appended", description="events in history")
_duplicates = _meter.create_counter(
    "signalman_duplicate_appends_skipped", description="replayed records already in history"
)
_dead = _meter.create_counter("signalman_dead_lettered", description="poison records")
_age = _meter.create_histogram(
    "signalman_event_age",
    unit="ms",
    description="event age (now - event time) when appended to the history / written to a "
    "subscriber, by stage: how fresh what subscribers see is",
)
_fenced = _meter.create_counter(
    "signalman_fenced_writes", description="appends rejected because this replica lost ownership"
)


def record_age(now: float, event_time: float, stage: str) -> None:
    """Observe how old an event is at ``stage`` (producer clocks may be skewed: never < 0)."""
    _age.record(max(0.0, (now - event_time) * 1000.0), {"stage": stage})


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


@dataclass
class ProcessorStats:
    records: int = 0
    appended: int = 0
    duplicates: int = 0
    dead_lettered: int = 0
    fenced: int = 0


@dataclass(frozen=True)
class Outcome:
    status: str  # "appended", "duplicate", "fenced", "dead-lettered"
    offsets: tuple[int, ...] = ()


class Processor:
    """Turns one record into history entries, exactly once per source position."""

    def __init__(
        self, history: History, dead_letter: DeadLetterFn, clock: Clock = SYSTEM_CLOCK
    ) -> None:
        self.history = history
        self.dead_letter = dead_letter
        self.clock = clock
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

    async def handle_batch(self, records: list[RecordIn], fence: int) -> list[Outcome]:
        """Process a partition's fetched records in order, appending them in one round trip.

        Poison records are dead-lettered first (their acks awaited); raises when the history or
        the dead-letter topic is unreachable, in which case nothing may be committed.
        """
        outcomes: list[Outcome | None] = [None] * len(records)
        pending: list[tuple[int, Processed, SourcePos]] = []
        for i, rec in enumerate(records):
            self.stats.records += 1
            _processed.add(1)
            result = process_record(rec.value, rec.key)
            if isinstance(result, Poison):
                await self._dead_letter(rec, result)
                outcomes[i] = Outcome("dead-lettered")
            else:
                pending.append((i, result, rec.source))
        results = await self.history.append_many(
            [(p.tenant, p.items, src) for _, p, src in pending], fence
        )
        now = self.clock.time()
        for (i, processed, src), res in zip(pending, results, strict=True):
            outcomes[i] = self._account(res, src, fence)
            if res.status == "appended":
                record_age(now, processed.items[0][1].time, "appended")
        return [o if o is not None else Outcome("dead-lettered") for o in outcomes]

    async def _dead_letter(self, rec: RecordIn, poison: Poison) -> None:
        letter = DeadLetter(rec.source, rec.key, rec.value, poison.reason, poison.retryable,
                            rec.attempts)  # fmt: skip
        await self.dead_letter(letter)
        self.stats.dead_lettered += 1
        _dead.add(1, {"retryable": str(poison.retryable).lower()})
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
            self.stats.fenced += 1
            _fenced.add(1)
            log.warning(
                "append_fenced",
                topic=source.topic,
                partition=source.partition,
                offset=source.offset,
                fence=fence,
                current_fence=res.current_fence,
            )
        elif res.status == "duplicate":
            self.stats.duplicates += 1
            _duplicates.add(1)
        else:
            self.stats.appended += len(res.offsets)
            _appended.add(len(res.offsets))
        return Outcome(res.status, res.offsets)
