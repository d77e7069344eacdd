"""grpc.aio interceptors: setup retries for streams, and the unary policy for plain channels.

Unary-stream and stream-stream calls retry only their setup: until the first response arrives
(or the stream has stayed alive for ``policy.stream_setup`` seconds). Once data has flowed a
stream error is the caller's to handle: re-sending could duplicate effects. ``aio_channel``
puts the stream interceptors on its channels and runs unary calls itself
(``pkg.clients.grpc_aio_calls``); ``aio_interceptors`` gives the whole policy to a channel
that grpc builds.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
import grpc.aio

from pkg.clients.connection import ensure_ready
from pkg.clients.engine import call_async
from pkg.clients.grpc_core import (
    END_OF_STREAM,
    ChannelRef,
    ClientCore,
    InterceptorBase,
    StreamCall,
)


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
        gate = self._gate(stream)

        async def attempt(_: float) -> tuple[Any, Any]:
            if gate is not None:  # within the stream's own deadline, if it has one
                await ensure_ready(gate, self.core.target, stream.attempt_timeout())
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
        gate = self._gate(stream)

        async def attempt(_: float) -> tuple[Any, Any]:
            if gate is not None:  # within the stream's own deadline, if it has one
                await ensure_ready(gate, core.target, stream.attempt_timeout())
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
        timeout = self.core.client_streaming_timeout(client_call_details)
        details = _details(client_call_details, timeout, self.core.auth)
        return await continuation(details, request_iterator)


def aio_stream_interceptors(core: ClientCore, ref: ChannelRef | None = None) -> list[Any]:
    """The streaming interceptors (``ResilientChannel`` runs unary-unary calls itself);
    ``ref`` names the channel they ride on (for the connection gate)."""
    return [
        AioUnaryStreamInterceptor(core, ref),
        AioStreamStreamInterceptor(core, ref),
        AioStreamUnaryInterceptor(core, ref),
    ]


def aio_interceptors(core: ClientCore) -> list[Any]:
    """Every interceptor, for an asyncio channel that grpc builds (not ``aio_channel``)."""
    return [AioUnaryUnaryInterceptor(core), *aio_stream_interceptors(core)]
