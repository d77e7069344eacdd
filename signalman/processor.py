"""Record processing: pipeline, then a fenced idempotent append, or the dead-letter topic.

Shared by the Kafka consumer and the embedded Publish path. No Kafka or gRPC imports: the
dead-letter destination is a callable the caller provides.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import structlog
from opentelemetry import metrics

from signalman.history import History, SourcePos
from signalman.pipeline import Poison, Processed, process_record

log = structlog.get_logger("signalman.processor")
_meter = metrics.get_meter("signalman")
_processed = _meter.create_counter("signalman_records_processed", description="records handled")
_appended = _meter.create_counter("signalman_events_appended", description="events in history")
_duplicates = _meter.create_counter(
    "signalman_duplicate_appends_skipped", description="replayed records already in history"
)
_dead = _meter.create_counter("signalman_dead_lettered", description="poison records")
_fenced = _meter.create_counter(
    "signalman_fenced_writes", description="appends rejected because this replica lost ownership"
)


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

    def __init__(self, history: History, dead_letter: DeadLetterFn) -> None:
        self.history = history
        self.dead_letter = dead_letter
        self.stats = ProcessorStats()

    async def handle(
        self,
        value: bytes | None,
        key: bytes | None,
        source: SourcePos,
        fence: int,
        attempts: int = 0,
    ) -> Outcome:
        """Process one record. Raises only when the history is unreachable (do not commit)."""
        self.stats.records += 1
        _processed.add(1)
        result = process_record(value, key)
        if isinstance(result, Poison):
            letter = DeadLetter(source, key, value, result.reason, result.retryable, attempts)
            await self.dead_letter(letter)
            self.stats.dead_lettered += 1
            _dead.add(1, {"retryable": str(result.retryable).lower()})
            log.warning(
                "event_dead_lettered",
                topic=source.topic,
                partition=source.partition,
                offset=source.offset,
                reason=result.reason,
            )
            return Outcome("dead-lettered")
        return await self.append(result, source, fence)

    async def append(self, processed: Processed, source: SourcePos, fence: int) -> Outcome:
        res = await self.history.append(processed.tenant, processed.items, source, fence)
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
