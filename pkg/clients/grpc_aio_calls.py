"""What a stub method on a ``ResilientChannel`` returns, and how its calls run.

Unary calls run the engine (deadline, breaker, budget, retries, hedging) directly, without
grpc.aio's interceptor task; over several replicas every attempt goes to the replica the
outlier detector picks. Streaming calls over several replicas start on a picked replica, and
a stream that ends because its replica's connection broke counts against that replica.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Sequence
from typing import Any

import grpc
import grpc.aio

from pkg.clients.breaker import (
    BREAKER_IGNORE,
    BREAKER_SUCCESS,
    STATE_CLOSED,
    STATE_OPEN,
    TICKET_NORMAL,
    CircuitBreaker,
)
from pkg.clients.classify import outlier_outcome
from pkg.clients.connection import NotSentError, connected, ensure_ready
from pkg.clients.engine import EJECTED_REPLICA_ATTR, call_async
from pkg.clients.grpc_core import ClientCore
from pkg.clients.outlier import (
    EJECTED,
    HEALTHY,
    OUTCOME_LOCAL,
    OUTCOME_NEUTRAL,
    OUTCOME_SUCCESS,
    Replica,
)
from pkg.clients.replicas import ReplicaPool, pick_admitted


class UnaryCall:
    """What a unary call on a ``ResilientChannel`` returns: awaitable, with the Call methods.

    The call starts when first awaited (directly, or through ``code()``, ``details()`` and the
    metadata methods) and runs once: every later or concurrent await gets the same outcome, so
    asking for the status of a call in flight never sends it again. The status and metadata
    methods report the last attempt; ``cancel()`` stops the whole call, whether an attempt is
    in flight or it is waiting to retry.
    """

    __slots__ = (
        "_callable",
        "_done",
        "_error",
        "_kw",
        "_last",
        "_on_done",
        "_request",
        "_result",
        "_started",
        "_task",
    )

    def __init__(
        self,
        callable_: UnaryUnaryMultiCallable | PooledUnaryUnaryMultiCallable,
        request: Any,
        kw: dict[str, Any],
    ):
        self._callable = callable_
        self._request = request
        self._kw = kw
        self._last: Any = None
        self._done = False
        self._result: Any = None
        self._error: BaseException | None = None
        self._started = False
        # The task running the call, known once it may wait between attempts (see cancel()).
        self._task: asyncio.Task[Any] | None = None
        self._on_done: list[Callable[[Any], None]] | None = None

    def __await__(self) -> Any:
        return self._run().__await__()

    async def _run(self) -> Any:
        if self._done or self._started:
            return await self._outcome()
        self._started = True
        mc = self._callable
        if mc.state.hedge:  # hedges run in tasks of their own: cancel() needs this one
            self._task = asyncio.current_task()
        kw = self._kw
        auth = mc.core.auth
        if auth:
            kw["metadata"] = (*auth, *(kw.get("metadata") or ()))
        timeout = kw.pop("timeout", None)
        attempt = self._attempt_fn(self._request, kw)
        try:
            self._result = await call_async(mc.state, timeout, attempt, mc.classify)
        except BaseException as exc:  # cancellation included: it is this call's outcome
            self._error = exc
            self._finish()
            raise
        self._done = True
        if self._on_done is not None:
            self._finish()
        return self._result

    async def _outcome(self) -> Any:
        if not self._done:  # another task runs the call: wait for its outcome
            settled: asyncio.Future[None] = asyncio.get_running_loop().create_future()

            def wake(_: Any) -> None:
                if not settled.done():  # this waiter may have been cancelled meanwhile
                    settled.set_result(None)

            self.add_done_callback(wake)
            await settled
        if self._error is not None:
            raise self._error
        return self._result

    def _finish(self) -> None:
        self._done = True
        callbacks, self._on_done = self._on_done, None
        for callback in callbacks or ():
            callback(self)

    def _attempt_fn(self, request: Any, kw: dict[str, Any]) -> Callable[[float], Any]:
        mc = self._callable
        assert isinstance(mc, UnaryUnaryMultiCallable)  # pooled calls have their own
        raw = mc.raw
        channel = mc.channels[0] if mc.gated else None

        async def attempt(attempt_timeout: float) -> Any:
            if channel is not None and channel.get_state(False) is not _READY:
                attempt_timeout = await _connected(channel, mc.core.target, attempt_timeout)
            call = raw(request, timeout=attempt_timeout, **kw)
            self._last = call
            try:
                return await call
            except BaseException:
                self._attempt_failed()
                raise

        return attempt

    def _attempt_failed(self) -> None:
        # From here on the call may wait before a retry, which only cancelling the task that
        # runs it can stop. Looking the task up costs more than the rest of a successful call's
        # bookkeeping, so it is done here, on the failure path (the attempt runs in that task).
        if self._task is None:
            self._task = asyncio.current_task()

    def cancel(self) -> bool:
        """Cancel the call (awaiting it then raises ``asyncio.CancelledError``; never retried).

        Returns False when it had already finished.
        """
        if self._done:
            return False
        if not self._started:  # it never will be
            self._error = asyncio.CancelledError()
            self._finish()
            return True
        if self._task is not None:
            # Reaches the attempt in flight (grpc.aio cancels an RPC whose awaiter is
            # cancelled), the hedges, and a wait before a retry.
            return self._task.cancel()
        # The first attempt is in flight: cancelled, it ends the call (never retried).
        return bool(self._last is not None and self._last.cancel())

    def cancelled(self) -> bool:
        """Whether the call was cancelled."""
        return isinstance(self._error, asyncio.CancelledError)

    def done(self) -> bool:
        """Whether the call has finished (all attempts)."""
        return self._done

    def time_remaining(self) -> float | None:
        """Time left on the current attempt's deadline."""
        return None if self._last is None else self._last.time_remaining()

    def add_done_callback(self, callback: Callable[[Any], None]) -> None:
        """``callback(call)`` once the call has finished (at once if it has)."""
        if self._done:
            callback(self)
        elif self._on_done is None:
            self._on_done = [callback]
        else:
            self._on_done.append(callback)

    async def initial_metadata(self) -> Any:
        """Initial metadata of the last attempt."""
        await self._settled()
        return None if self._last is None else await self._last.initial_metadata()

    async def trailing_metadata(self) -> Any:
        """Trailing metadata of the last attempt."""
        await self._settled()
        return None if self._last is None else await self._last.trailing_metadata()

    async def code(self) -> grpc.StatusCode:
        """Final status code (UNAVAILABLE for a breaker rejection, CANCELLED if cancelled)."""
        await self._settled()
        if self.cancelled():
            return grpc.StatusCode.CANCELLED
        if self._last is None and self._error is not None:
            return getattr(self._error, "code", lambda: grpc.StatusCode.UNKNOWN)()
        return await self._last.code()  # type: ignore[no-any-return]

    async def details(self) -> str:
        """Final status details."""
        await self._settled()
        if self._last is None and self._error is not None:
            return str(self._error)
        return await self._last.details()  # type: ignore[no-any-return]

    async def wait_for_connection(self) -> None:
        """Wait until the current attempt is connected (nothing to wait for before it starts)."""
        if self._last is not None:
            await self._last.wait_for_connection()

    async def _settled(self) -> None:
        # The outcome itself (a result or an error) is for the awaiter; the status methods
        # report it. Only the cancellation of the task asking is not the call's to swallow.
        try:
            await self._run()
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise
        except Exception:
            pass


_READY = grpc.ChannelConnectivity.READY
_CLOSED = STATE_CLOSED


async def _connected(
    channel: Any, target: str, attempt_timeout: float, wait_s: float | None = None
) -> float:
    """Wait (within the attempt's time, and at most ``wait_s`` when given) until ``channel`` is
    READY, else raise ``NotSentError``; returns the attempt time left for the call itself."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    await ensure_ready(
        channel, target, attempt_timeout if wait_s is None else min(attempt_timeout, wait_s)
    )
    return max(0.001, attempt_timeout - (loop.time() - start))


# How long the probe of a replica whose ejection is over may wait for its connection when the
# call has failed nowhere yet (replicas in rotation are there to answer it): a replica that is
# back connects within milliseconds; one still down is refused at once, or silent.
PROBE_CONNECT_S = 0.25


# Least time an attempt without a per-attempt cap must have had for its timeout to count
# against the replica (outlier ejection).
MIN_HUNG_TIMEOUT = 0.1


class PooledUnaryCall(UnaryCall):
    """A unary call whose every attempt goes to the replica the outlier detector picks, under
    that replica's own circuit breaker."""

    __slots__ = ()

    def _attempt_fn(self, request: Any, kw: dict[str, Any]) -> Callable[[float], Any]:
        mc: PooledUnaryUnaryMultiCallable = self._callable  # type: ignore[assignment]
        pool = mc.pool
        detector = pool.detector
        state = mc.state
        cap = state.attempt_timeout
        idempotent = state.idempotent
        gated = mc.gated
        clock = state.clock
        failed: list[Replica | None] = [None]  # the replica the previous attempt failed on

        def choose() -> tuple[Replica, CircuitBreaker | None, int]:
            # The replica picked, its breaker and the breaker's ticket; when every replica's
            # breaker refuses, the call fails fast.
            r, breaker, ticket, error = pick_admitted(
                detector, failed[0], mc.breaker, clock.monotonic, pool.wake_checker
            )
            if r is not None:
                return r, breaker, ticket
            if error is not None:
                raise error
            pool.targets.refresh_soon()
            raise NotSentError(
                pool.targets.name, "no replica address known", grpc.StatusCode.UNAVAILABLE
            )

        async def attempt(attempt_timeout: float) -> Any:
            r, breaker, ticket = choose()
            started = clock.monotonic()
            try:
                channel = pool.channel(r.address)
                if gated and channel.get_state(False) is not _READY:
                    attempt_timeout = await _connected(channel, r.address, attempt_timeout)
                if r.state is HEALTHY:
                    call = mc.raw(r.address)(request, timeout=attempt_timeout, **kw)
                elif failed[0] is None and not detector.panic:
                    # The probe of a replica whose ejection is over, on a call that failed
                    # nowhere yet: the replicas in rotation can answer it, so the probe is
                    # sent only on a connection that is READY within PROBE_CONNECT_S, else
                    # it is not sent at all (NotSentError: retried on another replica).
                    # Waiting for the connection of a replica still dead held the call for
                    # its whole deadline (the routings that failed in every Foghorn herd).
                    if channel.get_state(False) is not _READY:
                        attempt_timeout = await _connected(
                            channel, r.address, attempt_timeout, PROBE_CONNECT_S
                        )
                    call = mc.raw(r.address)(request, timeout=attempt_timeout, **kw)
                else:
                    # A replica out of rotation is tried because nothing better is left (panic
                    # routing, or the call failed elsewhere): it may be back but not yet
                    # reconnected, so the attempt waits (within its time) for the connection
                    # instead of failing at once on the broken one.
                    ready = {**kw, "wait_for_ready": True}
                    call = mc.raw(r.address)(request, timeout=attempt_timeout, **ready)
                self._last = call
                result = await call
            except Exception as exc:
                capped = attempt_timeout == cap
                if breaker is not None:
                    verdict = mc.classify(exc, capped, attempt_timeout)
                    if verdict.breaker != BREAKER_IGNORE or ticket != TICKET_NORMAL:
                        now = clock.monotonic()
                        breaker.record(ticket, verdict.breaker, now, now - started)
                # A timeout says the replica hung when the attempt was capped by its per-attempt
                # timeout (the engine passes exactly the cap then), or, for an idempotent
                # method (a read: it answers by itself), when it had ample time: at least
                # MIN_HUNG_TIMEOUT and 10x the method's usual latency. A caller's own tiny
                # deadline, or a write waiting on something downstream, says nothing.
                outcome = outlier_outcome(
                    exc,
                    capped
                    or (
                        idempotent
                        and attempt_timeout >= max(MIN_HUNG_TIMEOUT, 10 * state.latency_ema)
                    ),
                    connected(pool.channels.get(r.address)),
                )
                if outcome == OUTCOME_SUCCESS:
                    detector.success(r)
                elif outcome == OUTCOME_NEUTRAL:
                    detector.release(r)
                else:
                    failed[0] = r
                    detector.failure(r, outcome)
                    if outcome == OUTCOME_LOCAL:
                        pool.targets.refresh_soon()
                    if r.state is EJECTED:
                        with contextlib.suppress(AttributeError):
                            setattr(exc, EJECTED_REPLICA_ATTR, True)
                self._attempt_failed()
                raise
            except BaseException:
                if breaker is not None:
                    breaker.release(ticket)
                detector.release(r)
                self._attempt_failed()
                raise
            if breaker is not None:
                now = clock.monotonic()
                breaker.record(ticket, BREAKER_SUCCESS, now, now - started)
            detector.success(r)
            return result

        return attempt


class PooledUnaryUnaryMultiCallable:
    """``stub.Method`` on a channel over replicas: each attempt on a picked replica.

    A method that is not idempotent is ``gated`` (see ``UnaryUnaryMultiCallable``). The grpc
    multicallable and the breaker of each replica are looked up by address (cached), so the
    replica set can change between calls.
    """

    __slots__ = (
        "_args",
        "_breakers",
        "_raws",
        "classify",
        "core",
        "gated",
        "method",
        "pool",
        "state",
    )

    def __init__(
        self,
        pool: ReplicaPool,
        core: ClientCore,
        method: str,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> None:
        self.pool = pool
        self.core = core
        self.method = method
        self._args = (args, kwargs)
        self.state, self.classify = core.method(method)
        self.gated = not self.state.idempotent
        self._raws: dict[str, Any] = {}
        self._breakers: dict[str, CircuitBreaker | None] = {}

    def raw(self, address: str) -> Any:
        """grpc's multicallable of this method on the replica ``address``."""
        raw = self._raws.get(address)
        channel = self.pool.channel(address)
        if raw is None or raw[0] is not channel:  # a replica that left and came back
            args, kwargs = self._args
            raw = self._raws[address] = (
                channel,
                channel.unary_unary(self.method, *args, **kwargs),
            )
        return raw[1]

    def breaker(self, address: str) -> CircuitBreaker | None:
        """The breaker of the replica ``address`` (None when the policy has none)."""
        try:
            return self._breakers[address]
        except KeyError:
            name = self.method.decode() if isinstance(self.method, bytes) else self.method
            breaker = self._breakers[address] = self.pool.breaker(address, name)
            return breaker

    def __call__(self, request: Any, **kw: Any) -> UnaryCall:
        """A call of ``request`` (``timeout=`` is its overall deadline); it starts when awaited."""
        if not self.pool.started:
            self.pool.start()
        return PooledUnaryCall(self, request, kw)


class UnaryUnaryMultiCallable:
    """``stub.Method`` on a ``ResilientChannel``: the policy without grpc's interceptor task.

    ``channels`` are the grpc channels behind ``raws`` (one per replica). A method that is not
    idempotent is ``gated``: each attempt is sent only on a READY connection, so that a failure
    to connect is known, from the transport, to have sent nothing (``pkg.clients.connection``).
    """

    __slots__ = ("channels", "classify", "core", "gated", "raw", "state")

    def __init__(
        self,
        raws: Sequence[Any],
        core: ClientCore,
        method: str | bytes,
        channels: Sequence[Any] = (),
    ) -> None:
        self.raw = raws[0]
        self.core = core
        self.state, self.classify = core.method(method)
        self.channels = tuple(channels)
        # Without the channels (a multicallable built by hand) nothing is gated, so nothing is
        # ever taken as not sent.
        self.gated = bool(self.channels) and not self.state.idempotent

    def __call__(self, request: Any, **kw: Any) -> UnaryCall:
        """A call of ``request`` (``timeout=`` is its overall deadline); it starts when awaited."""
        return UnaryCall(self, request, kw)


class _StreamOutcome(grpc.RpcError):
    """The final status of a stream, shaped like an RPC error for ``outlier_outcome``."""

    def __init__(self, code: grpc.StatusCode, details: str | None) -> None:
        self._code = code
        self._details = details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str | None:
        return self._details


async def _report_stream_end(pool: ReplicaPool, r: Replica, call: Any, channel: Any) -> None:
    # Only a broken connection (a dead or unreachable replica) says something here: streams
    # end for many legitimate reasons (cancelled, server closed them, domain errors).
    try:
        code = await call.code()
        details = await call.details()
    except Exception:
        return
    if code != grpc.StatusCode.UNAVAILABLE:
        return
    outcome = outlier_outcome(_StreamOutcome(code, details), False, connected(channel))
    if outcome == OUTCOME_LOCAL:
        pool.detector.stream_failed(r, outcome)
        pool.targets.refresh_soon()


class PooledStreamMultiCallable:
    """A streaming multicallable over replicas: each new stream goes to a picked replica.

    A stream lives long, so its pick is released at once; when it later ends because the
    connection to its replica broke (the replica died or is unreachable), that counts against
    the replica like a failed attempt, so reconnecting streams stop picking a dead replica
    after a few failures instead of alternating with it until keepalive notices. Each
    replica's channel carries the stream interceptors with that replica's own breaker; a
    replica whose breaker is open is skipped while another one can take the stream.
    """

    __slots__ = ("_args", "_raws", "kind", "method", "pool")

    def __init__(
        self,
        pool: ReplicaPool,
        kind: str,
        method: str,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> None:
        self.pool = pool
        self.kind = kind
        self.method = method
        self._args = (args, kwargs)
        self._raws: dict[str, tuple[Any, Any]] = {}

    def _raw(self, address: str) -> Any:
        raw = self._raws.get(address)
        channel = self.pool.channel(address)
        if raw is None or raw[0] is not channel:
            args, kwargs = self._args
            raw = self._raws[address] = (
                channel,
                getattr(channel, self.kind)(self.method, *args, **kwargs),
            )
        return raw[1]

    def __call__(self, *args: Any, **kw: Any) -> Any:
        """Start a stream (grpc's arguments) on the replica the detector picks."""
        pool = self.pool
        if not pool.started:
            pool.start()
        detector = pool.detector
        method = self.method.decode() if isinstance(self.method, bytes) else self.method
        refused: list[Replica] = []
        while True:
            i = detector.pick(-1, refused)
            if i < 0:
                # Every replica's breaker is open (or none is known): the interceptors of
                # the first one fail the stream fast with the breaker's error.
                pool.wake_checker()
                replicas = detector.replicas
                if not replicas:
                    pool.targets.refresh_soon()
                    raise NotSentError(
                        pool.targets.name, "no replica address known", grpc.StatusCode.UNAVAILABLE
                    )
                r = replicas[0]
                break
            r = detector.replicas[i]
            detector.release(r)
            breaker = pool.breaker(r.address, method)
            if breaker is None or breaker.state != STATE_OPEN or breaker.retry_after() <= 0:
                break
            refused.append(r)
        channel = pool.channel(r.address)
        call = self._raw(r.address)(*args, **kw)
        add_done = getattr(call, "add_done_callback", None)
        if add_done is not None:
            tasks: set[asyncio.Task[None]] = _STREAM_REPORTS

            def on_done(done_call: Any) -> None:
                task = asyncio.ensure_future(_report_stream_end(pool, r, done_call, channel))
                tasks.add(task)
                task.add_done_callback(tasks.discard)

            with contextlib.suppress(Exception):
                add_done(on_done)
        return call


# Strong references to the status checks of ended streams until they finish.
_STREAM_REPORTS: set[asyncio.Task[None]] = set()
