"""Circuit breaker per target: pybreaker's states, storage and listeners, driven our own way.

Why not ``pybreaker.CircuitBreaker.call``: it holds a lock for the whole wrapped call (threads
serialise behind one breaker), counts consecutive failures on wall-clock time, needs Tornado for
``call_async`` and counts excluded exceptions as successes. Here the breaker is split into
``admit()`` before an attempt and ``record()`` after it; the lock is held only for those few
microseconds of bookkeeping, never while a call is in flight, so it is asyncio-native and lets
any number of concurrent calls through.

What is kept from pybreaker: the state names (``pybreaker.STATE_*``), the state is mirrored in
a ``pybreaker.CircuitBreakerStorage`` (``storage``), listeners are
``pybreaker.CircuitBreakerListener`` objects (``state_change``, ``success``, ``failure``), and
the open error is a ``pybreaker.CircuitBreakerError``.

Decision rules: failure ratio (and, optionally, slow-call ratio) over a sliding time window
(``buckets`` buckets over ``window`` seconds) with a minimum number of calls; open for
``open_duration``; then exactly one probe; a probe that is cancelled or ends with an ignored
outcome frees the slot for the next caller, and a probe that never reports frees it after
``probe_timeout``.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import grpc
import grpc.aio
import pybreaker

from pkg.clients.policy import BreakerPolicy
from pkg.common.clock import Clock

STATE_CLOSED: str = pybreaker.STATE_CLOSED
STATE_OPEN: str = pybreaker.STATE_OPEN
STATE_HALF_OPEN: str = pybreaker.STATE_HALF_OPEN
STATE_CODES = {STATE_CLOSED: 0, STATE_HALF_OPEN: 1, STATE_OPEN: 2}
_CANONICAL = {STATE_CLOSED: STATE_CLOSED, STATE_HALF_OPEN: STATE_HALF_OPEN, STATE_OPEN: STATE_OPEN}

# Outcomes of one attempt as the breaker sees them.
BREAKER_SUCCESS = 0
BREAKER_FAILURE = 1
BREAKER_IGNORE = 2  # domain errors, cancellation: neither success nor failure

TICKET_NORMAL = 0
TICKET_PROBE = 1


class BreakerOpenError(pybreaker.CircuitBreakerError, grpc.aio.AioRpcError):
    """Raised instead of calling while the breaker is open (or its single probe is busy).

    It is never retried by ``pkg.clients``. ``retry_after`` is the number of seconds until the
    breaker lets its next probe through. It is also a ``grpc.aio.AioRpcError`` (so a
    ``grpc.RpcError``) with status UNAVAILABLE: callers that handle gRPC errors handle it
    without a special case, and can tell it apart by type when they care.
    """

    def __init__(self, name: str, retry_after: float, state: str) -> None:
        self.name = name
        self.retry_after = max(0.0, retry_after)
        self.state = state
        message = (
            f"circuit breaker {name!r} is {state}: failing fast, next probe in "
            f"{self.retry_after:.3f}s"
        )
        grpc.aio.AioRpcError.__init__(
            self,
            grpc.StatusCode.UNAVAILABLE,
            grpc.aio.Metadata(),
            grpc.aio.Metadata(),
            details=message,
            debug_error_string=f"pkg.clients: {message}",
        )

    def __str__(self) -> str:
        return self.details() or "circuit breaker open"

    def __reduce__(self) -> Any:
        return (type(self), (self.name, self.retry_after, self.state))


class _StateView:
    """What pybreaker listeners receive as ``old_state``/``new_state`` (they read ``.name``)."""

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name


TransitionHook = Callable[["CircuitBreaker", str, str, str], None]


class SharedState(Protocol):
    """The optional cross-process state behind a breaker (see ``shared_breaker.py``)."""

    def note(self, ticket: int, outcome: int, slow: bool = False) -> None:
        """Hand one outcome (and whether it was slow) to the shared window."""

    healthy: bool

    def wants_probe(self) -> bool:
        """Whether this process holds the shared half-open probe right now."""

    def released(self) -> None:
        """A probe ended without an outcome."""


class CircuitBreaker:
    """One breaker: ``admit(now)`` before an attempt, ``record(ticket, outcome, now)`` after."""

    def __init__(
        self,
        name: str,
        policy: BreakerPolicy,
        clock: Clock,
        *,
        listeners: Sequence[pybreaker.CircuitBreakerListener] = (),
        on_transition: TransitionHook | None = None,
        storage: pybreaker.CircuitBreakerStorage | None = None,
    ) -> None:
        self.name = name
        self.policy = policy
        self.clock = clock
        self.storage: pybreaker.CircuitBreakerStorage = storage or pybreaker.CircuitMemoryStorage(
            STATE_CLOSED
        )
        self.listeners = tuple(listeners)
        self.on_transition = on_transition
        self.shared: SharedState | None = None
        self._lock = threading.Lock()
        self._state = STATE_CLOSED
        self._open_until = 0.0
        self._probe_until = 0.0  # > now while a probe is in flight
        self._width = policy.window / policy.buckets
        self._n = policy.buckets
        self._succ = [0] * self._n
        self._fail = [0] * self._n
        self._slow = [0] * self._n
        self._epoch = [-1] * self._n
        self._slow_after = policy.slow_call_duration
        self.rejected = 0
        self.probe_outcomes = 0  # probes that ended here (shared state compares it)

    # -- state ---------------------------------------------------------------------------
    @property
    def state(self) -> str:
        """``closed``, ``open`` or ``half-open`` (pybreaker's names)."""
        return self._state

    @property
    def current_state(self) -> str:
        """pybreaker-compatible alias of ``state`` (listeners read it)."""
        return self._state

    @property
    def effective_state(self) -> str:
        """``state`` as a health page should show it: an open breaker moves to half-open only
        when the next call probes, so once its open period is over (a probe is due) it is
        reported ``half-open``; an idle caller would otherwise show ``open`` forever."""
        if self._state == STATE_OPEN and self.retry_after() <= 0:
            return STATE_HALF_OPEN
        return self._state

    def retry_after(self, now: float | None = None) -> float:
        """Seconds until the next probe may go (0 when closed)."""
        now = self.clock.monotonic() if now is None else now
        if self._state == STATE_OPEN:
            return max(0.0, self._open_until - now)
        if self._state == STATE_HALF_OPEN and self._probe_until > now:
            return max(0.0, self._probe_until - now)
        return 0.0

    def window_counts(self, now: float | None = None) -> tuple[int, int]:
        """(successes, failures) inside the sliding window."""
        now = self.clock.monotonic() if now is None else now
        with self._lock:
            successes, failures, _ = self._totals(int(now / self._width))
            return successes, failures

    # -- call path -----------------------------------------------------------------------
    def admit(self, now: float) -> int:
        """Let an attempt through (returns its ticket) or raise ``BreakerOpenError``."""
        if self._state == STATE_CLOSED:
            return TICKET_NORMAL
        fired: tuple[str, str, str] | None = None
        with self._lock:
            state = self._state
            if state == STATE_OPEN:
                if now < self._open_until:
                    self.rejected += 1
                    raise BreakerOpenError(self.name, self._open_until - now, STATE_OPEN)
                fired = self._set_state(STATE_HALF_OPEN, "open duration elapsed")
                state = STATE_HALF_OPEN
            if state == STATE_HALF_OPEN:
                shared = self.shared
                busy = self._probe_until > now or (shared is not None and not shared.wants_probe())
                if busy:
                    self.rejected += 1
                    wait = self._probe_until - now if self._probe_until > now else 0.0
                    error = BreakerOpenError(self.name, wait, STATE_HALF_OPEN)
                else:
                    self._probe_until = now + self.policy.probe_timeout
                    error = None
            else:  # closed again (another caller's probe succeeded meanwhile)
                error = None
        if fired:
            self._fire(*fired)
        if error is not None:
            raise error
        return TICKET_PROBE if state == STATE_HALF_OPEN else TICKET_NORMAL

    def check(self, now: float) -> None:
        """Fail fast while open, without taking the probe slot (for calls not accounted)."""
        if self._state == STATE_OPEN and now < self._open_until:
            self.rejected += 1
            raise BreakerOpenError(self.name, self._open_until - now, STATE_OPEN)

    def record(self, ticket: int, outcome: int, now: float, elapsed: float = 0.0) -> None:
        """Account one finished attempt admitted with ``ticket`` that took ``elapsed`` s."""
        slow = self._slow_after is not None and elapsed > self._slow_after
        if (
            outcome == BREAKER_SUCCESS
            and not slow
            and ticket == TICKET_NORMAL
            and self._state is STATE_CLOSED
            and self.shared is None
            and not self.listeners
        ):
            # The common case (a success while closed, current bucket) takes no lock: in
            # asyncio nothing can interleave here, and between threads a lost increment only
            # under-counts one success. Rotating a bucket takes the locked path below.
            epoch = int(now / self._width)
            slot = epoch % self._n
            if self._epoch[slot] == epoch:
                self._succ[slot] += 1
                return
        fired: tuple[str, str, str] | None = None
        with self._lock:
            if ticket == TICKET_PROBE:
                self._probe_until = 0.0
                if self.shared is not None:
                    # Handed over before the state changes, then counted: a shared-state sync
                    # that read its counts without this probe sees the count move and does not
                    # undo what the probe decides here (``force(unless_probed_since=...)``).
                    self.shared.note(ticket, outcome, slow)
                self.probe_outcomes += 1
                if self._state == STATE_HALF_OPEN:
                    if outcome == BREAKER_SUCCESS and not slow:
                        self._reset_window()
                        fired = self._set_state(STATE_CLOSED, "probe succeeded")
                    elif outcome == BREAKER_FAILURE or (slow and outcome == BREAKER_SUCCESS):
                        self._open_until = now + self.policy.open_duration
                        why = "probe failed" if outcome == BREAKER_FAILURE else "probe slow"
                        fired = self._set_state(STATE_OPEN, why)
                    # BREAKER_IGNORE: the probe proved nothing; the next caller probes.
            elif (
                outcome != BREAKER_IGNORE
                and self._state == STATE_CLOSED
                # With healthy shared state the shared window (Redis) decides instead.
                and (self.shared is None or not self.shared.healthy)
            ):
                epoch = int(now / self._width)
                slot = epoch % self._n
                if self._epoch[slot] != epoch:
                    self._epoch[slot] = epoch
                    self._succ[slot] = 0
                    self._fail[slot] = 0
                    self._slow[slot] = 0
                if slow:
                    self._slow[slot] += 1
                if outcome == BREAKER_SUCCESS:
                    self._succ[slot] += 1
                else:
                    self._fail[slot] += 1
                if outcome == BREAKER_FAILURE or slow:
                    fired = self._judge(epoch, now)
        if self.shared is not None and ticket != TICKET_PROBE:
            self.shared.note(ticket, outcome, slow)
        if self.listeners:
            for listener in self.listeners:
                if outcome == BREAKER_SUCCESS:
                    listener.success(self)  # type: ignore[arg-type]
                elif outcome == BREAKER_FAILURE:
                    listener.failure(self, RuntimeError("attempt failed"))  # type: ignore[arg-type]
        if fired:
            self._fire(*fired)

    def _judge(self, epoch: int, now: float) -> tuple[str, str, str] | None:
        # Under the lock: open when the window has the volume and too many failures, or too
        # many slow calls.
        policy = self.policy
        successes, failures, slow = self._totals(epoch)
        total = successes + failures
        if total < policy.min_calls:
            return None
        if failures >= policy.failure_ratio * total:
            why = f"{failures}/{total} failures in {policy.window}s"
        elif self._slow_after is not None and slow >= policy.slow_call_ratio * total:
            why = f"{slow}/{total} calls slower than {self._slow_after}s in {policy.window}s"
        else:
            return None
        self._open_until = now + policy.open_duration
        return self._set_state(STATE_OPEN, why)

    def release(self, ticket: int) -> None:
        """Forget an attempt that ended without an outcome (cancelled): frees a probe slot."""
        if ticket == TICKET_PROBE:
            with self._lock:
                self._probe_until = 0.0
            if self.shared is not None:
                self.shared.released()

    # -- transitions ---------------------------------------------------------------------
    def force(
        self,
        state: str,
        open_for: float | None = None,
        reason: str = "forced",
        unless_probed_since: int | None = None,
    ) -> None:
        """Set the state from outside (shared state, operators, tests).

        ``unless_probed_since``: a ``probe_outcomes`` count; when a probe has ended since, the
        state it set stands and nothing is forced.
        """
        if state not in _CANONICAL:
            raise ValueError(f"unknown breaker state {state!r}: one of {sorted(_CANONICAL)}")
        now = self.clock.monotonic()
        with self._lock:
            if unless_probed_since is not None and self.probe_outcomes != unless_probed_since:
                return
            if state == STATE_OPEN:
                self._open_until = now + (
                    self.policy.open_duration if open_for is None else open_for
                )
            if state == STATE_CLOSED and self._state != STATE_CLOSED:
                self._reset_window()
            if state != STATE_HALF_OPEN:
                self._probe_until = 0.0
            fired = self._set_state(state, reason) if state != self._state else None
        if fired:
            self._fire(*fired)

    def _set_state(self, new: str, reason: str) -> tuple[str, str, str] | None:
        old = self._state
        if old == new:
            return None
        # Always store the module constant: the engine's fast path compares by identity.
        self._state = _CANONICAL[new]
        return old, new, reason

    def _fire(self, old: str, new: str, reason: str) -> None:
        # Outside the lock: storage writes and listeners may be slow.
        self.storage.state = new
        if new == STATE_CLOSED:
            self.storage.reset_counter()
        for listener in self.listeners:
            listener.state_change(self, _StateView(old), _StateView(new))  # type: ignore[arg-type]
        if self.on_transition is not None:
            self.on_transition(self, old, new, reason)

    def _reset_window(self) -> None:
        for i in range(self._n):
            self._succ[i] = 0
            self._fail[i] = 0
            self._slow[i] = 0
            self._epoch[i] = -1

    def _totals(self, epoch: int) -> tuple[int, int, int]:
        oldest = epoch - self._n
        successes = failures = slow = 0
        for i in range(self._n):
            if self._epoch[i] > oldest:
                successes += self._succ[i]
                failures += self._fail[i]
                slow += self._slow[i]
        return successes, failures, slow

    def __repr__(self) -> str:
        return f"CircuitBreaker({self.name!r}, state={self._state})"
