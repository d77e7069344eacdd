"""Server-side load shedding: a bounded in-flight queue per method, RESOURCE_EXHAUSTED past it.

An overloaded server that accepts every request lets its queue, and every caller's latency,
grow without bound until deadlines expire: it then does work nobody waits for, and goodput
collapses. ``LoadShedder`` (a ``grpc.aio`` server interceptor, installed by
``pkg.common.grpcserver.build_server``) keeps, per unary method, at most ``max_in_flight``
calls running and ``max_queue`` waiting for a slot (first come, first served). A call that
finds the queue full, or could not get a slot within its own deadline or ``max_queue_wait``, is
refused at once with RESOURCE_EXHAUSTED and a ``grpc-retry-pushback-ms`` trailer saying when a
slot is likely free (the time the queue ahead needs to drain, from the method's observed service
time). ``pkg.clients`` honours it: it waits that long before a retry of an idempotent method,
and its adaptive limiter lowers its concurrency.

Streaming methods are not limited here: a subscription or a node's control stream lives for
hours, so counting it "in flight" would cap subscribers, not load. Health and reflection are
never shed (an overloaded server must still answer its health checks).
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc
import grpc.aio

PUSHBACK_KEY = "grpc-retry-pushback-ms"

# Services whose calls are never shed.
EXEMPT_SERVICES: tuple[str, ...] = (
    "/grpc.health.v1.Health/",
    "/grpc.reflection.v1.ServerReflection/",
    "/grpc.reflection.v1alpha.ServerReflection/",
)


def _positive_int(value: object, field: str) -> None:
    if not (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
        raise ValueError(f"{field} must be an integer >= 1, got {value!r}")


@dataclass(frozen=True, slots=True)
class SheddingPolicy:
    """Per-method limits of one server (see the module docstring).

    ``max_in_flight`` unary calls of a method run at once, ``max_queue`` more wait for a slot
    (0: none wait), each at most ``max_queue_wait`` seconds (and never past its deadline).
    ``min_pushback``/``max_pushback`` bound the pushback sent with a refusal (seconds).
    """

    enabled: bool = True
    max_in_flight: int = 512
    max_queue: int = 512
    max_queue_wait: float = 1.0
    min_pushback: float = 0.01
    max_pushback: float = 2.0

    def __post_init__(self) -> None:
        _positive_int(self.max_in_flight, "shedding.max_in_flight")
        if not (
            isinstance(self.max_queue, int)
            and not isinstance(self.max_queue, bool)
            and self.max_queue >= 0
        ):
            raise ValueError(f"shedding.max_queue must be an integer >= 0, got {self.max_queue!r}")
        for name in ("max_queue_wait", "min_pushback", "max_pushback"):
            value = getattr(self, name)
            if not (
                isinstance(value, int | float)
                and not isinstance(value, bool)
                and math.isfinite(value)
                and value >= 0
            ):
                raise ValueError(f"shedding.{name} must be a number of seconds >= 0, got {value!r}")
        if self.max_pushback < self.min_pushback:
            raise ValueError(
                f"shedding.max_pushback ({self.max_pushback}) must be >= min_pushback "
                f"({self.min_pushback})"
            )


UNKNOWN_SERVICE_TIME = 0.1


class Shed(Exception):
    """A call refused by a method's gate; ``pushback`` is the suggested wait in seconds."""

    def __init__(self, why: str, pushback: float) -> None:
        super().__init__(why)
        self.why = why
        self.pushback = pushback


class _QueueTimeout(Exception):
    """Set on a waiter whose wait for a slot is over."""


class MethodGate:
    """The in-flight slots and waiting queue of one method (one event loop, no locks).

    ``enter(time_left)`` returns once the call holds a slot or raises ``Shed``; every
    successful ``enter`` is paired with one ``leave(elapsed)``. A freed slot is handed
    directly to the oldest waiter, so a late arrival never overtakes the queue.
    """

    def __init__(self, policy: SheddingPolicy) -> None:
        self.policy = policy
        self.in_flight = 0
        self.waiters: deque[asyncio.Future[None]] = deque()
        self.service_time = 0.0  # EMA of the time a call holds its slot
        self.shed = 0
        self.admitted = 0
        self._rng = random.Random()

    def pushback(self, ahead: int) -> float:
        """Seconds until ``ahead`` queued calls have drained, within the policy's bounds,
        spread over [1x, 2x] so that the callers refused together do not all return at once
        (clients wait exactly the pushback, gRFC A6)."""
        policy = self.policy
        # Before the first call has finished, nothing is known of the method's duration:
        # assume a tenth of a second rather than inviting an immediate retry.
        service_time = self.service_time if self.service_time > 0 else UNKNOWN_SERVICE_TIME
        estimate = (ahead + 1) / policy.max_in_flight * service_time
        estimate *= 1.0 + self._rng.random()
        return min(policy.max_pushback, max(policy.min_pushback, estimate))

    async def enter(self, time_left: float | None) -> None:
        """Take a slot, waiting in the queue if needed; ``Shed`` when refused."""
        policy = self.policy
        if self.in_flight < policy.max_in_flight and not self.waiters:
            self.in_flight += 1
            self.admitted += 1
            return
        ahead = len(self.waiters)
        if ahead >= policy.max_queue:
            self.shed += 1
            raise Shed(f"{ahead} calls already queued", self.pushback(ahead))
        wait = policy.max_queue_wait if time_left is None else min(policy.max_queue_wait, time_left)
        # Queue only when the slot is likely to come in time: a call that would time out in the
        # queue is better refused now, while its caller can still go elsewhere.
        expected = ahead / policy.max_in_flight * self.service_time
        if wait <= 0 or expected > wait:
            self.shed += 1
            raise Shed(f"no slot within {wait:.3f}s ({ahead} queued)", self.pushback(ahead))
        loop = asyncio.get_running_loop()
        slot: asyncio.Future[None] = loop.create_future()
        self.waiters.append(slot)
        expiry = loop.call_later(wait, _expire, slot)
        try:
            await slot
        except _QueueTimeout:
            self._forget(slot)
            self.shed += 1
            raise Shed(f"no slot within {wait:.3f}s", self.pushback(len(self.waiters))) from None
        except asyncio.CancelledError:
            # The caller went away; if the slot had already been handed over, pass it on.
            if slot.done() and not slot.cancelled() and slot.exception() is None:
                self.leave(None)
            else:
                self._forget(slot)
            raise
        finally:
            expiry.cancel()
        self.admitted += 1

    def _forget(self, slot: asyncio.Future[None]) -> None:
        # A waiter that stopped waiting leaves the queue at once, so the queue's length is the
        # number of calls really waiting.
        try:
            self.waiters.remove(slot)
        except ValueError:
            pass

    def leave(self, elapsed: float | None) -> None:
        """Give the slot back (to the oldest waiter still waiting, if any)."""
        if elapsed is not None:
            if self.service_time <= 0:
                self.service_time = elapsed
            else:
                self.service_time += (elapsed - self.service_time) * 0.1
        waiters = self.waiters
        while waiters:
            slot = waiters.popleft()
            if not slot.done():
                slot.set_result(None)  # the slot changes hands: in_flight stays
                return
        self.in_flight -= 1


def _expire(slot: asyncio.Future[None]) -> None:
    if not slot.done():
        slot.set_exception(_QueueTimeout())


Behaviour = Callable[[Any, grpc.aio.ServicerContext[Any, Any]], Awaitable[Any]]


class LoadShedder(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """grpc.aio server interceptor: one ``MethodGate`` per unary method (see module doc)."""

    def __init__(self, policy: SheddingPolicy | None = None) -> None:
        self.policy = policy or SheddingPolicy()
        self.gates: dict[str, MethodGate] = {}
        # Handlers are the same object for every call of a method: wrap each once.
        self._wrapped: dict[str, tuple[Any, Any]] = {}

    async def intercept_service(
        self,
        continuation: Callable[
            [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any]]
        ],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any]:
        handler = await continuation(handler_call_details)
        if handler is None or handler.unary_unary is None or not self.policy.enabled:
            return handler
        method: str = handler_call_details.method
        if method.startswith(EXEMPT_SERVICES):
            return handler
        cached = self._wrapped.get(method)
        if cached is not None and cached[0] is handler:
            found: grpc.RpcMethodHandler[Any, Any] = cached[1]
            return found
        gate = self.gates.get(method)
        if gate is None:
            gate = self.gates[method] = MethodGate(self.policy)
        wrapped = grpc.unary_unary_rpc_method_handler(
            _limited(gate, handler.unary_unary),
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
        self._wrapped[method] = (handler, wrapped)
        return wrapped


def _limited(gate: MethodGate, behaviour: Any) -> Behaviour:
    async def limited(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        try:
            await gate.enter(context.time_remaining())
        except Shed as shed:
            context.set_trailing_metadata(
                ((PUSHBACK_KEY, str(max(1, round(shed.pushback * 1000)))),)
            )
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED, f"server overloaded: {shed.why}"
            )
        start = time.monotonic()
        try:
            result = behaviour(request, context)
            if asyncio.iscoroutine(result) or isinstance(result, asyncio.Future):
                result = await result
            return result
        finally:
            gate.leave(time.monotonic() - start)

    return limited
