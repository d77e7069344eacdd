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
* Re-admission is active as well: a replica out of rotation is health-checked by the channels
  that use it (``pkg.clients.health_check``) and ``readmit`` returns it as soon as it reports
  SERVING, so a replica that crashed and came back is not benched for its ejection time.
* Panic routing (Envoy's panic threshold): when every replica still in rotation is failing
  (it met the ejection criteria but stayed in because of ``max_ejection_percent``), ejected
  replicas are picked again too, so a call tries a replica that may have recovered before it
  fails on the one that is known to be failing.
* The replica set can change (``set_addresses``): a replica that stays keeps its state.

Pure logic on an injected clock: no grpc import, so the state machine is unit-tested with a
``FakeClock``. One detector per target and runtime, shared by the asyncio channels to it; its
updates never await, so calls on one event loop cannot interleave them (across threads a race
could only blur a count).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from typing import Protocol

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


class Watcher(Protocol):
    """Told when a replica leaves the rotation (the channels' health checkers)."""

    def wake(self) -> None: ...


class Replica:
    """The health state of one replica address."""

    __slots__ = (
        "address",
        "ejections",
        "errors",
        "healthy_since",
        "held",
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
        # Met the ejection criteria but kept in rotation by max_ejection_percent: failing.
        self.held = False


# A replica, or its index in ``OutlierDetector.replicas`` at the time of the call.
ReplicaRef = int | Replica


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
        self.target = target
        self.policy = policy
        self.clock = clock
        self.replicas = [Replica(a) for a in addresses]
        self.max_ejected = len(addresses) * policy.max_ejection_percent // 100
        self._on_event = on_event
        self._next = 0
        self._panic = False
        self.watchers: weakref.WeakSet[Watcher] = weakref.WeakSet()

    @property
    def addresses(self) -> list[str]:
        """The replica addresses, in rotation order."""
        return [r.address for r in self.replicas]

    @property
    def panic(self) -> bool:
        """Whether every replica in rotation is failing, so ejected ones are picked too."""
        return self._panic

    def set_addresses(self, addresses: Sequence[str]) -> None:
        """Change the replica set: new addresses join healthy, removed ones are forgotten (an
        attempt in flight on one may still report on the ``Replica`` it holds). Empty (a name
        that resolves to nothing for now): ``pick`` returns -1."""
        known = {r.address: r for r in self.replicas}
        self.replicas = [known.get(a) or Replica(a) for a in addresses]
        self.max_ejected = len(addresses) * self.policy.max_ejection_percent // 100
        self._next = 0
        self._refresh()

    def replica(self, ref: ReplicaRef) -> Replica:
        """The ``Replica`` of ``ref`` (an index or the replica itself)."""
        return ref if isinstance(ref, Replica) else self.replicas[ref]

    @property
    def ejected(self) -> int:
        """How many replicas are out of rotation now (ejected, not yet probing)."""
        return sum(1 for r in self.replicas if r.state == EJECTED)

    def pick(self, avoid: ReplicaRef = -1, exclude: Collection[Replica] = ()) -> int:
        """The index of the replica for the next attempt; marks it in flight.

        ``avoid``: the replica the previous attempt of this call failed on. ``exclude``:
        replicas that must not be picked at all (their circuit breaker is open); -1 when that
        leaves none. The caller must report the outcome with ``success``/``failure``/
        ``release`` exactly once.
        """
        replicas = self.replicas
        n = len(replicas)
        avoided = (
            avoid if isinstance(avoid, Replica) else (replicas[avoid] if 0 <= avoid < n else None)
        )
        start = self._next
        panic = self._panic
        now = -1.0
        for step in range(n):
            i = (start + step) % n
            r = replicas[i]
            if r is avoided or r in exclude:
                continue
            state = r.state
            if state is EJECTED:
                if now < 0:
                    now = self.clock.monotonic()
                if now >= r.until:
                    r.state = state = PROBING  # ejection over: one probe attempt goes through
                    if panic:
                        self._refresh()
                elif not panic:
                    continue
            if r.in_flight and (state is not HEALTHY or r.errors):
                continue  # a probe, or a suspect replica: one attempt at a time
            self._next = i + 1
            r.in_flight += 1
            return i
        return self._fallback(avoided, exclude)

    def _fallback(self, avoided: Replica | None, exclude: Collection[Replica]) -> int:
        # No replica is fully eligible: rather than fail the call, use the least bad one.
        # Order: a replica in rotation that is not failing; then (panic) an ejected one, the
        # one whose ejection ends first, as it may have recovered; then a failing replica in
        # rotation; then the one this call's previous attempt failed on.
        best = -1
        best_key: tuple[int, float, float] | None = None
        for i, r in enumerate(self.replicas):
            if r in exclude:
                continue
            if r is avoided:
                key: tuple[int, float, float] = (3, 0.0, 0.0)
            elif r.state is EJECTED:
                key = (1, r.until, 0.0)
            elif r.held:
                key = (2, r.errors, r.in_flight)
            else:
                key = (0, r.errors, r.in_flight)
            if best_key is None or key < best_key:
                best, best_key = i, key
        if best >= 0:
            self.replicas[best].in_flight += 1
        return best

    def success(self, i: ReplicaRef) -> None:
        """The attempt on replica ``i`` got an answer."""
        r = self.replica(i)
        r.in_flight -= 1
        r.local = 0
        r.errors = 0
        if r.held:
            r.held = False
            self._refresh()
        if r.state is not HEALTHY:
            self._return(r, "probe succeeded")
        elif r.ejections:
            # Forget past ejections once the replica has stayed healthy for the longest
            # ejection time, so one bad minute does not haunt it for the rest of the day.
            now = self.clock.monotonic()
            if now - r.healthy_since >= self.policy.max_ejection_time:
                r.ejections = 0

    def readmit(self, i: ReplicaRef, reason: str = "health check: SERVING") -> bool:
        """An active health check found replica ``i`` serving: back into rotation now (its
        ejection count stays, so a replica that keeps failing is still benched longer).
        Returns whether it was out of rotation."""
        r = self.replica(i)
        if r.state is HEALTHY:
            return False
        r.local = 0
        r.errors = 0
        r.held = False
        self._return(r, reason)
        return True

    def _return(self, r: Replica, reason: str) -> None:
        r.state = HEALTHY
        r.healthy_since = self.clock.monotonic()
        self._refresh()
        self._emit(r, False, reason, 0.0)

    def release(self, i: ReplicaRef) -> None:
        """The attempt on replica ``i`` ended without saying anything about the replica."""
        self.replica(i).in_flight -= 1

    def stream_failed(self, i: ReplicaRef, outcome: int) -> None:
        """A stream started on replica ``i`` (its pick already released: streams live long)
        ended with ``outcome``: counted like a failed attempt."""
        r = self.replica(i)
        r.in_flight += 1
        self.failure(r, outcome)

    def failure(self, i: ReplicaRef, outcome: int) -> None:
        """The attempt on replica ``i`` failed with ``outcome`` (OUTCOME_LOCAL or _ERROR)."""
        r = self.replica(i)
        r.in_flight -= 1
        if outcome == OUTCOME_LOCAL:
            r.local += 1
        r.errors += 1
        if r.state is EJECTED:
            return  # an attempt sent before the ejection (or a panic pick): nothing new
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
            # attempt at a time, ``held``: failing), and a failed probe returns it to plain
            # rotation. When every replica in rotation is held, ejected ones are tried too.
            r.state = HEALTHY
            if not r.held:
                r.held = True
                self._refresh()
            return
        now = self.clock.monotonic()
        policy = self.policy
        r.ejections += 1
        r.held = False
        duration = min(policy.max_ejection_time, policy.base_ejection_time * 2 ** (r.ejections - 1))
        r.state = EJECTED
        r.until = now + duration
        self._refresh()
        self._emit(r, True, reason, duration)
        for watcher in list(self.watchers):
            watcher.wake()

    def _refresh(self) -> None:
        # Panic: some replica is out of rotation and every one still in it is failing.
        out = False
        failing = True
        for r in self.replicas:
            if r.state is EJECTED:
                out = True
            elif not r.held:
                failing = False
        self._panic = out and failing

    def _emit(self, r: Replica, ejected: bool, reason: str, duration: float) -> None:
        if self._on_event is not None:
            self._on_event(
                OutlierEvent(self.target, r.address, ejected, reason, duration, r.ejections)
            )
