"""Traces of calls made through pkg.clients: a span per call, a span per attempt.

When tracing is on (``pkg.common.tracing.setup_tracing`` found an exporter):

- every call through the engine runs inside a client *call* span (``call <method>``) that
  covers all its attempts and backoff sleeps; its status is the call's outcome;
- every attempt is a child span of it, made by the maintained gRPC instrumentation
  (``opentelemetry-instrumentation-grpc``) on the underlying channels, or the httpx
  instrumentation for HTTP, which also put the W3C ``traceparent`` in the attempt's metadata or
  headers: the callee's server span continues the trace;
- ``TracingInstrumentation`` (one of the default instrumentation hooks) records, as events on
  the call span, each retry decision with its reason, hedges, retry-budget refusals, breaker
  rejections and transitions, and outlier ejections.

When tracing is off none of this is installed and the engine pays one boolean test per call.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, Protocol, TypeVar

from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from pkg.clients.outlier import OutlierEvent
from pkg.clients.telemetry import Instrumentation, RetryEvent
from pkg.common import tracing

T = TypeVar("T")


class _Counters(Protocol):
    attempts: int


class MethodState(Protocol):
    """What a call span reads of ``pkg.clients.runtime.MethodState``."""

    @property
    def target(self) -> str: ...

    @property
    def method(self) -> str: ...

    @property
    def counters(self) -> _Counters: ...


_TRACER_NAME = "pkg.clients"


def enabled() -> bool:
    """Whether calls are traced (tracing was set up with an exporter)."""
    return tracing.ENABLED


def _start(ms: MethodState) -> trace.Span:
    method = ms.method
    return tracing.tracer(_TRACER_NAME).start_span(
        f"call {method}",
        kind=SpanKind.CLIENT,
        attributes={"pkg_clients.target": ms.target, "rpc.method": method},
    )


def _end(
    span: trace.Span, ms: MethodState, attempts_before: int, error: BaseException | None
) -> None:
    # The method's attempt counter is shared by concurrent calls: the difference is exact for a
    # call alone and an upper bound otherwise, which is what the attribute says.
    span.set_attribute("pkg_clients.attempts_max", ms.counters.attempts - attempts_before)
    if error is not None:
        code = getattr(error, "code", None)
        name = getattr(code(), "name", "") if callable(code) else ""
        span.set_status(Status(StatusCode.ERROR, f"{type(error).__name__} {name}".strip()))
        if name:
            span.set_attribute("rpc.grpc.status_code_name", name)
    span.end()


async def traced_async(ms: MethodState, run: Callable[[], Awaitable[T]]) -> T:
    """Await ``run()`` (the engine's call) inside a call span."""
    span = _start(ms)
    before = ms.counters.attempts
    with trace.use_span(span, end_on_exit=False, record_exception=False,
                        set_status_on_exception=False):  # fmt: skip
        try:
            result = await run()
        except BaseException as exc:
            _end(span, ms, before, exc)
            raise
    _end(span, ms, before, None)
    return result


def traced_sync(ms: MethodState, run: Callable[[], T]) -> T:
    """``run()`` (the engine's blocking call) inside a call span."""
    span = _start(ms)
    before = ms.counters.attempts
    with trace.use_span(span, end_on_exit=False, record_exception=False,
                        set_status_on_exception=False):  # fmt: skip
        try:
            result = run()
        except BaseException as exc:
            _end(span, ms, before, exc)
            raise
    _end(span, ms, before, None)
    return result


def aio_interceptors() -> list[Any]:
    """The attempt-span interceptors for grpc.aio channels (none when tracing is off)."""
    if not tracing.ENABLED:
        return []
    from opentelemetry.instrumentation.grpc import aio_client_interceptors

    interceptors: list[Any] = aio_client_interceptors(tracer_provider=tracing.provider())
    return interceptors


def sync_interceptors() -> list[Any]:
    """The attempt-span interceptor for blocking grpc channels (none when tracing is off)."""
    if not tracing.ENABLED:
        return []
    from opentelemetry.instrumentation.grpc import client_interceptor

    return [client_interceptor(tracer_provider=tracing.provider())]


def _event(name: str, attributes: dict[str, Any]) -> None:
    span = trace.get_current_span()
    if span.is_recording():
        span.add_event(name, attributes)


class TracingInstrumentation(Instrumentation):
    """Span events on the call in progress: what the engine decided and why."""

    def on_retry_decision(self, event: RetryEvent) -> None:
        _event(
            "retry" if event.retry else "give_up",
            {
                "attempt": event.attempt,
                "code": event.code,
                "reason": event.reason,
                "delay_s": round(event.delay, 4),
                "time_left_s": round(event.time_left, 4),
            },
        )

    def on_budget_exhausted(self, target: str, method: str) -> None:
        _event("retry_budget_exhausted", {"target": target})

    def on_hedge(self, target: str, method: str, attempt: int) -> None:
        _event("hedge", {"attempt": attempt})

    def on_breaker_transition(self, name: str, old: str, new: str, reason: str) -> None:
        _event("breaker_transition", {"breaker": name, "from": old, "to": new, "reason": reason})

    def on_breaker_rejected(self, name: str, retry_after: float) -> None:
        _event("breaker_rejected", {"breaker": name, "retry_after_s": round(retry_after, 3)})

    def on_outlier(self, event: OutlierEvent) -> None:
        if event.ejected:
            _event("replica_ejected", {"replica": event.replica, "reason": event.reason})
