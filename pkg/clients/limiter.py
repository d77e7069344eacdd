"""Adaptive concurrency limit per target: how many calls may be in flight, following latency.

A fixed limit is either too low (wasted capacity) or too high (when the callee slows down, the
caller keeps piling calls into its queues, and every call waits). This limit follows the
callee's latency the way TCP Vegas follows a link's, as in Netflix's concurrency-limits
(``VegasLimit``) and failsafe-go's adaptive limiter:

* the no-load latency ``rtt_noload`` is the least latency seen (measured again every
  ``probe_interval`` samples, so a callee that became slower for good is re-learnt);
* each successful call of latency ``rtt`` estimates how many calls wait in the callee's
  queues: ``queue = limit * (1 - rtt_noload / rtt)``;
* below ``alpha * log10(limit)`` queued the limit grows by ``log10(limit)`` (at least 1);
  above ``beta * log10(limit)`` it shrinks by as much; in between it holds. A call the callee shed
  (RESOURCE_EXHAUSTED) or that timed out shrinks it multiplicatively (x0.9);
* it only grows while the caller uses at least half of it (a quiet caller learns nothing).

A call that finds the limit reached waits up to ``max_wait`` for a slot (first come, first
served) and is otherwise rejected at once with ``LimitExceededError`` (RESOURCE_EXHAUSTED,
never sent, never retried): failing fast in the caller costs the callee nothing.
"""

from __future__ import annotations

import asyncio
import math
import threading
import time
from collections import deque
from typing import Any

import grpc
import grpc.aio

from pkg.clients.policy import LimiterPolicy

_OVERLOAD_CODES = frozenset({grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.DEADLINE_EXCEEDED})
_OVERLOAD_HTTP = frozenset({429, 503})


class LimitExceededError(grpc.aio.AioRpcError):
    """The target's concurrency limit was reached: the call was not sent (never retried).

    A ``grpc.aio.AioRpcError`` with status RESOURCE_EXHAUSTED, so handlers of gRPC errors treat
    it like a callee's own refusal. ``limit`` is the limit at the time.
    """

    def __init__(self, target: str, limit: int) -> None:
        self.target = target
        self.limit = limit
        message = f"client concurrency limit for {target} reached ({limit} in flight): not sent"
        grpc.aio.AioRpcError.__init__(
            self,
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            grpc.aio.Metadata(),
            grpc.aio.Metadata(),
            details=message,
            debug_error_string=f"pkg.clients: {message}",
        )

    def __str__(self) -> str:
        return self.details() or "client concurrency limit reached"

    def __reduce__(self) -> Any:
        return (type(self), (self.target, self.limit))


def is_overload(exc: BaseException) -> bool:
    """Whether a failed call says the callee is overloaded: it shed the call
    (RESOURCE_EXHAUSTED, HTTP 429/503) or the call timed out. Our own refusals do not count."""
    if isinstance(exc, LimitExceededError):
        return False
    code = getattr(exc, "code", None)
    if isinstance(exc, grpc.RpcError) and callable(code):
        try:
            return code() in _OVERLOAD_CODES
        except Exception:
            return False
    response = getattr(exc, "response", None)
    return getattr(response, "status_code", None) in _OVERLOAD_HTTP


class AdaptiveLimiter:
    """The concurrency limit of one target (see the module docstring)."""

    def __init__(self, target: str, policy: LimiterPolicy) -> None:
        self.target = target
        self.policy = policy
        self.limit = float(policy.initial_limit)
        self.in_flight = 0
        self.rtt_noload = 0.0  # 0: not measured yet
        self.rejected = 0
        self._samples = 0
        self._lock = threading.Lock()
        self._waiters: deque[asyncio.Future[None]] = deque()

    # -- admission -------------------------------------------------------------------------
    def try_acquire(self) -> bool:
        """Take a slot if one is free now."""
        with self._lock:
            if self.in_flight < self.limit and not self._waiters:
                self.in_flight += 1
                return True
            return False

    async def acquire(self) -> None:
        """Take a slot, waiting up to ``max_wait``; else ``LimitExceededError``."""
        if self.try_acquire():
            return
        wait = self.policy.max_wait
        if wait <= 0:
            self._reject()
        loop = asyncio.get_running_loop()
        slot: asyncio.Future[None] = loop.create_future()
        with self._lock:
            self._waiters.append(slot)
        try:
            await asyncio.wait_for(asyncio.shield(slot), wait)
        except TimeoutError:
            with self._lock:
                if slot.done() and not slot.cancelled():
                    return  # handed over just as the wait ended: keep it
                self._forget(slot)
            self._reject()
        except asyncio.CancelledError:
            with self._lock:
                owned = slot.done() and not slot.cancelled()
                if not owned:
                    self._forget(slot)
            if owned:
                self.release(None, False)
            raise

    def acquire_sync(self) -> None:
        """Blocking twin of ``acquire`` (polls while waiting)."""
        if self.try_acquire():
            return
        end = time.monotonic() + self.policy.max_wait
        while time.monotonic() < end:
            time.sleep(0.001)
            if self.try_acquire():
                return
        self._reject()

    def _reject(self) -> None:
        self.rejected += 1
        raise LimitExceededError(self.target, int(self.limit))

    def _forget(self, slot: asyncio.Future[None]) -> None:
        try:
            self._waiters.remove(slot)
        except ValueError:
            pass
        slot.cancel()

    # -- outcome -----------------------------------------------------------------------------
    def release(self, rtt: float | None, dropped: bool) -> None:
        """Give back a slot: ``rtt`` of a call that succeeded, or ``dropped`` for an overload
        signal (shed or timed out); neither for other failures (nothing learnt)."""
        with self._lock:
            if dropped:
                self._drop()
            elif rtt is not None and rtt > 0:
                self._sample(rtt)
            handed = None
            while self._waiters and self.in_flight <= self.limit:
                slot = self._waiters.popleft()
                if not slot.done():
                    handed = slot  # the slot changes hands: in_flight stays
                    break
            if handed is None:
                self.in_flight -= 1
        if handed is not None:
            loop = handed.get_loop()
            try:
                same_loop = asyncio.get_running_loop() is loop
            except RuntimeError:
                same_loop = False
            if same_loop:
                handed.set_result(None)
            else:
                loop.call_soon_threadsafe(self._hand_over, handed)

    def _drop(self) -> None:
        policy = self.policy
        self.limit = max(float(policy.min_limit), self.limit * 0.9)

    def _sample(self, rtt: float) -> None:
        policy = self.policy
        self._samples += 1
        if self._samples >= policy.probe_interval:
            # Forget the old minimum now and then: a callee that is slower for good (a new
            # release, a bigger dataset) must not look permanently congested.
            self._samples = 0
            self.rtt_noload = rtt
        if self.rtt_noload <= 0 or rtt < self.rtt_noload:
            self.rtt_noload = rtt
        limit = self.limit
        if self.in_flight * 2 < limit:
            return  # the caller does not use the limit: its latency says nothing about it
        queue = limit * (1.0 - self.rtt_noload / rtt)
        step = max(1.0, math.log10(limit))
        if queue < policy.alpha * step:
            limit += step
        elif queue > policy.beta * step:
            limit -= step
        else:
            return
        self.limit = min(float(policy.max_limit), max(float(policy.min_limit), limit))

    def _hand_over(self, slot: asyncio.Future[None]) -> None:
        # In the waiter's loop: it may have stopped waiting meanwhile; then pass the slot on.
        if slot.done():
            self.release(None, False)
        else:
            slot.set_result(None)
