"""The call engine: deadline first, breaker, budget, retries on tenacity, hedging.

One overall deadline covers every attempt. The first attempt runs inline (the success path
costs a breaker check, two clock reads and a few counter updates). Only when it fails does the
call enter a tenacity ``Retrying``/``AsyncRetrying`` loop whose first iteration replays that
failure, so tenacity decides every retry through ``_Decider`` (classification, pushback,
backoff, deadline fit, budget) and sleeps on the injected clock. Attempts are plain
``async def`` functions: tenacity awaits them correctly (a grpc.aio multicallable is not a
coroutine function, which is the known trap).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import tenacity

from pkg.clients import backoff, testing, tracing
from pkg.clients.breaker import (
    BREAKER_FAILURE,
    BREAKER_IGNORE,
    STATE_CLOSED,
    STATE_OPEN,
    TICKET_NORMAL,
    BreakerOpenError,
    CircuitBreaker,
)
from pkg.clients.classify import CANCELLED_VERDICT, Verdict
from pkg.clients.deadline import _deadline
from pkg.clients.limiter import LimitExceededError, is_overload
from pkg.clients.runtime import MethodState
from pkg.clients.telemetry import RetryEvent
from pkg.common import tracing as _tracing_on

T = TypeVar("T")

# classify(exc, attempt_capped, time_left) -> Verdict
Classifier = Callable[[BaseException, bool, float], Verdict]


# A timeout handed to a transport is never <= 0 (grpc would reject it): an already spent
# deadline still makes one attempt that fails with DEADLINE_EXCEEDED at once.
_MIN_TIMEOUT = 0.001


def _admit(ms: MethodState, breaker: CircuitBreaker, now: float) -> int:
    """Breaker admission of a call's first attempt; an open breaker fails fast, unretried."""
    try:
        return breaker.admit(now)
    except BreakerOpenError as exc:
        ms.runtime.emit_rejected(exc.name, exc.retry_after)
        raise


def _overall_deadline(ms: MethodState, timeout: float | None, now: float) -> float:
    """The call's absolute deadline: its own timeout (else the policy's), within any outer one."""
    deadline = now + (ms.timeout if timeout is None else timeout)
    outer = _deadline.get()
    if outer is not None and outer < deadline:
        deadline = outer
    return deadline


def _attempt_timeout(ms: MethodState, deadline: float, now: float) -> tuple[float, bool]:
    """min(per-attempt cap, time left) and whether the cap was the limit.

    Whether the cap cut an attempt decides how its timeout is classified: a capped attempt that
    times out may be retried, one that used all the time left may not.
    """
    left = deadline - now
    cap = ms.attempt_timeout
    if cap is not None and cap < left:
        return cap, True
    return (left if left > _MIN_TIMEOUT else _MIN_TIMEOUT), False


class _Decider:
    """Per-call retry state; tenacity's ``retry``/``wait`` callbacks and the attempt runner."""

    __slots__ = (
        "attempt",
        "capped",
        "classify",
        "deadline",
        "delay",
        "ms",
        "start",
        "verdict",
    )

    def __init__(
        self,
        ms: MethodState,
        deadline: float,
        classify: Classifier,
        start: float,
        capped: bool,
    ) -> None:
        self.ms = ms
        self.start = start
        self.deadline = deadline
        self.classify = classify
        self.attempt = 1
        self.capped = capped  # whether the attempt that just failed was cut by the cap
        self.delay = 0.0
        self.verdict: Verdict = CANCELLED_VERDICT

    def attempt_timeout(self, now: float) -> float:
        """The timeout of the next attempt; records whether the cap was the limit."""
        timeout, self.capped = _attempt_timeout(self.ms, self.deadline, now)
        return timeout

    def settle(self, exc: BaseException, ticket: int, started: float) -> Verdict:
        """Classify a failed attempt (started at ``started``) and feed breaker and budget."""
        ms = self.ms
        now = ms.clock.monotonic()
        elapsed = now - started
        verdict = self.classify(exc, self.capped, self.deadline - now)
        self.verdict = verdict
        breaker = ms.breaker
        if breaker is not None and not isinstance(exc, BreakerOpenError):
            if verdict is CANCELLED_VERDICT or verdict.breaker == BREAKER_IGNORE:
                if ticket != TICKET_NORMAL:
                    breaker.record(ticket, BREAKER_IGNORE, now, elapsed)
            else:
                breaker.record(ticket, verdict.breaker, now, elapsed)
        if isinstance(exc, BreakerOpenError):
            ms.runtime.emit_rejected(exc.name, exc.retry_after)
        if verdict.breaker == BREAKER_FAILURE or verdict.overload:
            ms.budget.on_failure()
        return verdict

    def should_retry(self, retry_state: tenacity.RetryCallState) -> bool:
        """tenacity ``retry=``: decide (and explain) whether another attempt follows."""
        outcome = retry_state.outcome
        if outcome is None or not outcome.failed:
            return False
        ms = self.ms
        verdict = self.verdict
        now = ms.clock.monotonic()
        left = self.deadline - now
        retry, reason, delay = False, verdict.reason, 0.0
        if not verdict.retryable:
            pass
        elif self.attempt >= ms.policy.retry.max_attempts:
            reason = f"{verdict.reason}; attempts exhausted ({self.attempt})"
        else:
            if verdict.pushback is not None and ms.policy.retry.honour_pushback:
                delay = 0.0 if testing.is_testing() else verdict.pushback
                why = f"{verdict.reason}; server pushback {verdict.pushback:.3f}s"
            else:
                retry_policy = ms.policy.retry
                delay = backoff.full_jitter(
                    self.attempt,
                    retry_policy.base_backoff,
                    retry_policy.max_backoff,
                    retry_policy.multiplier,
                    ms.runtime.rng,
                )
                why = verdict.reason
            needed = delay + max(ms.policy.retry.min_attempt_time, ms.latency_ema)
            breaker = ms.breaker
            if needed > left:
                reason = f"{why}; deadline: {left:.3f}s left cannot fit {needed:.3f}s"
            elif breaker is not None and breaker.state == STATE_OPEN:
                # The next attempt would only fail fast: report the real error instead.
                reason = f"{why}; circuit breaker opened"
            elif not ms.budget.can_retry() and not _on_ejected_replica(outcome.exception()):
                reason = f"{why}; retry budget exhausted"
                ms.runtime.emit_budget_exhausted(ms.target, ms.method)
            else:
                retry, reason = True, why
        self.delay = delay if retry else 0.0
        ms.runtime.emit_retry(
            RetryEvent(
                ms.target,
                ms.method,
                self.attempt,
                retry,
                reason,
                verdict.code,
                delay,
                left,
                verdict.retryable,
            )
        )
        if retry:
            self.attempt += 1
        return retry

    def wait(self, retry_state: tenacity.RetryCallState) -> float:
        """tenacity ``wait=``: the delay chosen by ``should_retry``."""
        return self.delay


# Set by the per-replica channel on the error of an attempt whose replica is (now) ejected.
EJECTED_REPLICA_ATTR = "pkg_clients_replica_ejected"


def _on_ejected_replica(exc: BaseException | None) -> bool:
    # The attempts that were in flight on a replica when it hung fail together, one attempt
    # timeout later. Their retries go to other replicas and are bounded by ejection itself
    # (once per ejection, which grows in time), so the budget, which guards the service as a
    # whole against retry storms, does not refuse them: otherwise every call in flight on the
    # hung replica beyond half the bucket would fail.
    return exc is not None and getattr(exc, EJECTED_REPLICA_ATTR, False) is True


def _never_stop(retry_state: tenacity.RetryCallState) -> bool:
    # The decision is made entirely in _Decider.should_retry (deadline, attempts, budget).
    return False


def _driven_by(decider: _Decider) -> dict[str, Any]:
    """tenacity settings (but the sleep) that leave every decision to ``decider``."""
    return {
        "retry": decider.should_retry,
        "wait": decider.wait,
        "stop": _never_stop,
        "reraise": True,  # the caller gets the last attempt's own error, not a RetryError
    }


# -- asyncio -----------------------------------------------------------------------------------


def call_async(
    ms: MethodState,
    call_timeout: float | None,
    attempt: Callable[[float], Awaitable[T]],
    classify: Classifier,
) -> Awaitable[T]:
    """Run ``attempt(attempt_timeout)`` under the policy of ``ms``; awaits to its result.

    ``call_timeout`` is the caller's overall deadline (None: the policy's ``timeout``). With
    tracing on, the call runs inside a call span (``pkg.clients.tracing``).
    """
    run = _call_async if ms.limiter is None else _limited_async
    if _tracing_on.ENABLED:  # an attribute read: the untraced success path stays as it was
        return tracing.traced_async(ms, lambda: run(ms, call_timeout, attempt, classify))
    return run(ms, call_timeout, attempt, classify)


async def _limited_async(
    ms: MethodState,
    call_timeout: float | None,
    attempt: Callable[[float], Awaitable[T]],
    classify: Classifier,
) -> T:
    # The whole call (its retries included) holds one slot of the target's concurrency limit;
    # a call refused by the limit still counts as a call.
    limiter = ms.limiter
    assert limiter is not None
    try:
        await limiter.acquire()
    except LimitExceededError:
        ms.counters.calls += 1
        raise
    start = ms.now()
    try:
        result = await _call_async(ms, call_timeout, attempt, classify)
    except BaseException as exc:
        limiter.release(None, is_overload(exc))
        raise
    limiter.release(ms.now() - start, False)
    return result


async def _call_async(
    ms: MethodState,
    call_timeout: float | None,
    attempt: Callable[[float], Awaitable[T]],
    classify: Classifier,
) -> T:
    # The success path is kept short on purpose (no objects beyond a tuple, no tenacity): it
    # runs on every call and its cost is what the benchmark's policy_overhead_us measures.
    now = ms.now
    start = now()
    deadline = _overall_deadline(ms, call_timeout, start)
    counters = ms.counters
    counters.calls += 1
    breaker = ms.breaker
    ticket = TICKET_NORMAL
    if breaker is not None and breaker._state is not STATE_CLOSED:
        ticket = _admit(ms, breaker, start)
    timeout, capped = _attempt_timeout(ms, deadline, start)
    try:
        counters.attempts += 1
        if ms.hedge:
            result = await _hedged(ms, deadline, attempt, timeout)
        else:
            result = await attempt(timeout)
    except BaseException as exc:
        decider = _Decider(ms, deadline, classify, start, capped)
        return await _retry_async(decider, exc, ticket, attempt)
    ms.succeeded(ticket, start, now())
    return result


async def _retry_async(
    decider: _Decider,
    first: BaseException,
    ticket: int,
    attempt: Callable[[float], Awaitable[T]],
) -> T:
    ms = decider.ms
    if not isinstance(first, Exception):  # cancelled: never retried
        _abandoned(ms, ticket)
        raise first
    decider.settle(first, ticket, decider.start)
    replay: list[BaseException] = [first]

    async def run_attempt() -> T:
        if replay:
            raise replay.pop()
        return await _one_async_attempt(decider, attempt)

    retrying = tenacity.AsyncRetrying(**_driven_by(decider), sleep=ms.clock.asleep)
    try:
        result: T = await retrying(run_attempt)
    except BaseException:
        ms.observe(ms.clock.monotonic() - decider.start)
        raise
    return result


def _begin_retry(decider: _Decider) -> tuple[float, int, float]:
    """Admission of a retry: (its start, its breaker ticket, its timeout).

    Raises ``BreakerOpenError`` when the breaker refuses it (the caller settles that like any
    failed attempt, with no ticket to give back).
    """
    ms = decider.ms
    start = ms.clock.monotonic()
    ticket = TICKET_NORMAL if ms.breaker is None else ms.breaker.admit(start)
    timeout = decider.attempt_timeout(start)
    ms.counters.attempts += 1
    return start, ticket, timeout


def _abandoned(ms: MethodState, ticket: int) -> None:
    # Cancelled (or the process is stopping): no outcome, but a probe slot must be freed.
    if ms.breaker is not None:
        ms.breaker.release(ticket)


async def _one_async_attempt(decider: _Decider, attempt: Callable[[float], Awaitable[T]]) -> T:
    ticket = TICKET_NORMAL
    start = decider.ms.clock.monotonic()
    try:
        start, ticket, timeout = _begin_retry(decider)
        result = await attempt(timeout)
    except Exception as exc:
        decider.settle(exc, ticket, start)
        raise
    except BaseException:
        _abandoned(decider.ms, ticket)
        raise
    decider.ms.succeeded(ticket, start, decider.ms.clock.monotonic())
    return result


async def _hedged(
    ms: MethodState,
    deadline: float,
    attempt: Callable[[float], Awaitable[T]],
    first_timeout: float,
) -> T:
    """Send up to ``hedge.max_attempts`` copies ``hedge.delay`` apart; first success wins."""
    hedge = ms.policy.hedge
    delay = 0.0 if testing.is_testing() else hedge.delay
    clock = ms.clock
    tasks: list[asyncio.Task[T]] = [asyncio.ensure_future(attempt(first_timeout))]
    pending: set[asyncio.Task[T]] = set(tasks)
    last_error: BaseException | None = None
    hedging = True
    try:
        while pending:
            can_hedge = hedging and len(tasks) < hedge.max_attempts
            done, pending = await asyncio.wait(
                pending,
                timeout=delay if can_hedge else None,
                return_when=asyncio.FIRST_COMPLETED,
            )
            for task in done:
                error = task.exception()
                if error is None:
                    return task.result()
                last_error = error
            if not done and can_hedge:
                now = clock.monotonic()
                left = deadline - now
                if left <= ms.policy.retry.min_attempt_time:
                    hedging = False  # no time for another copy: wait for what is in flight
                    continue
                if not ms.budget.can_retry():
                    ms.runtime.emit_budget_exhausted(ms.target, ms.method)
                    hedging = False  # no more hedges: wait for what is in flight
                    continue
                ms.budget.on_failure()  # a hedge costs one token, like a retry
                ms.counters.attempts += 1
                timeout, _ = _attempt_timeout(ms, deadline, now)
                task = asyncio.ensure_future(attempt(timeout))
                tasks.append(task)
                pending.add(task)
                ms.runtime.emit_hedge(ms.target, ms.method, len(tasks))
    finally:
        for task in pending:
            task.cancel()  # the losers: cancelling the task cancels its RPC
    assert last_error is not None
    raise last_error


# -- threads -----------------------------------------------------------------------------------


def call_sync(
    ms: MethodState,
    timeout: float | None,
    attempt: Callable[[float], T],
    classify: Classifier,
) -> T:
    """Blocking twin of ``call_async`` (no hedging: that needs concurrent attempts)."""
    run = _call_sync if ms.limiter is None else _limited_sync
    if _tracing_on.ENABLED:  # an attribute read: the untraced success path stays as it was
        return tracing.traced_sync(ms, lambda: run(ms, timeout, attempt, classify))
    return run(ms, timeout, attempt, classify)


def _limited_sync(
    ms: MethodState,
    timeout: float | None,
    attempt: Callable[[float], T],
    classify: Classifier,
) -> T:
    limiter = ms.limiter
    assert limiter is not None
    try:
        limiter.acquire_sync()
    except LimitExceededError:
        ms.counters.calls += 1
        raise
    start = ms.clock.monotonic()
    try:
        result = _call_sync(ms, timeout, attempt, classify)
    except BaseException as exc:
        limiter.release(None, is_overload(exc))
        raise
    limiter.release(ms.clock.monotonic() - start, False)
    return result


def _call_sync(
    ms: MethodState,
    timeout: float | None,
    attempt: Callable[[float], T],
    classify: Classifier,
) -> T:
    clock = ms.clock
    start = clock.monotonic()
    deadline = _overall_deadline(ms, timeout, start)
    ms.counters.calls += 1
    breaker = ms.breaker
    ticket = TICKET_NORMAL
    if breaker is not None and breaker._state is not STATE_CLOSED:
        ticket = _admit(ms, breaker, start)
    first_timeout, capped = _attempt_timeout(ms, deadline, start)
    try:
        ms.counters.attempts += 1
        result = attempt(first_timeout)
    except Exception as exc:
        decider = _Decider(ms, deadline, classify, start, capped)
        return _retry_sync(decider, exc, ticket, attempt)
    except BaseException:
        _abandoned(ms, ticket)
        raise
    ms.succeeded(ticket, start, clock.monotonic())
    return result


def _retry_sync(
    decider: _Decider, first: Exception, ticket: int, attempt: Callable[[float], T]
) -> T:
    ms = decider.ms
    decider.settle(first, ticket, decider.start)
    replay: list[BaseException] = [first]

    def run_attempt() -> T:
        if replay:
            raise replay.pop()
        return _one_sync_attempt(decider, attempt)

    retrying = tenacity.Retrying(**_driven_by(decider), sleep=ms.clock.sleep)
    try:
        result: T = retrying(run_attempt)
    except BaseException:
        ms.observe(ms.clock.monotonic() - decider.start)
        raise
    return result


def _one_sync_attempt(decider: _Decider, attempt: Callable[[float], T]) -> T:
    ticket = TICKET_NORMAL
    start = decider.ms.clock.monotonic()
    try:
        start, ticket, timeout = _begin_retry(decider)
        result = attempt(timeout)
    except Exception as exc:
        decider.settle(exc, ticket, start)
        raise
    except BaseException:
        _abandoned(decider.ms, ticket)
        raise
    decider.ms.succeeded(ticket, start, decider.ms.clock.monotonic())
    return result
