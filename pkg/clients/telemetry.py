"""Instrumentation hooks: what happened and why, for metrics, logs or your own sink.

``Instrumentation`` is the hook interface (subclass it and override what you need). The default
set is ``OtelInstrumentation`` (OpenTelemetry metrics) plus ``StructlogInstrumentation``
(one structlog event per retry decision, with its reason). Hooks fire on the failure paths only
(retry decisions, budget refusals, breaker transitions and rejections); the success path stays
lean and is measured through plain counters that observable instruments read at export time.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from opentelemetry import metrics
from opentelemetry.metrics import CallbackOptions, Observation

from pkg.clients.breaker import STATE_CODES, CircuitBreaker
from pkg.clients.log import get_logger
from pkg.clients.outlier import OutlierDetector, OutlierEvent
from pkg.common.metrics import Buckets, HistogramSample, process_metrics


class BreakerHolder(Protocol):
    """What the breaker-state gauge reads of a ``pkg.clients.runtime.Runtime``."""

    @property
    def breakers(self) -> Mapping[str, CircuitBreaker]: ...


_log = get_logger("pkg.clients")

# Upper bounds (seconds) of the call latency histogram buckets (plus +Inf).
LATENCY_BOUNDS: tuple[float, ...] = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)


class CallCounters:
    """Counters of one (target, method) in this process, shared by every channel to it.

    Plain integers bumped on the call path and read by observable instruments at export
    time: cheaper than any per-call SDK instrument, and monotonic even when channels come
    and go.
    """

    __slots__ = ("attempts", "attrs", "calls", "latency_counts", "latency_sum")

    def __init__(self, target: str, method: str) -> None:
        self.attrs = {"target": target, "method": method}
        self.attempts = 0
        self.calls = 0
        self.latency_counts = [0] * (len(LATENCY_BOUNDS) + 1)
        self.latency_sum = 0.0


_counters: dict[tuple[str, str], CallCounters] = {}
_counters_lock = threading.Lock()


def counters_for(target: str, method: str) -> CallCounters:
    """The process-wide counters of ``method`` on ``target``."""
    key = (target, method)
    found = _counters.get(key)
    if found is None:
        with _counters_lock:
            found = _counters.setdefault(key, CallCounters(target, method))
    return found


@dataclass(frozen=True, slots=True)
class RetryEvent:
    """One retry decision: ``retry`` says whether another attempt follows, ``reason`` why."""

    target: str
    method: str
    attempt: int
    retry: bool
    reason: str
    code: str
    delay: float
    time_left: float
    retryable: bool = True  # False: the failure itself was not retryable (domain error, ...)


class Instrumentation:
    """Base class of instrumentation hooks; every method is a no-op by default."""

    def on_retry_decision(self, event: RetryEvent) -> None:
        """A failed attempt was classified: retried (``event.retry``) or given up."""

    def on_budget_exhausted(self, target: str, method: str) -> None:
        """The retry budget refused a retry or hedge."""

    def on_hedge(self, target: str, method: str, attempt: int) -> None:
        """A hedged attempt was sent."""

    def on_breaker_transition(self, name: str, old: str, new: str, reason: str) -> None:
        """A breaker changed state."""

    def on_breaker_rejected(self, name: str, retry_after: float) -> None:
        """A call was rejected without being sent because the breaker is open."""

    def on_outlier(self, event: OutlierEvent) -> None:
        """A replica was ejected from the rotation (``event.ejected``) or came back."""


class StructlogInstrumentation(Instrumentation):
    """Structured log events: ``retry``, ``give_up``, ``retry_budget_exhausted``, breaker moves."""

    def on_retry_decision(self, event: RetryEvent) -> None:
        # Retries and give-ups on retryable failures (deadline, budget, attempts) are news;
        # a domain error that was never retryable is logged at debug, or NOT_FOUNDs would flood.
        log = _log.info if event.retry or event.retryable else _log.debug
        log(
            "retry" if event.retry else "give_up",
            target=event.target,
            method=event.method,
            attempt=event.attempt,
            code=event.code,
            reason=event.reason,
            delay_s=round(event.delay, 4),
            time_left_s=round(event.time_left, 4),
        )

    def on_budget_exhausted(self, target: str, method: str) -> None:
        _log.warning("retry_budget_exhausted", target=target, method=method)

    def on_breaker_transition(self, name: str, old: str, new: str, reason: str) -> None:
        _log.warning("breaker_transition", breaker=name, old=old, new=new, reason=reason)

    def on_outlier(self, event: OutlierEvent) -> None:
        if event.ejected:
            _log.warning(
                "replica_ejected",
                target=event.target,
                replica=event.replica,
                reason=event.reason,
                ejection_s=round(event.duration, 3),
                ejections=event.ejections,
            )
        else:
            _log.info(
                "replica_returned", target=event.target, replica=event.replica, reason=event.reason
            )


class _Instruments:
    """Process-wide OpenTelemetry instruments (created once; the API proxies a late provider)."""

    def __init__(self) -> None:
        meter = metrics.get_meter("pkg.clients")
        self.runtimes: weakref.WeakSet[BreakerHolder] = weakref.WeakSet()
        self.detectors: weakref.WeakSet[OutlierDetector] = weakref.WeakSet()
        self.ejections = meter.create_counter(
            "client_outlier_ejections", description="Replicas ejected by outlier detection"
        )
        meter.create_observable_gauge(
            "client_outlier_ejected",
            callbacks=[self._ejected],
            description="Replicas of a target currently ejected by outlier detection",
        )
        self.retries = meter.create_counter(
            "client_retries", description="Retry decisions by outcome and reason"
        )
        self.budget_exhausted = meter.create_counter(
            "client_retry_budget_exhausted", description="Retries or hedges refused by the budget"
        )
        self.transitions = meter.create_counter(
            "client_breaker_transitions", description="Circuit breaker state transitions"
        )
        self.rejected = meter.create_counter(
            "client_breaker_rejected", description="Calls failed fast by an open breaker"
        )
        self.hedges = meter.create_counter("client_hedges", description="Hedged attempts sent")
        # A real Prometheus histogram, read from the call counters at scrape time (OpenTelemetry
        # has no histogram that can be observed from counts kept elsewhere).
        process_metrics().histogram(
            "client_call_duration_seconds",
            "Call latency including retries",
            self._latency,
            ("target", "method"),
        )
        meter.create_observable_counter(
            "client_attempts", callbacks=[self._attempts], description="Attempts sent"
        )
        meter.create_observable_counter(
            "client_calls", callbacks=[self._calls], description="Calls made (first attempts)"
        )
        meter.create_observable_gauge(
            "client_breaker_state",
            callbacks=[self._breaker_state],
            description="Breaker state: 0 closed, 1 half-open, 2 open",
        )

    def _methods(self) -> Iterable[CallCounters]:
        return list(_counters.values())

    def _attempts(self, options: CallbackOptions) -> Iterable[Observation]:
        for m in self._methods():
            yield Observation(m.attempts, m.attrs)

    def _calls(self, options: CallbackOptions) -> Iterable[Observation]:
        for m in self._methods():
            yield Observation(m.calls, m.attrs)

    def _latency(self, _source: object) -> Iterable[HistogramSample]:
        for m in self._methods():
            buckets = Buckets(LATENCY_BOUNDS)
            buckets.counts = list(m.latency_counts)
            buckets.sum = m.latency_sum
            yield m.attrs, buckets

    def _ejected(self, options: CallbackOptions) -> Iterable[Observation]:
        # Several channels may balance over the same target: report the sum per target.
        per_target: dict[str, int] = {}
        for detector in list(self.detectors):
            per_target[detector.target] = per_target.get(detector.target, 0) + detector.ejected
        for target, count in per_target.items():
            yield Observation(count, {"target": target})

    def _breaker_state(self, options: CallbackOptions) -> Iterable[Observation]:
        # Several runtimes may hold a breaker of the same name: report the worst state.
        worst: dict[str, int] = {}
        for runtime in list(self.runtimes):
            for breaker in list(runtime.breakers.values()):
                code = STATE_CODES[breaker.state]
                worst[breaker.name] = max(code, worst.get(breaker.name, 0))
        for name, code in worst.items():
            yield Observation(code, {"breaker": name})


_instruments: _Instruments | None = None
_instruments_lock = threading.Lock()


def instruments() -> _Instruments:
    """The shared instruments (created on first use)."""
    global _instruments
    if _instruments is None:
        with _instruments_lock:
            if _instruments is None:
                _instruments = _Instruments()
    return _instruments


class OtelInstrumentation(Instrumentation):
    """OpenTelemetry counters for the failure-path events."""

    def __init__(self) -> None:
        self._i = instruments()

    def on_retry_decision(self, event: RetryEvent) -> None:
        self._i.retries.add(
            1,
            {
                "target": event.target,
                "method": event.method,
                "outcome": "retry" if event.retry else "give_up",
                # The status code, not the free-text reason: formatted numbers in the reason
                # would make a new time series per value (structlog keeps the full reason).
                "reason": event.code,
            },
        )

    def on_budget_exhausted(self, target: str, method: str) -> None:
        self._i.budget_exhausted.add(1, {"target": target, "method": method})

    def on_hedge(self, target: str, method: str, attempt: int) -> None:
        self._i.hedges.add(1, {"target": target, "method": method})

    def on_breaker_transition(self, name: str, old: str, new: str, reason: str) -> None:
        self._i.transitions.add(1, {"breaker": name, "from": old, "to": new})

    def on_breaker_rejected(self, name: str, retry_after: float) -> None:
        self._i.rejected.add(1, {"breaker": name})

    def on_outlier(self, event: OutlierEvent) -> None:
        if event.ejected:
            self._i.ejections.add(
                1, {"target": event.target, "replica": event.replica, "reason": event.reason}
            )


def default_instrumentation() -> Sequence[Instrumentation]:
    """OpenTelemetry metrics plus structlog events."""
    return (OtelInstrumentation(), StructlogInstrumentation())
