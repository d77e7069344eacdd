"""grpc.aio interceptors and the ``aio_channel`` factory.

Unary-unary calls run through the engine (deadline, breaker, budget, retries, hedging).
Unary-stream and stream-stream calls retry only their setup: until the first response arrives
(or the stream has stayed alive for ``policy.stream_setup`` seconds). Once data has flowed a
stream error is the caller's to handle: re-sending could duplicate effects.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from typing import Any

import grpc
import grpc.aio

from pkg.clients.classify import outlier_outcome
from pkg.clients.engine import EJECTED_REPLICA_ATTR, call_async
from pkg.clients.grpc_core import (
    END_OF_STREAM,
    ClientCore,
    InterceptorBase,
    StreamCall,
    channel_options,
)
from pkg.clients.outlier import (
    EJECTED,
    OUTCOME_LOCAL,
    OUTCOME_NEUTRAL,
    OUTCOME_SUCCESS,
    OutlierDetector,
)
from pkg.clients.policy import Policy
from pkg.clients.runtime import Runtime
from pkg.clients.targets import ResolvedTarget, resolve_targets
from pkg.clients.telemetry import instruments


def _details(
    details: grpc.aio.ClientCallDetails, timeout: float | None, auth: tuple[tuple[str, str], ...]
) -> grpc.aio.ClientCallDetails:
    metadata = details.metadata
    if auth:
        metadata = grpc.aio.Metadata(*auth, *(metadata or ()))
    return grpc.aio.ClientCallDetails(
        details.method, timeout, metadata, details.credentials, details.wait_for_ready
    )


class AioUnaryUnaryInterceptor(InterceptorBase, grpc.aio.UnaryUnaryClientInterceptor):  # type: ignore[type-arg]
    """Deadline-first retries, budget, breaker and hedging for asyncio unary calls."""

    async def intercept_unary_unary(
        self,
        continuation: Callable[[grpc.aio.ClientCallDetails, Any], Any],
        client_call_details: grpc.aio.ClientCallDetails,
        request: Any,
    ) -> Any:
        core = self.core
        state, classify = core.method(client_call_details.method)
        auth = core.auth

        async def attempt(timeout: float) -> Any:  # noqa: ASYNC109
            call = await continuation(_details(client_call_details, timeout, auth), request)
            return await call

        return await call_async(state, client_call_details.timeout, attempt, classify)


async def _establish(call: Any, setup: float) -> tuple[Any, Any]:
    """Wait for a stream's first message, its end, or ``setup`` seconds of it staying alive.

    Returns (iterator, first message task); raises the call's error if it failed first.
    """
    iterator = call.__aiter__()
    first: asyncio.Future[Any] = asyncio.ensure_future(_first(iterator))
    try:
        done, _ = await asyncio.wait({first}, timeout=setup)
    except asyncio.CancelledError:
        first.cancel()
        call.cancel()
        raise
    if done:
        first.result()  # raises the setup failure (AioRpcError) for the engine to classify
    return iterator, first


async def _first(iterator: Any) -> Any:
    try:
        return await iterator.__anext__()
    except StopAsyncIteration:
        return END_OF_STREAM


async def _rest(iterator: Any, first: asyncio.Future[Any]) -> AsyncIterator[Any]:
    try:
        message = await first
    except asyncio.CancelledError:
        first.cancel()
        raise
    if message is END_OF_STREAM:
        return
    yield message
    async for message in iterator:
        yield message


class AioUnaryStreamInterceptor(InterceptorBase, grpc.aio.UnaryStreamClientInterceptor):  # type: ignore[type-arg]
    """Retries the setup of server-streaming calls, never after the first message."""

    async def intercept_unary_stream(
        self,
        continuation: Callable[[grpc.aio.ClientCallDetails, Any], Any],
        client_call_details: grpc.aio.ClientCallDetails,
        request: Any,
    ) -> Any:
        auth = self.core.auth
        stream = StreamCall(self.core, client_call_details)

        async def attempt(_: float) -> tuple[Any, Any]:
            details = _details(client_call_details, stream.attempt_timeout(), auth)
            return await _establish(await continuation(details, request), stream.setup)

        iterator, first = await call_async(stream.state, stream.given, attempt, stream.classify)
        return _rest(iterator, first)


class _AsyncReplay:
    """Feeds a request stream to successive attempts, replaying what the failed ones consumed.

    Messages are buffered only until the stream is established, then buffering stops.
    """

    def __init__(self, source: Any) -> None:
        if hasattr(source, "__aiter__"):
            self._source: Any = source.__aiter__()
            self._async = True
        else:
            self._source = iter(source)
            self._async = False
        self.buffer: list[Any] = []
        self.recording = True

    async def _next(self) -> Any:
        if self._async:
            try:
                return await self._source.__anext__()
            except StopAsyncIteration:
                return END_OF_STREAM
        return next(self._source, END_OF_STREAM)

    async def fresh(self) -> AsyncIterator[Any]:
        """A new request iterator for one attempt."""
        for message in list(self.buffer):
            yield message
        while True:
            message = await self._next()
            if message is END_OF_STREAM:
                return
            if self.recording:
                self.buffer.append(message)
            yield message

    def established(self) -> None:
        """Stop buffering: the stream will not be retried any more."""
        self.recording = False
        self.buffer.clear()


def _written_by_the_caller(request_iterator: Any) -> bool:
    """Whether a stream's requests come from ``call.write()`` rather than an iterator.

    grpc.aio hands the interceptors of such a call its own async generator that proxies the
    writes (``grpc/aio/_interceptor.py``); it yields nothing until the interceptors return.
    """
    return request_iterator is None or (
        getattr(request_iterator, "__name__", None) == "_proxy_writes_as_request_iterator"
    )


class AioStreamStreamInterceptor(InterceptorBase, grpc.aio.StreamStreamClientInterceptor):  # type: ignore[type-arg]
    """Retries the setup of bidirectional streams, replaying the requests sent so far.

    Calls that use ``call.write()`` instead of a request iterator get the auth header and the
    breaker check, but no setup retry: their writes flow only once this interceptor returns,
    so waiting for a first response here would hold the first write back for the whole
    ``stream_setup`` window.
    """

    async def intercept_stream_stream(
        self,
        continuation: Callable[[grpc.aio.ClientCallDetails, Any], Any],
        client_call_details: grpc.aio.ClientCallDetails,
        request_iterator: Any,
    ) -> Any:
        core = self.core
        auth = core.auth
        if _written_by_the_caller(request_iterator):
            core.fail_fast(client_call_details.method)
            details = _details(client_call_details, client_call_details.timeout, auth)
            return await continuation(details, request_iterator)
        stream = StreamCall(core, client_call_details)
        replay = _AsyncReplay(request_iterator)

        async def attempt(_: float) -> tuple[Any, Any]:
            details = _details(client_call_details, stream.attempt_timeout(), auth)
            return await _establish(await continuation(details, replay.fresh()), stream.setup)

        iterator, first = await call_async(stream.state, stream.given, attempt, stream.classify)
        replay.established()
        return _rest(iterator, first)


class AioStreamUnaryInterceptor(InterceptorBase, grpc.aio.StreamUnaryClientInterceptor):  # type: ignore[type-arg]
    """Client-streaming calls: auth, default deadline and breaker check (no replay)."""

    async def intercept_stream_unary(
        self,
        continuation: Callable[[grpc.aio.ClientCallDetails, Any], Any],
        client_call_details: grpc.aio.ClientCallDetails,
        request_iterator: Any,
    ) -> Any:
        state = self.core.fail_fast(client_call_details.method)
        timeout = client_call_details.timeout
        details = _details(
            client_call_details, state.timeout if timeout is None else timeout, self.core.auth
        )
        return await continuation(details, request_iterator)


class _UnaryCall:
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

    def __init__(self, callable_: _UnaryUnaryMultiCallable, request: Any, kw: dict[str, Any]):
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
        raw = self._callable.raw

        async def attempt(attempt_timeout: float) -> Any:
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
            return getattr(self._error, "code", lambda: grpc.StatusCode.UNKNOWN)()  # type: ignore[no-any-return]
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


# Least time an attempt without a per-attempt cap must have had for its timeout to count
# against the replica (outlier ejection).
MIN_HUNG_TIMEOUT = 0.1


class _PooledUnaryCall(_UnaryCall):
    """A unary call whose every attempt goes to the replica the outlier detector picks."""

    __slots__ = ()

    def _attempt_fn(self, request: Any, kw: dict[str, Any]) -> Callable[[float], Any]:
        mc = self._callable
        raws = mc.raws
        detector = mc.detector
        assert detector is not None  # a pooled call exists only with a detector
        state = mc.state
        cap = state.attempt_timeout
        idempotent = state.idempotent
        failed = [-1]  # the replica the previous attempt failed on: a retry avoids it

        async def attempt(attempt_timeout: float) -> Any:
            i = detector.pick(failed[0])
            call = raws[i](request, timeout=attempt_timeout, **kw)
            self._last = call
            try:
                result = await call
            except Exception as exc:
                # A timeout says the replica hung when the attempt was capped by its per-attempt
                # timeout (the engine passes exactly the cap then), or, for an idempotent
                # method (a read: it answers by itself), when it had ample time: at least
                # MIN_HUNG_TIMEOUT and 10x the method's usual latency. A caller's own tiny
                # deadline, or a write waiting on something downstream, says nothing.
                outcome = outlier_outcome(
                    exc,
                    attempt_timeout == cap
                    or (
                        idempotent
                        and attempt_timeout >= max(MIN_HUNG_TIMEOUT, 10 * state.latency_ema)
                    ),
                )
                if outcome == OUTCOME_SUCCESS:
                    detector.success(i)
                elif outcome == OUTCOME_NEUTRAL:
                    detector.release(i)
                else:
                    failed[0] = i
                    detector.failure(i, outcome)
                    if detector.replicas[i].state is EJECTED:
                        with contextlib.suppress(AttributeError):
                            setattr(exc, EJECTED_REPLICA_ATTR, True)
                self._attempt_failed()
                raise
            except BaseException:
                detector.release(i)
                self._attempt_failed()
                raise
            detector.success(i)
            return result

        return attempt


class _UnaryUnaryMultiCallable:
    """``stub.Method`` on a ``ResilientChannel``: the policy without grpc's interceptor task."""

    __slots__ = ("classify", "core", "detector", "raw", "raws", "state")

    def __init__(
        self,
        raws: Sequence[Any],
        core: ClientCore,
        method: str | bytes,
        detector: OutlierDetector | None = None,
    ) -> None:
        self.raw = raws[0]
        self.raws = raws
        self.detector = detector
        self.core = core
        self.state, self.classify = core.method(method)

    def __call__(self, request: Any, **kw: Any) -> _UnaryCall:
        if self.detector is None:
            return _UnaryCall(self, request, kw)
        return _PooledUnaryCall(self, request, kw)


class _StreamOutcome(grpc.RpcError):
    """The final status of a stream, shaped like an RPC error for ``outlier_outcome``."""

    def __init__(self, code: grpc.StatusCode, details: str | None) -> None:
        self._code = code
        self._details = details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str | None:
        return self._details


async def _report_stream_end(detector: OutlierDetector, i: int, call: Any) -> None:
    # Only a broken connection (a dead or unreachable replica) says something here: streams
    # end for many legitimate reasons (cancelled, server closed them, domain errors).
    try:
        code = await call.code()
        details = await call.details()
    except Exception:
        return
    if code != grpc.StatusCode.UNAVAILABLE:
        return
    outcome = outlier_outcome(_StreamOutcome(code, details), False)
    if outcome == OUTCOME_LOCAL:
        detector.stream_failed(i, outcome)


class _PooledMultiCallable:
    """A streaming multicallable over replicas: each new stream goes to a picked replica.

    A stream lives long, so its pick is released at once; when it later ends because the
    connection to its replica broke (the replica died or is unreachable), that counts against
    the replica like a failed attempt, so reconnecting streams stop picking a dead replica
    after a few failures instead of alternating with it until keepalive notices.
    """

    __slots__ = ("detector", "raws")

    def __init__(self, raws: Sequence[Any], detector: OutlierDetector) -> None:
        self.raws = raws
        self.detector = detector

    def __call__(self, *args: Any, **kw: Any) -> Any:
        detector = self.detector
        i = detector.pick()
        detector.release(i)
        call = self.raws[i](*args, **kw)
        add_done = getattr(call, "add_done_callback", None)
        if add_done is not None:
            tasks: set[asyncio.Task[None]] = _STREAM_REPORTS

            def on_done(done_call: Any) -> None:
                task = asyncio.ensure_future(_report_stream_end(detector, i, done_call))
                tasks.add(task)
                task.add_done_callback(tasks.discard)

            with contextlib.suppress(Exception):
                add_done(on_done)
        return call


# Strong references to the status checks of ended streams until they finish.
_STREAM_REPORTS: set[asyncio.Task[None]] = set()


class ResilientChannel(grpc.aio.Channel):
    """The channel ``aio_channel`` returns: unary-unary calls run the policy directly.

    grpc.aio's interceptor machinery wraps every call in an extra task and call object, which
    costs tens of microseconds per call (see the benchmark's no-op interceptor row). Unary
    calls therefore run through the engine here; streaming calls go through the stream
    interceptors of the underlying channel. Everything else is the underlying channel's.
    """

    def __init__(
        self,
        raw: grpc.aio.Channel,
        core: ClientCore,
        *,
        replicas: Sequence[grpc.aio.Channel] = (),
        detector: OutlierDetector | None = None,
    ) -> None:
        self._raw: Any = raw  # typed loosely: grpc-stubs lacks _registered_method
        self._raws: tuple[Any, ...] = tuple(replicas) or (raw,)
        self.core = core
        # Set when the channel picks the replica of each attempt itself (outlier ejection).
        self.detector = detector

    async def __aenter__(self) -> ResilientChannel:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close(None)

    async def close(self, grace: float | None = None) -> None:
        """Close the underlying channel(s) (``grace``: let calls in flight finish)."""
        await asyncio.gather(*(raw.close(grace) for raw in self._raws))

    def get_state(self, try_to_connect: bool = False) -> grpc.ChannelConnectivity:
        """Connectivity state: the best state of the replica channels."""
        states = [raw.get_state(try_to_connect) for raw in self._raws]
        for candidate in _STATE_ORDER:
            if candidate in states:
                return candidate
        best: grpc.ChannelConnectivity = states[0]
        return best

    async def wait_for_state_change(self, last_observed_state: grpc.ChannelConnectivity) -> None:
        """Wait until the connectivity state (``get_state``) differs from the one observed.

        With several replicas that state is the best of theirs, read again whenever one of
        them changes; a change that happened before this call returns at once.
        """
        if len(self._raws) == 1:
            await self._raw.wait_for_state_change(last_observed_state)
            return
        while self.get_state(False) == last_observed_state:
            live = [raw for raw in self._raws if raw.get_state(False) != _SHUTDOWN]
            if not live:
                return  # every replica channel is closed: nothing will change any more
            await _first_of(raw.wait_for_state_change(raw.get_state(False)) for raw in live)

    async def channel_ready(self) -> None:
        """Wait until the channel (with several replicas: any one of them) is READY."""
        if len(self._raws) == 1:
            await self._raw.channel_ready()
            return
        await _first_of(raw.channel_ready() for raw in self._raws)

    # The multicallable factories take grpc's arguments (serializers, ``_registered_method``)
    # as they come and hand them to every replica channel unchanged.

    def unary_unary(self, method: str, *args: Any, **kwargs: Any) -> Any:
        """A multicallable that runs the policy around every call."""
        raws = self._per_replica("unary_unary", method, args, kwargs)
        return _UnaryUnaryMultiCallable(raws, self.core, method, self.detector)

    def unary_stream(self, method: str, *args: Any, **kwargs: Any) -> Any:
        """Server-streaming multicallable (setup retries by interceptor)."""
        return self._streaming("unary_stream", method, args, kwargs)

    def stream_unary(self, method: str, *args: Any, **kwargs: Any) -> Any:
        """Client-streaming multicallable (auth, deadline, breaker check by interceptor)."""
        return self._streaming("stream_unary", method, args, kwargs)

    def stream_stream(self, method: str, *args: Any, **kwargs: Any) -> Any:
        """Bidirectional multicallable (setup retries with replay by interceptor)."""
        return self._streaming("stream_stream", method, args, kwargs)

    def _per_replica(
        self, kind: str, method: str, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> list[Any]:
        return [getattr(raw, kind)(method, *args, **kwargs) for raw in self._raws]

    def _streaming(
        self, kind: str, method: str, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        raws = self._per_replica(kind, method, args, kwargs)
        if self.detector is None:
            return raws[0]
        return _PooledMultiCallable(raws, self.detector)


_SHUTDOWN = grpc.ChannelConnectivity.SHUTDOWN

# Best first: what get_state reports for a channel over several replicas.
_STATE_ORDER = (
    grpc.ChannelConnectivity.READY,
    grpc.ChannelConnectivity.CONNECTING,
    grpc.ChannelConnectivity.IDLE,
    grpc.ChannelConnectivity.TRANSIENT_FAILURE,
    grpc.ChannelConnectivity.SHUTDOWN,
)


async def _first_of(awaitables: Iterable[Any]) -> None:
    """Wait for the first of ``awaitables`` to finish; cancel the others."""
    tasks = [asyncio.ensure_future(a) for a in awaitables]
    if not tasks:
        return
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
    for task in done:
        task.result()


def aio_stream_interceptors(core: ClientCore) -> list[Any]:
    """The streaming interceptors (``ResilientChannel`` runs unary-unary calls itself)."""
    return [
        AioUnaryStreamInterceptor(core),
        AioStreamStreamInterceptor(core),
        AioStreamUnaryInterceptor(core),
    ]


def aio_interceptors(core: ClientCore) -> list[Any]:
    """Every interceptor, for an asyncio channel that grpc builds (not ``aio_channel``)."""
    return [AioUnaryUnaryInterceptor(core), *aio_stream_interceptors(core)]


def aio_channel(
    targets: str | Sequence[str],
    policy: Policy | None = None,
    *,
    token: str | None = None,
    runtime: Runtime | None = None,
    options: Iterable[tuple[str, Any]] = (),
    interceptors: Sequence[grpc.aio.ClientInterceptor] = (),
    credentials: grpc.ChannelCredentials | None = None,
) -> grpc.aio.Channel:
    """An asyncio channel to one service (one or several replica addresses) with the policy.

    ``targets``: "127.0.0.1:5001", "a:1,b:2" or a list of replica addresses. With several
    addresses and ``policy.outlier.enabled`` (the default) each replica gets its own
    connection and every attempt goes to a replica picked by outlier detection (round robin
    over the healthy ones, retries on another replica, hung or failing replicas ejected);
    otherwise grpc's round robin balances them. ``token`` adds ``authorization: Bearer
    <token>`` to every call. ``runtime`` shares budgets/breakers (and injects clock, random
    source, instrumentation). Extra
    ``interceptors`` run inside ours (once per attempt). Call ``await channel.close()``.
    """
    resolved = resolve_targets(targets)
    core = ClientCore(policy, runtime, resolved.name, token)
    # Unary-unary calls are driven by ResilientChannel itself; the stream interceptors ride on
    # the underlying channel, and user interceptors run inside ours (once per attempt).
    chain: list[Any] = [*aio_stream_interceptors(core), *interceptors]
    extra = list(options)

    def open_channel(target: ResolvedTarget) -> grpc.aio.Channel:
        opts = channel_options(target, extra)
        if credentials is not None:
            return grpc.aio.secure_channel(target.target, credentials, opts, interceptors=chain)
        return grpc.aio.insecure_channel(target.target, opts, interceptors=chain)

    if not (resolved.multi and core.policy.outlier.enabled):
        return ResilientChannel(open_channel(resolved), core)
    # One connection per replica, so that pkg.clients (not grpc's round robin, which keeps
    # sending every other call to a paused replica) chooses the replica of every attempt.
    raws = [open_channel(ResolvedTarget(r, False, r)) for r in resolved.replicas]
    detector = OutlierDetector(
        resolved.name,
        [r.split(":", 1)[1] for r in resolved.replicas],
        core.policy.outlier,
        core.runtime.clock,
        core.runtime.emit_outlier,
    )
    instruments().detectors.add(detector)
    return ResilientChannel(raws[0], core, replicas=raws, detector=detector)
