"""Adaptive concurrency limit per target: how many calls may be in flight, following latency.

A fixed limit is either too low (wasted capacity) or too high (when the callee slows down, the
caller keeps piling calls into its queues, and every call waits). This limit follows the
callee's latency the way TCP Vegas follows a link's, as in Netflix's concurrency-limits
(``VegasLimit``) and failsafe-go's adaptive limiter:

* the limit changes once per *window*, one round of the calls in flight (as many completed
  calls as were in flight, at least 10: TCP's round trip), never per call: per-call updates
  chased every scheduling hiccup of the caller's event loop, and ten sheds of one burst cut
  the limit ten times (measured in ``./dev bench clients``);
* the no-load latency ``rtt_noload`` is the least latency seen; every ``probe_interval``
  samples it may rise by 10% towards what the callee answers now (a callee slower for good);
* each window estimates how many calls wait in the callee's queues from its mean latency and
  the calls in flight (Little's law): ``queue = in_flight * (1 - rtt_noload / rtt)``;
* below ``alpha * log10(limit)`` queued the limit grows by ``log10(limit)`` (at least 1), if
  the caller used at least half of it (a quiet caller learns nothing); above
  ``beta * log10(limit)`` it moves back towards what the callee serves without queueing
  (``in_flight * rtt_noload / rtt`` plus ``alpha``'s allowance), by half the distance and at
  most halving in one window, as Gradient2 bounds its gradient; in between it holds;
* a call the callee shed (RESOURCE_EXHAUSTED) or that timed out is a *drop*: the limit falls to
  90% of the calls in flight, at most once per window (the sheds of one burst are one signal).
  Taken from the calls in flight, not the limit, so a limit far above what the caller uses
  does not take many windows to come down.

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
# A window closes after max(MIN_WINDOW, limit) completed calls; a drop cuts the limit to
# DROP_FACTOR of itself, at most once per window.
MIN_WINDOW = 10
DROP_FACTOR = 0.9


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
        self._since_probe = 0
        # The current window (see _count_completion).
        self._window_done = 0
        self._window_samples = 0
        self._window_sum = 0.0
        self._window_min = math.inf
        self._window_peak = 0
        self._window_dropped = False
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
            self.in_flight -= 1
            # Every slot now free goes to the oldest waiters: more than one when the limit
            # has just grown (handing over only the released slot kept the calls in flight at
            # what they were while the limit rose, and the waiters timed out behind it).
            handed = []
            waiters = self._waiters
            while waiters and self.in_flight < self.limit:
                slot = waiters.popleft()
                if not slot.done():
                    self.in_flight += 1
                    handed.append(slot)
        for slot in handed:
            loop = slot.get_loop()
            try:
                same_loop = asyncio.get_running_loop() is loop
            except RuntimeError:
                same_loop = False
            if same_loop:
                slot.set_result(None)
            else:
                loop.call_soon_threadsafe(self._hand_over, slot)

    def _drop(self) -> None:
        # Once per window, as TCP halves its window once per round trip whatever the number of
        # losses in it: the sheds of one burst are one signal, not ten.
        if not self._window_dropped:
            self._window_dropped = True
            # From what the caller really had in flight: a limit far above it means nothing.
            used = max(self.in_flight, self._window_peak)
            self.limit = max(float(self.policy.min_limit), min(self.limit, used) * DROP_FACTOR)
        self._count_completion()

    def _sample(self, rtt: float) -> None:
        self._window_samples += 1
        self._window_sum += rtt
        self._window_min = min(self._window_min, rtt)
        # The peak of calls in flight while this window's calls completed: a caller that does
        # not use its limit learns nothing about it.
        self._window_peak = max(self._window_peak, self.in_flight)
        self._count_completion()

    def _count_completion(self) -> None:
        self._window_done += 1
        # A window is one round of the calls in flight (at most the limit): once that many
        # have completed, so has every call in flight when it opened (TCP's round trip).
        if self._window_done >= max(MIN_WINDOW, self._window_peak):
            self._close_window()

    def _close_window(self) -> None:
        samples = self._window_samples
        if not self._window_dropped and samples >= MIN_WINDOW // 2:
            self._learn(self._window_sum / samples, self._window_min, samples)
        self._window_done = 0
        self._window_samples = 0
        self._window_sum = 0.0
        self._window_min = math.inf
        self._window_peak = 0
        self._window_dropped = False

    def _learn(self, rtt: float, least: float, samples: int) -> None:
        policy = self.policy
        self._since_probe += samples
        if self._since_probe >= policy.probe_interval:
            # Let the old minimum rise now and then: a callee that is slower for good (a new
            # release, a bigger dataset) must not look congested forever. By 10% per probe at
            # most: a window taken under load would otherwise become the new "no load" at
            # once, and the limit would grow into the very queue it is meant to prevent.
            self._since_probe = 0
            self.rtt_noload = min(least, self.rtt_noload * 1.1)
        if self.rtt_noload <= 0 or least < self.rtt_noload:
            self.rtt_noload = least
        limit = self.limit
        used = self._window_peak
        # Vegas: how many calls wait in the callee's queues, from the window's mean latency
        # and the calls the caller had in flight (Little's law).
        queue = min(limit, used) * (1.0 - self.rtt_noload / rtt)
        step = max(1.0, math.log10(limit))
        if queue < policy.alpha * step:
            if used * 2 < limit:
                return  # the caller does not use the limit: no reason to raise it
            limit += step
        elif queue > policy.beta * step:
            # Back towards the concurrency the callee serves without queueing (the window's
            # throughput times the no-load latency, plus the allowed queue): half the distance
            # per window and never below half of what was in flight (Netflix's Gradient2 bounds
            # its gradient the same way), so one slow window is not a collapse.
            limit = min(limit, used)
            target = max(limit / 2, limit * self.rtt_noload / rtt + policy.alpha * step)
            limit -= max(step, (limit - target) / 2)
        else:
            return
        self.limit = min(float(policy.max_limit), max(float(policy.min_limit), limit))

    def _hand_over(self, slot: asyncio.Future[None]) -> None:
        # In the waiter's loop: it may have stopped waiting meanwhile; then pass the slot on.
        if slot.done():
            self.release(None, False)
        else:
            slot.set_result(None)
