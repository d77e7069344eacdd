"""Sync grpc interceptors and the ``sync_channel`` factory (same policy as the asyncio ones).

Hedging needs concurrent attempts and is asyncio-only. Stream setup is retried like on asyncio
channels: a helper thread waits for the first message so that a stream that stays silent but
alive counts as established after ``policy.stream_setup`` seconds.
"""

from __future__ import annotations

import collections
import contextlib
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future
from typing import Any, NamedTuple

import grpc

from pkg.clients import tracing
from pkg.clients.connection import ensure_ready_sync
from pkg.clients.engine import call_sync
from pkg.clients.grpc_core import (
    END_OF_STREAM,
    ChannelRef,
    ClientCore,
    InterceptorBase,
    StreamCall,
    channel_options,
)
from pkg.clients.policy import Policy
from pkg.clients.runtime import Runtime
from pkg.clients.targets import resolve_targets


class _CallDetails(NamedTuple):
    method: str
    timeout: float | None
    metadata: Any
    credentials: Any
    wait_for_ready: bool | None
    compression: Any


class _Details(_CallDetails, grpc.ClientCallDetails):
    """grpc wants a ClientCallDetails instance; a namedtuple gives the fields."""


def _details(details: Any, timeout: float | None, auth: tuple[tuple[str, str], ...]) -> Any:
    metadata = details.metadata
    if auth:
        metadata = (*auth, *(metadata or ()))
    return _Details(
        details.method,
        timeout,
        metadata,
        details.credentials,
        getattr(details, "wait_for_ready", None),
        getattr(details, "compression", None),
    )


class SyncUnaryUnaryInterceptor(InterceptorBase, grpc.UnaryUnaryClientInterceptor):  # type: ignore[type-arg]
    """Deadline-first retries, budget and breaker for blocking unary calls."""

    def intercept_unary_unary(
        self, continuation: Callable[[Any, Any], Any], client_call_details: Any, request: Any
    ) -> Any:
        core = self.core
        state, classify = core.method(client_call_details.method)
        auth = core.auth
        gate = None if state.idempotent else self.ref.channel

        def attempt(timeout: float) -> Any:
            if gate is not None:
                timeout = _connected(gate, core.target, timeout)
            outcome = continuation(_details(client_call_details, timeout, auth), request)
            outcome.result()  # raises the attempt's RpcError
            return outcome

        return call_sync(state, client_call_details.timeout, attempt, classify)


class _StreamResult:
    """The call object returned for a sync stream: iterates first message then the rest."""

    def __init__(self, call: Any, first: Future[Any]) -> None:
        self._call = call
        self._first: Future[Any] | None = first

    def __iter__(self) -> Iterator[Any]:
        return self

    def __next__(self) -> Any:
        if self._first is not None:
            first, self._first = self._first, None
            message = first.result()
            if message is END_OF_STREAM:
                raise StopIteration
            return message
        return next(self._call)

    def __getattr__(self, name: str) -> Any:
        # cancel(), code(), details(), initial_metadata(), ... of the underlying call.
        return getattr(self._call, name)


def _establish(call: Any, setup: float) -> Future[Any]:
    """Wait for a stream's first message, its end, or ``setup`` seconds of it staying alive.

    A helper thread reads the first message (a blocking ``next`` cannot be given a timeout).
    Returns the future of that message; raises the call's error if it failed first.
    """
    first: Future[Any] = Future()

    def read_first() -> None:
        try:
            first.set_result(next(call, END_OF_STREAM))
        except BaseException as exc:
            first.set_exception(exc)

    threading.Thread(target=read_first, name="pkg-clients-stream-setup", daemon=True).start()
    with contextlib.suppress(TimeoutError):  # alive and silent: established
        first.result(timeout=setup)  # raises the setup failure for the engine to classify
    return first


class SyncUnaryStreamInterceptor(InterceptorBase, grpc.UnaryStreamClientInterceptor):  # type: ignore[type-arg]
    """Retries the setup of server-streaming calls, never after the first message."""

    def intercept_unary_stream(
        self, continuation: Callable[[Any, Any], Any], client_call_details: Any, request: Any
    ) -> Any:
        auth = self.core.auth
        stream = StreamCall(self.core, client_call_details)
        gate = self._gate(stream)

        def attempt(_: float) -> Any:
            if gate is not None:  # within the stream's own deadline, if it has one
                ensure_ready_sync(gate, self.core.target, stream.attempt_timeout())
            details = _details(client_call_details, stream.attempt_timeout(), auth)
            call = continuation(details, request)
            return _StreamResult(call, _establish(call, stream.setup))

        return call_sync(stream.state, stream.given, attempt, stream.classify)


class _SyncReplay:
    """Sync twin of the asyncio replay buffer (requests consumed before establishment)."""

    def __init__(self, source: Iterable[Any]) -> None:
        self._source = iter(source)
        self._lock = threading.Lock()
        self.buffer: collections.deque[Any] = collections.deque()
        self.recording = True

    def fresh(self) -> Iterator[Any]:
        """A new request iterator for one attempt."""
        yield from list(self.buffer)
        while True:
            with self._lock:
                message = next(self._source, END_OF_STREAM)
                if message is not END_OF_STREAM and self.recording:
                    self.buffer.append(message)
            if message is END_OF_STREAM:
                return
            yield message

    def established(self) -> None:
        """Stop buffering."""
        with self._lock:
            self.recording = False
            self.buffer.clear()


class SyncStreamStreamInterceptor(InterceptorBase, grpc.StreamStreamClientInterceptor):  # type: ignore[type-arg]
    """Retries the setup of bidirectional streams, replaying the requests sent so far."""

    def intercept_stream_stream(
        self,
        continuation: Callable[[Any, Any], Any],
        client_call_details: Any,
        request_iterator: Any,
    ) -> Any:
        auth = self.core.auth
        stream = StreamCall(self.core, client_call_details)
        replay = _SyncReplay(request_iterator)
        gate = self._gate(stream)

        def attempt(_: float) -> Any:
            if gate is not None:  # within the stream's own deadline, if it has one
                ensure_ready_sync(gate, self.core.target, stream.attempt_timeout())
            details = _details(client_call_details, stream.attempt_timeout(), auth)
            call = continuation(details, replay.fresh())
            return _StreamResult(call, _establish(call, stream.setup))

        result = call_sync(stream.state, stream.given, attempt, stream.classify)
        replay.established()
        return result


class SyncStreamUnaryInterceptor(InterceptorBase, grpc.StreamUnaryClientInterceptor):  # type: ignore[type-arg]
    """Client-streaming calls: auth, default deadline and breaker check (no replay)."""

    def intercept_stream_unary(
        self,
        continuation: Callable[[Any, Any], Any],
        client_call_details: Any,
        request_iterator: Any,
    ) -> Any:
        timeout = self.core.client_streaming_timeout(client_call_details)
        details = _details(client_call_details, timeout, self.core.auth)
        return continuation(details, request_iterator)


def sync_interceptors(core: ClientCore, ref: ChannelRef | None = None) -> list[Any]:
    """The interceptors of a blocking channel, in order (``ref``: the channel, for the gate)."""
    return [
        SyncUnaryUnaryInterceptor(core, ref),
        SyncUnaryStreamInterceptor(core, ref),
        SyncStreamStreamInterceptor(core, ref),
        SyncStreamUnaryInterceptor(core, ref),
    ]


def _connected(channel: Any, target: str, timeout: float) -> float:
    """Wait until ``channel`` is READY (else ``NotSentError``); the attempt time left."""
    start = time.monotonic()
    ensure_ready_sync(channel, target, timeout)
    return max(0.001, timeout - (time.monotonic() - start))


def sync_channel(
    targets: str | Sequence[str],
    policy: Policy | None = None,
    *,
    token: str | None = None,
    runtime: Runtime | None = None,
    options: Iterable[tuple[str, Any]] = (),
    interceptors: Sequence[Any] = (),
    credentials: grpc.ChannelCredentials | None = None,
) -> grpc.Channel:
    """A blocking channel with the policy (same arguments as ``aio_channel``).

    No hedging (it needs concurrent attempts) and no outlier ejection: several replica
    addresses are balanced by grpc's round robin (a retry takes the next in the rotation).
    """
    resolved = resolve_targets(targets)
    core = ClientCore(policy, runtime, resolved.name, token)
    opts = channel_options(resolved, list(options), core.policy.keepalive)
    if credentials is not None:
        raw = grpc.secure_channel(resolved.target, credentials, opts)
    else:
        raw = grpc.insecure_channel(resolved.target, opts)
    ref = ChannelRef()
    ref.channel = raw
    # With tracing on, the innermost interceptor makes a span per attempt and sends its context.
    return grpc.intercept_channel(
        raw, *sync_interceptors(core, ref), *interceptors, *tracing.sync_interceptors()
    )
