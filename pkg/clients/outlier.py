"""Outlier detection: which replica of a multi-address target gets the next attempt.

Envoy-style passive health checking, driven by the outcomes of real calls (no extra probes):

* Round robin over the replicas that are in rotation.
* A replica is *suspect* after one failure: it keeps at most one attempt in flight, so a hung
  replica (SIGSTOP, deadlock) stops receiving new calls as soon as its first attempt times out,
  while the attempts already sent to it are still failing.
* ``consecutive_local_failures`` per-attempt timeouts or connection failures in a row, or
  ``consecutive_errors`` server errors (UNAVAILABLE/INTERNAL/UNKNOWN from the server) in a row,
  eject the replica for ``base_ejection_time * 2**(ejections - 1)`` seconds (capped at
  ``max_ejection_time``), unless that would put more than ``max_ejection_percent`` of the
  replicas out of rotation.
* When its ejection time is over, the replica gets exactly one probe attempt (half-open):
  success puts it back into rotation, failure ejects it again for longer.
* A retry avoids the replica its previous attempt failed on whenever another one is eligible.

Pure logic on an injected clock: no grpc import, so the state machine is unit-tested with a
``FakeClock``. One detector per target and runtime, shared by the asyncio channels to it; its
updates never await, so calls on one event loop cannot interleave them (across threads a race
could only blur a count).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from pkg.clients.policy import OutlierPolicy
from pkg.common.clock import Clock

# What an attempt's outcome means for the replica it went to.
OUTCOME_SUCCESS = 0  # answered (a domain error counts: the replica is alive)
OUTCOME_LOCAL = 1  # per-attempt timeout or connection failure: the replica did not answer
OUTCOME_ERROR = 2  # the replica answered with a server error (UNAVAILABLE, INTERNAL, ...)
OUTCOME_NEUTRAL = 3  # says nothing about the replica (cancelled, overall deadline spent)

HEALTHY = "healthy"
EJECTED = "ejected"
PROBING = "probing"

REASONS = {
    OUTCOME_LOCAL: "consecutive per-attempt timeouts or connection failures",
    OUTCOME_ERROR: "consecutive failures (server errors, timeouts or connection failures)",
}


@dataclass(frozen=True, slots=True)
class OutlierEvent:
    """An ejection (``ejected``) or a return into rotation (not ``ejected``)."""

    target: str
    replica: str
    ejected: bool
    reason: str
    duration: float  # ejection time (0 for a return)
    ejections: int  # how many times in a row this replica has been ejected


class Replica:
    """The health state of one replica address."""

    __slots__ = (
        "address",
        "ejections",
        "errors",
        "healthy_since",
        "in_flight",
        "local",
        "state",
        "until",
    )

    def __init__(self, address: str) -> None:
        self.address = address
        self.state = HEALTHY
        self.local = 0  # consecutive timeouts / connection failures
        self.errors = 0  # consecutive failures of any kind (server errors included)
        self.in_flight = 0
        self.ejections = 0  # consecutive ejections: the multiplier of the ejection time
        self.until = 0.0  # end of the current ejection
        self.healthy_since = 0.0


class OutlierDetector:
    """Replica choice and ejection state of one multi-address target."""

    def __init__(
        self,
        target: str,
        addresses: Sequence[str],
        policy: OutlierPolicy,
        clock: Clock,
        on_event: Callable[[OutlierEvent], None] | None = None,
    ) -> None:
        if not addresses:
            raise ValueError("an outlier detector needs at least one replica address")
        self.target = target
        self.policy = policy
        self.clock = clock
        self.replicas = [Replica(a) for a in addresses]
        self.max_ejected = len(addresses) * policy.max_ejection_percent // 100
        self._on_event = on_event
        self._next = 0

    @property
    def ejected(self) -> int:
        """How many replicas are out of rotation now (ejected, not yet probing)."""
        return sum(1 for r in self.replicas if r.state == EJECTED)

    def pick(self, avoid: int = -1) -> int:
        """The index of the replica for the next attempt; marks it in flight.

        ``avoid``: the replica the previous attempt of this call failed on. The caller must
        report the outcome with ``success``/``failure``/``release`` exactly once.
        """
        replicas = self.replicas
        n = len(replicas)
        start = self._next
        now = -1.0
        for step in range(n):
            i = (start + step) % n
            r = replicas[i]
            if i == avoid:
                continue
            state = r.state
            if state is EJECTED:
                if now < 0:
                    now = self.clock.monotonic()
                if now < r.until:
                    continue
                r.state = state = PROBING  # ejection over: one probe attempt goes through
            if r.in_flight and (state is PROBING or r.errors):
                continue  # a probe, or a suspect replica: one attempt at a time
            self._next = i + 1
            r.in_flight += 1
            return i
        return self._fallback(avoid)

    def _fallback(self, avoid: int) -> int:
        # No replica is fully eligible: rather than fail the call, use the least bad one.
        # Order: any replica in rotation other than ``avoid``, then ``avoid`` itself, then the
        # ejected replica whose ejection ends first.
        replicas = self.replicas
        in_rotation = [i for i, r in enumerate(replicas) if r.state is not EJECTED]
        others = [i for i in in_rotation if i != avoid]
        if others:
            i = min(others, key=lambda j: (replicas[j].errors, replicas[j].in_flight))
        elif in_rotation:
            i = in_rotation[0]
        else:
            i = min(range(len(replicas)), key=lambda j: replicas[j].until)
        replicas[i].in_flight += 1
        return i

    def success(self, i: int) -> None:
        """The attempt on replica ``i`` got an answer."""
        r = self.replicas[i]
        r.in_flight -= 1
        r.local = 0
        r.errors = 0
        if r.state is not HEALTHY:
            now = self.clock.monotonic()
            r.state = HEALTHY
            r.healthy_since = now
            self._emit(r, False, "probe succeeded", 0.0)
        elif r.ejections:
            # Forget past ejections once the replica has stayed healthy for the longest
            # ejection time, so one bad minute does not haunt it for the rest of the day.
            now = self.clock.monotonic()
            if now - r.healthy_since >= self.policy.max_ejection_time:
                r.ejections = 0

    def release(self, i: int) -> None:
        """The attempt on replica ``i`` ended without saying anything about the replica."""
        r = self.replicas[i]
        r.in_flight -= 1

    def stream_failed(self, i: int, outcome: int) -> None:
        """A stream started on replica ``i`` (its pick already released: streams live long)
        ended with ``outcome``: counted like a failed attempt."""
        self.replicas[i].in_flight += 1
        self.failure(i, outcome)

    def failure(self, i: int, outcome: int) -> None:
        """The attempt on replica ``i`` failed with ``outcome`` (OUTCOME_LOCAL or _ERROR)."""
        r = self.replicas[i]
        r.in_flight -= 1
        if outcome == OUTCOME_LOCAL:
            r.local += 1
        r.errors += 1
        if r.state is EJECTED:
            return  # an attempt sent before the ejection: nothing new
        policy = self.policy
        if r.state is PROBING:
            self._eject(r, "probe failed: " + REASONS.get(outcome, "failure"))
        elif r.local >= policy.consecutive_local_failures:
            self._eject(r, REASONS[OUTCOME_LOCAL])
        elif r.errors >= policy.consecutive_errors:
            self._eject(r, REASONS[OUTCOME_ERROR])

    def _eject(self, r: Replica, reason: str) -> None:
        if self.ejected >= self.max_ejected:
            # Ejecting would leave too few replicas in rotation: it stays in (suspect, one
            # attempt at a time), and a failed probe returns it to plain rotation.
            r.state = HEALTHY
            return
        now = self.clock.monotonic()
        policy = self.policy
        r.ejections += 1
        duration = min(policy.max_ejection_time, policy.base_ejection_time * 2 ** (r.ejections - 1))
        r.state = EJECTED
        r.until = now + duration
        self._emit(r, True, reason, duration)

    def _emit(self, r: Replica, ejected: bool, reason: str, duration: float) -> None:
        if self._on_event is not None:
            self._on_event(
                OutlierEvent(self.target, r.address, ejected, reason, duration, r.ejections)
            )
