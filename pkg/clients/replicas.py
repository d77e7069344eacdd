"""The replicas behind one ``ResilientChannel``: a connection each, health checks, membership.

A channel over several replicas (``aio_channel`` with outlier ejection on) holds a
``ReplicaPool``: one grpc channel per replica address, opened when the address first appears,
closed (after a grace period for the calls in flight) when it leaves the replica set. The
pool's ``HealthChecker`` re-admits replicas actively: while a replica is ejected, or its
circuit breaker is open, it asks that replica for its gRPC health through the replica's own
connection every ``OutlierPolicy.health_check_interval`` and returns it to rotation (breaker
half-open, so the next call probes it) as soon as it answers SERVING.

The replica set comes from a ``TargetList`` (``pkg.clients.targets``): fixed, a DNS name
re-resolved in the background, a watched file, or fed by the caller (a Foghorn control stream
telling its nodes the current replicas).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import grpc.aio
from grpc_health.v1 import health_pb2

from pkg.clients.breaker import (
    STATE_CLOSED,
    STATE_HALF_OPEN,
    STATE_OPEN,
    TICKET_NORMAL,
    BreakerOpenError,
    CircuitBreaker,
)
from pkg.clients.grpc_core import ClientCore
from pkg.clients.outlier import HEALTHY, OutlierDetector, Replica
from pkg.clients.policy import Policy
from pkg.clients.runtime import Runtime
from pkg.clients.targets import TargetList

CHECK_METHOD = "/grpc.health.v1.Health/Check"
_SERVING = health_pb2.HealthCheckResponse.SERVING

# Calls in flight on a replica that left the replica set get this long before its connection
# is closed (a long-lived stream is then ended: its caller reconnects to a current replica).
REMOVAL_GRACE_S = 10.0


class ReplicaPool:
    """One grpc channel per replica of a ``TargetList``, the shared outlier detector, and
    the health checker of this channel.

    ``open_replica(address)`` opens the grpc channel of one replica and the per-replica
    ``ClientCore`` its stream interceptors use (the replica's own breaker).
    """

    def __init__(
        self,
        targets: TargetList,
        detector: OutlierDetector,
        core: ClientCore,
        policy: Policy,
        open_replica: Callable[[str], grpc.aio.Channel],
    ) -> None:
        self.targets = targets
        self.detector = detector
        self.core = core
        self.policy = policy  # the caller's policy: its breaker settings are per replica
        self._open = open_replica
        self.channels: dict[str, grpc.aio.Channel] = {}
        self._retiring: set[asyncio.Task[None]] = set()
        self.closed = False
        self.started = False
        outlier = policy.outlier
        self.checker = (
            HealthChecker(
                detector,
                core.runtime,
                outlier.health_check_interval,
                self._serving,
                self.channels.__contains__,
            )
            if outlier.health_check
            else None
        )
        self._check_request = health_pb2.HealthCheckRequest(service=outlier.health_service)
        self._check_timeout = outlier.health_check_timeout
        for address in targets.addresses:
            self.channel(address)
        targets.subscribe(self._on_change)
        targets.acquire()

    def start(self) -> None:
        """First call inside an event loop: the target list starts refreshing itself."""
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return
        self.started = True
        self.targets.start()

    def channel(self, address: str) -> grpc.aio.Channel:
        """The grpc channel to ``address`` (opened on first use)."""
        channel = self.channels.get(address)
        if channel is None:
            channel = self.channels[address] = self._open(address)
        return channel

    def breaker(self, address: str, method: str) -> CircuitBreaker | None:
        """The circuit breaker of one replica (per method when the policy says so)."""
        if not self.policy.breaker.enabled:
            return None
        return self.core.runtime.breaker(address, method, self.policy)

    def breakers_of(self, address: str) -> list[CircuitBreaker]:
        """Every breaker of one replica created so far."""
        return self.core.runtime.breakers_of(address)

    async def _serving(self, address: str) -> bool:
        # gRPC health through the replica's own connection; wait_for_ready lets the check
        # ride its reconnection, so a replica that restarts answers as soon as it listens.
        channel = self.channels.get(address)
        if channel is None:
            return False
        try:
            reply: Any = await channel.unary_unary(
                CHECK_METHOD,
                request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
                response_deserializer=health_pb2.HealthCheckResponse.FromString,
            )(
                self._check_request,
                timeout=self._check_timeout,
                wait_for_ready=True,
                metadata=self.core.auth,
            )
        except grpc.RpcError as exc:
            # A server without the health service is up: it answered.
            return isinstance(exc, grpc.Call) and exc.code() == grpc.StatusCode.UNIMPLEMENTED
        return bool(reply.status == _SERVING)

    def wake_checker(self) -> None:
        """A replica's breaker refused a call: make sure the health checker runs."""
        if self.checker is not None:
            self.checker.wake()

    def _on_change(self, addresses: tuple[str, ...]) -> None:
        # The detector follows the list too (the runtime subscribed it); this channel opens
        # connections to new replicas now and retires the ones that left.
        if self.closed:
            return
        for address in addresses:
            self.channel(address)
        for address in [a for a in self.channels if a not in addresses]:
            self._retire(address)
        if self.checker is not None:
            self.checker.wake()

    def _retire(self, address: str) -> None:
        channel = self.channels.pop(address)
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # no loop (an update outside asyncio): the channel closes when collected
        task = loop.create_task(channel.close(REMOVAL_GRACE_S))
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    async def close(self, grace: float | None) -> None:
        """Close every replica connection (``grace``: let calls in flight finish)."""
        self.closed = True
        self.targets.unsubscribe(self._on_change)
        self.targets.release()
        if self.checker is not None:
            await self.checker.close()
        channels = list(self.channels.values())
        await asyncio.gather(*(c.close(grace) for c in channels), *self._retiring)


class HealthChecker:
    """Active re-admission of the replicas of one channel or HTTP client.

    Runs only while some replica is out of rotation (ejected, probing) or has an open breaker:
    woken by an ejection (the detector's watchers) or a breaker refusal, it asks every such
    replica ``probe(address)`` (True: it serves) each interval and stops when none is left.
    On True the replica is back in rotation and its open breakers go half-open (the next call
    probes them at once instead of after their open duration).
    """

    def __init__(
        self,
        detector: OutlierDetector,
        runtime: Runtime,
        interval: float,
        probe: Callable[[str], Awaitable[bool]],
        known: Callable[[str], bool],
        breaker_name: Callable[[str], str] = str,
    ) -> None:
        self.detector = detector
        self.runtime = runtime
        self.interval = interval
        self._probe = probe
        self._known = known
        self._breaker_name = breaker_name
        self.checks = 0  # health checks sent (for tests and the curious)
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        detector.watchers.add(self)

    def wake(self) -> None:
        """Start checking (no-op when already running, closed, or outside an event loop)."""
        if self._closed or (self._task is not None and not self._task.done()):
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        self._task = loop.create_task(self._run())

    def _breakers(self, address: str) -> list[CircuitBreaker]:
        return self.runtime.breakers_of(self._breaker_name(address))

    def _due(self) -> list[Replica]:
        due = []
        for r in self.detector.replicas:
            if not self._known(r.address):
                continue
            if r.state is not HEALTHY or any(
                b.state == STATE_OPEN for b in self._breakers(r.address)
            ):
                due.append(r)
        return due

    async def _run(self) -> None:
        while not self._closed:
            due = self._due()
            if not due:
                return
            await asyncio.gather(*(self._check(r) for r in due))
            await asyncio.sleep(self.interval)

    async def _check(self, r: Replica) -> None:
        self.checks += 1
        try:
            serving = await self._probe(r.address)
        except Exception:  # closed channel or client: no news about the replica
            serving = False
        if not serving or self._closed:
            return
        if r in self.detector.replicas:
            self.detector.readmit(r)
        for breaker in self._breakers(r.address):
            if breaker.state == STATE_OPEN:
                breaker.force(STATE_HALF_OPEN, reason="health check: SERVING")

    async def close(self) -> None:
        """Stop checking."""
        self._closed = True
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task


def pick_admitted(
    detector: OutlierDetector,
    avoid: Replica | None,
    breaker_of: Callable[[str], CircuitBreaker | None],
    now: Callable[[], float],
    refused_hook: Callable[[], None],
) -> tuple[Replica | None, CircuitBreaker | None, int, BreakerOpenError | None]:
    """The replica for an attempt, its breaker and the breaker's ticket.

    A replica whose breaker refuses is skipped; when none is left: (None, None, 0, the last
    breaker error or None when no replica is known at all).
    """
    refused: list[Replica] = []
    error: BreakerOpenError | None = None
    while True:
        i = detector.pick(-1 if avoid is None else avoid, refused)
        if i < 0:
            return None, None, TICKET_NORMAL, error
        r = detector.replicas[i]
        breaker = breaker_of(r.address)
        if breaker is None or breaker.state == STATE_CLOSED:
            return r, breaker, TICKET_NORMAL, None
        try:
            return r, breaker, breaker.admit(now()), None
        except BreakerOpenError as exc:
            detector.release(r)
            refused.append(r)
            error = exc
            refused_hook()
