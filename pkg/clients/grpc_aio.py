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
from pkg.clients.discovery import dynamic_targets
from pkg.clients.grpc_aio_calls import (
    PooledStreamMultiCallable,
    PooledUnaryUnaryMultiCallable,
    UnaryUnaryMultiCallable,
)
from pkg.clients.grpc_aio_interceptors import aio_stream_interceptors
from pkg.clients.grpc_core import ChannelRef, ClientCore, channel_options
from pkg.clients.outlier import OutlierDetector
from pkg.clients.policy import Policy, per_replica_breakers
from pkg.clients.replicas import ReplicaPool
from pkg.clients.runtime import Runtime
from pkg.clients.targets import ResolvedTarget, TargetList, grpc_target, resolve_targets


class ResilientChannel(grpc.aio.Channel):
    """The channel ``aio_channel`` returns: unary-unary calls run the policy directly.

    grpc.aio's interceptor machinery wraps every call in an extra task and call object, which
    costs tens of microseconds per call (see the benchmark's no-op interceptor row). Unary
    calls therefore run through the engine here; streaming calls go through the stream
    interceptors of the underlying channel. Everything else is the underlying channel's.
    Over several replicas (``pool``) each replica has its own grpc channel, and every attempt
    or new stream goes to the replica the outlier detector picks.
    """

    def __init__(
        self,
        raw: grpc.aio.Channel | None,
        core: ClientCore,
        *,
        pool: ReplicaPool | None = None,
    ) -> None:
        self._raw: Any = raw  # typed loosely: grpc-stubs lacks _registered_method
        self.core = core
        self.pool = pool
        # Set when the channel picks the replica of each attempt itself (outlier ejection).
        self.detector: OutlierDetector | None = None if pool is None else pool.detector

    @property
    def _raws(self) -> tuple[Any, ...]:
        if self.pool is None:
            return (self._raw,)
        return tuple(self.pool.channels.values())

    async def __aenter__(self) -> ResilientChannel:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close(None)

    async def close(self, grace: float | None = None) -> None:
        """Close the underlying channel(s) (``grace``: let calls in flight finish)."""
        if self.pool is not None:
            await self.pool.close(grace)
        else:
            await self._raw.close(grace)

    def get_state(self, try_to_connect: bool = False) -> grpc.ChannelConnectivity:
        """Connectivity state: the best state of the replica channels."""
        states = [raw.get_state(try_to_connect) for raw in self._raws]
        for candidate in _STATE_ORDER:
            if candidate in states:
                return candidate
        return _SHUTDOWN if self.pool is not None and self.pool.closed else _IDLE

    async def wait_for_state_change(self, last_observed_state: grpc.ChannelConnectivity) -> None:
        """Wait until the connectivity state (``get_state``) differs from the one observed.

        With several replicas that state is the best of theirs, read again whenever one of
        them changes; a change that happened before this call returns at once.
        """
        if self.pool is None:
            await self._raw.wait_for_state_change(last_observed_state)
            return
        while self.get_state(False) == last_observed_state:
            live = [raw for raw in self._raws if raw.get_state(False) != _SHUTDOWN]
            if not live:
                return  # every replica channel is closed: nothing will change any more
            await _first_of(raw.wait_for_state_change(raw.get_state(False)) for raw in live)

    async def channel_ready(self) -> None:
        """Wait until the channel (with several replicas: any one of them) is READY."""
        if self.pool is None:
            await self._raw.channel_ready()
            return
        await _first_of(raw.channel_ready() for raw in self._raws)

    # The multicallable factories take grpc's arguments (serializers, ``_registered_method``)
    # as they come and hand them to every replica channel unchanged.

    def unary_unary(self, method: str, *args: Any, **kwargs: Any) -> Any:
        """A multicallable that runs the policy around every call."""
        if self.pool is not None:
            return PooledUnaryUnaryMultiCallable(self.pool, self.core, method, args, kwargs)
        raw = self._raw.unary_unary(method, *args, **kwargs)
        return UnaryUnaryMultiCallable([raw], self.core, method, (self._raw,))

    def unary_stream(self, method: str, *args: Any, **kwargs: Any) -> Any:
        """Server-streaming multicallable (setup retries by interceptor)."""
        return self._streaming("unary_stream", method, args, kwargs)

    def stream_unary(self, method: str, *args: Any, **kwargs: Any) -> Any:
        """Client-streaming multicallable (auth, deadline, breaker check by interceptor)."""
        return self._streaming("stream_unary", method, args, kwargs)

    def stream_stream(self, method: str, *args: Any, **kwargs: Any) -> Any:
        """Bidirectional multicallable (setup retries with replay by interceptor)."""
        return self._streaming("stream_stream", method, args, kwargs)

    def _streaming(
        self, kind: str, method: str, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        if self.pool is None:
            return getattr(self._raw, kind)(method, *args, **kwargs)
        return PooledStreamMultiCallable(self.pool, kind, method, args, kwargs)


_SHUTDOWN = grpc.ChannelConnectivity.SHUTDOWN
_IDLE = grpc.ChannelConnectivity.IDLE

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
    targets: str | Sequence[str] | TargetList,
    policy: Policy | None = None,
    *,
    token: str | None = None,
    runtime: Runtime | None = None,
    options: Iterable[tuple[str, Any]] = (),
    interceptors: Sequence[grpc.aio.ClientInterceptor] = (),
    credentials: grpc.ChannelCredentials | None = None,
) -> grpc.aio.Channel:
    """An asyncio channel to one service (one or several replica addresses) with the policy.

    ``targets``: "127.0.0.1:5001", "a:1,b:2", a list of replica addresses, or a replica set
    that may change while the channel is in use: a ``TargetList`` (fed by the caller),
    "dns:///name:port" (re-resolved in the background and after failures) or "file:/path"
    (a watched file of addresses, ``pkg.clients.discovery``). With several
    addresses and ``policy.outlier.enabled`` (the default), and always for a
    ``TargetList``, each replica gets its own connection and circuit breaker, and every
    attempt goes to a replica picked by outlier detection (round robin over the healthy
    ones, retries on another replica, hung or failing replicas ejected and health-checked
    back into rotation); otherwise grpc's round robin balances them. ``token`` adds
    ``authorization: Bearer <token>`` to every call. ``runtime`` holds budgets, breakers
    and outlier state per target and injects clock, random source, instrumentation (default:
    the process-wide ``default_runtime()``). Extra ``interceptors`` run inside ours (once per
    attempt). A bad target, policy, runtime, token or option raises ``ValueError`` here, not
    at call time. Call ``await channel.close()``.
    """
    target_list = None
    if isinstance(targets, TargetList) or (
        not isinstance(policy, Policy) or policy.outlier.enabled
    ):
        target_list = dynamic_targets(targets)
    resolved = None if target_list is not None else resolve_targets(targets)  # type: ignore[arg-type]
    name = target_list.name if target_list is not None else resolved.name  # type: ignore[union-attr]
    core = ClientCore(policy, runtime, name, token)
    extra = list(options)

    def open_channel(
        target: ResolvedTarget, channel_core: ClientCore, own: Sequence[tuple[str, Any]] = ()
    ) -> grpc.aio.Channel:
        # Unary-unary calls are driven by ResilientChannel itself; the stream interceptors
        # ride on the underlying channel (each knows its channel, for the connection gate),
        # and user interceptors run inside ours (once per attempt).
        # With tracing on, the innermost interceptors make a span per attempt and send its
        # context.
        ref = ChannelRef()
        chain: list[Any] = [
            *aio_stream_interceptors(channel_core, ref),
            *interceptors,
            *tracing.aio_interceptors(),
        ]
        opts = channel_options(target, [*own, *extra], core.policy.keepalive)
        if credentials is not None:
            channel = grpc.aio.secure_channel(target.target, credentials, opts, interceptors=chain)
        else:
            channel = grpc.aio.insecure_channel(target.target, opts, interceptors=chain)
        ref.channel = channel
        return channel

    if resolved is not None and not (resolved.multi and core.policy.outlier.enabled):
        return ResilientChannel(open_channel(resolved, core), core)
    # One connection per replica, so that pkg.clients (not grpc's round robin, which keeps
    # sending every other call to a paused replica) chooses the replica of every attempt.
    dynamic = target_list is not None
    if target_list is None:
        assert resolved is not None
        target_list = TargetList([r.split(":", 1)[1] for r in resolved.replicas], name=name)
    # The runtime keeps one detector per target: every channel to the same replicas shares
    # what is known about them (a replica ejected by one is skipped by all).
    detector = core.runtime.detector(
        name, target_list.addresses, core.policy.outlier, dynamic=dynamic
    )
    if dynamic:
        if detector.addresses != list(target_list.addresses):
            detector.set_addresses(target_list.addresses)
        target_list.subscribe(detector.set_addresses)

    def open_replica(address: str) -> grpc.aio.Channel:
        # Each replica's streams have that replica's own breaker, and spend the service's
        # retry budget.
        replica_core = ClientCore(core.policy, core.runtime, address, token, budget_target=name)
        return open_channel(
            ResolvedTarget(grpc_target(address), False, address), replica_core, reconnect
        )

    # A replica that comes back is reconnected (and health-checked back into rotation) within
    # about one health-check interval: the others carry the calls meanwhile, so trying its
    # port that often costs nothing.
    outlier = core.policy.outlier
    reconnect = (
        (("grpc.max_reconnect_backoff_ms", max(200, int(outlier.health_check_interval * 1000))),)
        if outlier.health_check
        else ()
    )

    # Unary calls take the breaker of the replica each attempt goes to (in the attempt), not
    # one breaker for the whole service: one dead replica must not fail calls the others
    # would answer.
    pooled = ClientCore(per_replica_breakers(core.policy), core.runtime, name, token)
    pool = ReplicaPool(target_list, detector, pooled, core.policy, open_replica)
    return ResilientChannel(None, pooled, pool=pool)
