"""The ``aio_channel`` factory and the ``ResilientChannel`` it returns.

Unary-unary calls run through the engine in the channel itself (``grpc_aio_calls``); streaming
calls go through the interceptors of ``grpc_aio_interceptors`` on the underlying channel(s).
With several replica addresses and outlier ejection on, each replica gets its own connection
and pkg.clients picks the replica of every attempt.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Sequence
from typing import Any

import grpc
import grpc.aio

from pkg.clients import tracing
from pkg.clients.grpc_aio_calls import PooledStreamMultiCallable, UnaryUnaryMultiCallable
from pkg.clients.grpc_aio_interceptors import aio_stream_interceptors
from pkg.clients.grpc_core import ChannelRef, ClientCore, channel_options
from pkg.clients.outlier import OutlierDetector
from pkg.clients.policy import Policy
from pkg.clients.runtime import Runtime
from pkg.clients.targets import ResolvedTarget, resolve_targets


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
        return UnaryUnaryMultiCallable(raws, self.core, method, self.detector, self._raws)

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
        return PooledStreamMultiCallable(raws, self.detector, self._raws)


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
    <token>`` to every call. ``runtime`` holds budgets, breakers and outlier state per target
    and injects clock, random source, instrumentation (default: the process-wide
    ``default_runtime()``). Extra ``interceptors`` run inside ours (once per attempt).
    A bad target, policy, runtime, token or option raises ``ValueError`` here, not at call
    time. Call ``await channel.close()``.
    """
    resolved = resolve_targets(targets)
    core = ClientCore(policy, runtime, resolved.name, token)
    extra = list(options)

    def open_channel(target: ResolvedTarget) -> grpc.aio.Channel:
        # Unary-unary calls are driven by ResilientChannel itself; the stream interceptors
        # ride on the underlying channel (each knows its channel, for the connection gate),
        # and user interceptors run inside ours (once per attempt).
        # With tracing on, the innermost interceptors make a span per attempt and send its
        # context.
        ref = ChannelRef()
        chain: list[Any] = [
            *aio_stream_interceptors(core, ref),
            *interceptors,
            *tracing.aio_interceptors(),
        ]
        opts = channel_options(target, extra, core.policy.keepalive)
        if credentials is not None:
            channel = grpc.aio.secure_channel(target.target, credentials, opts, interceptors=chain)
        else:
            channel = grpc.aio.insecure_channel(target.target, opts, interceptors=chain)
        ref.channel = channel
        return channel

    if not (resolved.multi and core.policy.outlier.enabled):
        return ResilientChannel(open_channel(resolved), core)
    # One connection per replica, so that pkg.clients (not grpc's round robin, which keeps
    # sending every other call to a paused replica) chooses the replica of every attempt.
    raws = [open_channel(ResolvedTarget(r, False, r)) for r in resolved.replicas]
    # The runtime keeps one detector per target: every channel to the same replicas shares
    # what is known about them (a replica ejected by one is skipped by all).
    detector = core.runtime.detector(
        resolved.name, [r.split(":", 1)[1] for r in resolved.replicas], core.policy.outlier
    )
    return ResilientChannel(raws[0], core, replicas=raws, detector=detector)
