"""Signalman's part of an event's trace: consume, history append, delivery.

An event published by Foghorn carries the context of its ``publish`` span in the Kafka record
headers (``pkg.events.kafka``). Here:

- each consumed record that carries a context gets a ``process`` span (CONSUMER), its child,
  from the moment the batch is handled until its outcome (appended, duplicate, fenced,
  dead-lettered) is known;
- the batch's one history append is an ``append`` span: the child of the record's span when the
  batch holds one traced record; when it holds several, parent/child would be wrong for all but
  one of them, so it links to each record's span instead;
- the events keep the context of their record's span in the history entry, so the replica
  that delivers them (any replica: subscribers are spread over all) makes a ``deliver`` span as
  its child, for the subscribers of that replica.

Only records that arrive with a context are traced (no new root per record); nothing here runs
when tracing is off.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import replace
from typing import Any, Protocol, TypeVar

from opentelemetry import trace
from opentelemetry.trace import Link, SpanKind

from pkg.common import tracing
from pkg.events.sink import Event
from signalman.history import SourcePos

_TRACER = "signalman"


# What these spans read of the processor's records, results and outcomes (signalman.processor
# and signalman.pipeline use this module, not the other way round).
class RecordIn(Protocol):
    @property
    def source(self) -> SourcePos: ...

    @property
    def trace(self) -> str: ...


class Processed(Protocol):
    @property
    def items(self) -> list[tuple[str, Event]]: ...


class Outcome(Protocol):
    @property
    def status(self) -> str: ...

    @property
    def offsets(self) -> tuple[int, ...]: ...


P = TypeVar("P", bound=Processed)


def _tracer() -> trace.Tracer:
    return tracing.tracer(_TRACER)


class ProcessSpans:
    """The ``process`` spans of one fetched batch (see the module docstring)."""

    def __init__(self, records: Sequence[RecordIn]) -> None:
        tracer = _tracer()
        self.spans: dict[int, trace.Span] = {}
        self.parents: dict[int, str] = {}  # the traceparent each record's events carry on
        for i, rec in enumerate(records):
            parent = tracing.context_of(rec.trace)
            if parent is None:
                continue
            source = rec.source
            span = tracer.start_span(
                f"process {source.topic}",
                context=parent,
                kind=SpanKind.CONSUMER,
                attributes={
                    "messaging.system": "kafka",
                    "messaging.operation.type": "process",
                    "messaging.destination.name": source.topic,
                    "messaging.destination.partition.id": str(source.partition),
                    "messaging.kafka.offset": source.offset,
                },
            )
            self.spans[i] = span
            with trace.use_span(span):
                self.parents[i] = tracing.current_traceparent()

    @property
    def any(self) -> bool:
        return bool(self.spans)

    def carry(self, i: int, processed: P) -> P:
        """``processed`` with its events carrying record ``i``'s span context to the history."""
        parent = self.parents.get(i)
        if not parent:
            return processed
        items = [(channel, replace(event, trace=parent)) for channel, event in processed.items]
        return replace(processed, items=items)  # type: ignore[type-var]

    @contextlib.contextmanager
    def append_span(self, records: int) -> Iterator[trace.Span]:
        """The span of the batch's history append."""
        contexts = [span.get_span_context() for span in self.spans.values()]
        attributes: dict[str, Any] = {"signalman.records": records}
        if len(contexts) == 1:
            (only,) = self.spans.values()
            ctx = trace.set_span_in_context(only)
            with _tracer().start_as_current_span(
                "history append", context=ctx, attributes=attributes
            ) as span:
                yield span
            return
        # Fan-in: one append for records of several traces, a child of none of them.
        with _tracer().start_as_current_span(
            "history append",
            context=trace.set_span_in_context(trace.INVALID_SPAN),
            links=[Link(c) for c in contexts],
            attributes=attributes,
        ) as span:
            yield span

    def end(self, outcomes: Sequence[Outcome]) -> None:
        for i, span in self.spans.items():
            outcome = outcomes[i]
            span.set_attribute("signalman.outcome", outcome.status)
            if outcome.offsets:
                span.set_attribute("signalman.history.offset", outcome.offsets[0])
            span.end()


def deliver_span(trace_parent: str, tenant: str, offset: int, sessions: int) -> trace.Span | None:
    """The span of handing history entry ``offset`` to this replica's ``sessions`` subscribers
    (None when the entry carries no context). The caller ends it."""
    parent = tracing.context_of(trace_parent)
    if parent is None:
        return None
    return _tracer().start_span(
        "deliver",
        context=parent,
        kind=SpanKind.PRODUCER,
        attributes={
            "signalman.tenant": tenant,
            "signalman.history.offset": offset,
            "signalman.subscribers": sessions,
        },
    )
