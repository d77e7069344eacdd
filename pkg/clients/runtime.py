"""Mutable per-target state shared by the calls of every channel: budgets, breakers, outliers.

A ``Runtime`` holds the injected clock, random source and instrumentation, and the breakers,
budgets and outlier detectors per target. Every client uses the process-wide
``default_runtime()`` unless one is passed in, so code that builds a channel per request still
gets one breaker and one retry budget per target, not a fresh (full) one each time. Pass an
explicit ``Runtime`` to keep a client's protection apart (or to inject a clock in tests).
Everything a call needs is precomputed once per method in a ``MethodState``, so the success
path does no lookups, allocations of loggers or string formatting.
"""

from __future__ import annotations

import random
import threading
import time
from bisect import bisect_left
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING

import pybreaker

from pkg.clients.breaker import BREAKER_SUCCESS, CircuitBreaker
from pkg.clients.budget import RetryBudget
from pkg.clients.limiter import AdaptiveLimiter
from pkg.clients.outlier import OutlierDetector, OutlierEvent
from pkg.clients.policy import OutlierPolicy, Policy
from pkg.clients.telemetry import (
    LATENCY_BOUNDS,
    Instrumentation,
    RetryEvent,
    counters_for,
    default_instrumentation,
    instruments,
)
from pkg.clients.tracing import TracingInstrumentation
from pkg.common.clock import SYSTEM_CLOCK, Clock, SystemClock

if TYPE_CHECKING:
    from pkg.clients.shared_breaker import SharedBreakerStore
    from pkg.clients.shared_budget import SharedBudgetStore


class MethodState:
    """Everything a call to one method of one target needs, resolved once."""

    __slots__ = (
        "attempt_timeout",
        "breaker",
        "budget",
        "clock",
        "counters",
        "hedge",
        "idempotent",
        "latency_ema",
        "limiter",
        "method",
        "now",
        "policy",
        "record_latency",
        "runtime",
        "target",
        "timeout",
    )

    def __init__(
        self,
        runtime: Runtime,
        policy: Policy,
        target: str,
        method: str,
        budget_target: str | None = None,
    ) -> None:
        self.runtime = runtime
        self.policy = policy
        self.target = target
        self.method = method
        self.clock = runtime.clock
        # The system clock's monotonic() is time.monotonic: call the C function directly.
        self.now: Callable[[], float] = (
            time.monotonic if type(runtime.clock) is SystemClock else runtime.clock.monotonic
        )
        self.timeout = policy.timeout
        self.attempt_timeout = policy.retry.attempt_timeout_for(method)
        self.idempotent = policy.retry.is_idempotent(method)
        self.hedge = self.idempotent and policy.hedge.applies_to(method)
        # A replica's own state (breaker) may share the retry budget and concurrency limit of
        # its whole service.
        self.budget = runtime.budget(budget_target or target, policy)
        self.breaker = runtime.breaker(target, method, policy) if policy.breaker.enabled else None
        self.limiter = (
            runtime.limiter(budget_target or target, policy) if policy.limiter.enabled else None
        )
        self.latency_ema = 0.0
        self.record_latency = policy.record_latency
        # Attempts, calls and the latency histogram are aggregated in plain counters that
        # observable instruments export: the OTel SDK's Histogram.record costs 7-10 us per call
        # on a 2-vCPU box, more than the whole success path is allowed to cost.
        self.counters = counters_for(target, method)

    def succeeded(self, ticket: int, start: float, end: float) -> None:
        """Success bookkeeping of an attempt, shared by every call style: breaker, budget,
        latency. ``ticket`` is the breaker's admission ticket of the attempt."""
        breaker = self.breaker
        elapsed = end - start
        if breaker is not None:
            breaker.record(ticket, BREAKER_SUCCESS, end, elapsed)
        budget = self.budget  # RetryBudget.on_success, inlined (hot path)
        if budget.shared is None:
            tokens = budget.tokens + budget.ratio
            budget.tokens = tokens if tokens < budget.max_tokens else budget.max_tokens
        else:
            budget.on_success()
        # An EMA of success latency tells the deadline check how long an attempt takes.
        self.latency_ema += (elapsed - self.latency_ema) * 0.1
        if self.record_latency:
            counters = self.counters
            counters.latency_counts[bisect_left(LATENCY_BOUNDS, elapsed)] += 1
            counters.latency_sum += elapsed

    def observe(self, elapsed: float) -> None:
        """Record the latency of a call that ended in failure."""
        if self.record_latency:
            counters = self.counters
            counters.latency_counts[bisect_left(LATENCY_BOUNDS, elapsed)] += 1
            counters.latency_sum += elapsed


class Runtime:
    """Clock, random source, hooks and per-target budgets/breakers for one or more channels."""

    def __init__(
        self,
        *,
        clock: Clock = SYSTEM_CLOCK,
        rng: random.Random | None = None,
        instrumentation: Sequence[Instrumentation] | None = None,
        breaker_listeners: Sequence[pybreaker.CircuitBreakerListener] = (),
        shared_breakers: SharedBreakerStore | None = None,
        shared_budgets: SharedBudgetStore | None = None,
    ) -> None:
        self.clock = clock
        self.rng = rng or random.Random()
        self.hooks: tuple[Instrumentation, ...] = tuple(
            (*default_instrumentation(), TracingInstrumentation())
            if instrumentation is None
            else instrumentation
        )
        self.breaker_listeners = tuple(breaker_listeners)
        self.shared_breakers = shared_breakers
        self.shared_budgets = shared_budgets
        self.budgets: dict[str, RetryBudget] = {}
        self.breakers: dict[str, CircuitBreaker] = {}
        self.detectors: dict[tuple[str, tuple[str, ...]], OutlierDetector] = {}
        self.limiters: dict[str, AdaptiveLimiter] = {}
        self.methods: dict[tuple[str, str, int, str | None], MethodState] = {}
        self._lock = threading.Lock()
        instruments().runtimes.add(self)

    def method(
        self, policy: Policy, target: str, method: str, budget_target: str | None = None
    ) -> MethodState:
        """The cached state of ``method`` on ``target`` under ``policy`` (created on first use).

        Channels that share this runtime share the budget and breaker of a target, but each
        keeps its own policy (deadline, retries, hedging) for its calls. ``budget_target``:
        the target whose retry budget the calls spend (one replica's calls spend their
        service's budget).
        """
        # Keyed by the policy's identity, not its value (hashing it per HTTP request would
        # cost more than the call's bookkeeping); the cached state holds the policy, so the
        # id cannot be reused by another policy while the entry exists.
        key = (target, method, id(policy), budget_target)
        state = self.methods.get(key)
        if state is None:
            with self._lock:
                state = self.methods.get(key)
                if state is None:
                    state = MethodState(self, policy, target, method, budget_target)
                    self.methods[key] = state
        return state

    def budget(self, target: str, policy: Policy) -> RetryBudget:
        """The retry budget of ``target``."""
        budget = self.budgets.get(target)
        if budget is None:
            created = RetryBudget(policy.budget)
            budget = self.budgets.setdefault(target, created)
            if budget is created and self.shared_budgets is not None and created.enabled:
                self.shared_budgets.attach(target, created)
        return budget

    def limiter(self, target: str, policy: Policy) -> AdaptiveLimiter:
        """The adaptive concurrency limiter of ``target`` (every method of it shares one)."""
        limiter = self.limiters.get(target)
        if limiter is None:
            limiter = self.limiters.setdefault(target, AdaptiveLimiter(target, policy.limiter))
        return limiter

    def breakers_of(self, target: str) -> list[CircuitBreaker]:
        """The breakers of ``target`` (one, or one per method)."""
        prefix = target + "/"
        found = list(self.breakers.items())
        return [b for name, b in found if name == target or name.startswith(prefix)]

    def breaker(self, target: str, method: str, policy: Policy) -> CircuitBreaker:
        """The breaker of ``target`` (or of ``target`` + ``method`` when per_method)."""
        name = f"{target}{method}" if policy.breaker.per_method else target
        breaker = self.breakers.get(name)
        if breaker is None:
            created = CircuitBreaker(
                name,
                policy.breaker,
                self.clock,
                listeners=self.breaker_listeners,
                on_transition=self._on_transition,
            )
            breaker = self.breakers.setdefault(name, created)
            if breaker is created and self.shared_breakers is not None:
                self.shared_breakers.attach(breaker)
        return breaker

    def detector(
        self,
        target: str,
        addresses: Sequence[str],
        policy: OutlierPolicy,
        dynamic: bool = False,
    ) -> OutlierDetector:
        """The outlier detector of the replicas ``addresses`` of ``target`` (created on first
        use, from the policy of the first channel that asks). ``dynamic``: the replica set
        changes (a ``TargetList``): one detector per target name, whatever its addresses."""
        key = (target, () if dynamic else tuple(addresses))
        detector = self.detectors.get(key)
        if detector is None:
            with self._lock:
                detector = self.detectors.get(key)
                if detector is None:
                    detector = OutlierDetector(
                        target, addresses, policy, self.clock, self.emit_outlier
                    )
                    instruments().detectors.add(detector)
                    self.detectors[key] = detector
        return detector

    def _on_transition(self, breaker: CircuitBreaker, old: str, new: str, reason: str) -> None:
        for hook in self.hooks:
            hook.on_breaker_transition(breaker.name, old, new, reason)

    def emit_retry(self, event: RetryEvent) -> None:
        """Send a retry decision to every hook."""
        for hook in self.hooks:
            hook.on_retry_decision(event)

    def emit_budget_exhausted(self, target: str, method: str) -> None:
        """Tell every hook the budget refused a retry."""
        for hook in self.hooks:
            hook.on_budget_exhausted(target, method)

    def emit_rejected(self, name: str, retry_after: float) -> None:
        """Tell every hook a call failed fast on an open breaker."""
        for hook in self.hooks:
            hook.on_breaker_rejected(name, retry_after)

    def emit_outlier(self, event: OutlierEvent) -> None:
        """Tell every hook a replica was ejected or came back."""
        for hook in self.hooks:
            hook.on_outlier(event)

    def emit_hedge(self, target: str, method: str, attempt: int) -> None:
        """Tell every hook a hedge was sent."""
        for hook in self.hooks:
            hook.on_hedge(target, method, attempt)


_default_runtime: Runtime | None = None
_default_lock = threading.Lock()


def default_runtime() -> Runtime:
    """The runtime of every client built without ``runtime=``: one per process (created on
    first use), so every channel to a target shares its breaker, budget and outlier state."""
    global _default_runtime
    runtime = _default_runtime
    if runtime is None:
        with _default_lock:
            if _default_runtime is None:
                _default_runtime = Runtime()
            runtime = _default_runtime
    return runtime


def set_default_runtime(runtime: Runtime | None) -> Runtime | None:
    """Replace the process-wide runtime (None: a new one is made on next use); returns the
    previous one. Clients built before keep the runtime they were built with."""
    global _default_runtime
    if runtime is not None and not isinstance(runtime, Runtime):
        raise ValueError(f"runtime must be a pkg.clients.Runtime, got {type(runtime).__name__}")
    with _default_lock:
        previous, _default_runtime = _default_runtime, runtime
    return previous


@contextmanager
def fresh_runtime(runtime: Runtime | None = None) -> Iterator[Runtime]:
    """A new process-wide default runtime inside the ``with`` block (breakers, budgets and
    outlier state start empty), the previous one restored after: one test's open breaker or
    spent budget never reaches the next test."""
    fresh = runtime or Runtime()
    previous = set_default_runtime(fresh)
    try:
        yield fresh
    finally:
        set_default_runtime(previous)
