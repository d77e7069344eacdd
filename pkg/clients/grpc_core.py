"""What the sync and asyncio gRPC channels share: per-method state, stream setup, options."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pkg.clients.breaker import BreakerOpenError
from pkg.clients.classify import classify_grpc
from pkg.clients.engine import Classifier
from pkg.clients.policy import KeepalivePolicy, Policy
from pkg.clients.runtime import MethodState, Runtime
from pkg.clients.settings import ClientSettings
from pkg.clients.targets import ResolvedTarget


def keepalive_options(keepalive: KeepalivePolicy) -> tuple[tuple[str, Any], ...]:
    """The keepalive channel arguments of ``keepalive`` (see ``KeepalivePolicy`` for why the
    defaults are what a grpc server with default settings accepts)."""
    return (
        ("grpc.keepalive_time_ms", int(keepalive.time * 1000)),
        ("grpc.keepalive_timeout_ms", int(keepalive.timeout * 1000)),
        ("grpc.keepalive_permit_without_calls", 1 if keepalive.without_calls else 0),
        # No cap on pings between data frames: a quiet stream is kept alive by pings alone
        # (the server's own rule is the interval, which ``time`` respects).
        ("grpc.http2.max_pings_without_data", 0),
    )


# One retry layer only: grpcio's transparent and service-config retries are off.
NO_GRPC_RETRIES: tuple[tuple[str, Any], ...] = (("grpc.enable_retries", 0),)

# A replica that restarts is reconnected within ~2 s instead of grpc's default of up to 120 s.
RECONNECT_OPTIONS: tuple[tuple[str, Any], ...] = (
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.min_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 2_000),
)


def channel_options(
    resolved: ResolvedTarget,
    extra: Sequence[tuple[str, Any]] = (),
    keepalive: KeepalivePolicy | None = None,
) -> list[tuple[str, Any]]:
    """The channel arguments every pkg.clients channel uses (``extra`` wins on conflicts)."""
    options: dict[str, Any] = dict(
        (
            *NO_GRPC_RETRIES,
            *keepalive_options(keepalive or KeepalivePolicy()),
            *RECONNECT_OPTIONS,
        )
    )
    if resolved.multi or resolved.target.startswith("dns:"):
        # A name may resolve to several replicas (a headless Service): spread over all of
        # them, where grpc's default (pick_first) would send everything to the first.
        options["grpc.lb_policy_name"] = "round_robin"
    for key, value in extra:
        if key == "grpc.enable_retries" and value:
            raise ValueError("grpc.enable_retries must stay 0: pkg.clients is the retry layer")
        options[key] = value
    return list(options.items())


class ClientCore(ClientSettings):
    """Per-channel state of the interceptors: policy, runtime, target name and auth header.

    ``policy``/``runtime``/``token`` are checked by ``ClientSettings`` (None: the defaults).
    ``budget_target``: whose retry budget the calls spend (default: ``target``'s own).
    """

    def __init__(
        self,
        policy: Policy | None,
        runtime: Runtime | None,
        target: str,
        token: str | None,
        budget_target: str | None = None,
    ) -> None:
        super().__init__(policy, runtime, token)
        self.target = target
        self.budget_target = budget_target
        self.auth: tuple[tuple[str, str], ...] = (
            (("authorization", f"Bearer {self.token}"),) if self.token else ()
        )
        self._methods: dict[Any, tuple[MethodState, Classifier]] = {}

    def method(self, method: str | bytes) -> tuple[MethodState, Classifier]:
        """The state and classifier of ``method`` (cached by the method object grpc passes)."""
        found = self._methods.get(method)
        if found is None:
            name = method.decode() if isinstance(method, bytes) else method
            state = self.runtime.method(self.policy, self.target, name, self.budget_target)
            found = (state, _classifier(state))
            self._methods[method] = found
        return found

    def fail_fast(self, method: str | bytes) -> MethodState:
        """For calls the policy does not retry: ``BreakerOpenError`` while the breaker is open.

        Client-streaming calls and bidirectional calls written with ``call.write()`` cannot be
        replayed, so they get no retries and take no probe slot, but an open breaker still
        keeps them from reaching a callee known to be down.
        """
        state, _ = self.method(method)
        if state.breaker is not None:
            try:
                state.breaker.check(state.clock.monotonic())
            except BreakerOpenError as exc:
                self.runtime.emit_rejected(exc.name, exc.retry_after)
                raise
        return state

    def client_streaming_timeout(self, details: Any) -> float:
        """For a client-streaming call: ``fail_fast``, then its deadline, the call's own
        timeout or else the policy's (an upload is bounded, unlike a subscription)."""
        state = self.fail_fast(details.method)
        timeout: float = state.timeout if details.timeout is None else details.timeout
        return timeout


class StreamCall:
    """One streaming call whose setup the policy retries: its method state and its deadline.

    A setup attempt gets the time left on the call's own deadline, and no deadline when the
    call gives none: a long-lived subscription must not be cut by the unary ``policy.timeout``
    (which bounds only the setup retries, in the engine).
    """

    __slots__ = ("classify", "deadline", "given", "setup", "state")

    def __init__(self, core: ClientCore, details: Any) -> None:
        self.state, self.classify = core.method(details.method)
        self.given: float | None = details.timeout
        now: float = self.state.clock.monotonic()
        self.deadline: float | None = None if self.given is None else now + self.given
        # A stream counts as established at its first message or after this long alive.
        self.setup = core.policy.stream_setup

    def attempt_timeout(self) -> float | None:
        """The timeout of the next setup attempt: what is left of the call's deadline."""
        if self.deadline is None:
            return None
        return max(_MIN_STREAM_TIMEOUT, self.deadline - self.state.clock.monotonic())


# grpc rejects a timeout <= 0: a spent deadline still starts the attempt, which fails at once.
_MIN_STREAM_TIMEOUT = 0.001

# Marks the end of a stream where a message is expected (a stream may end before its first).
END_OF_STREAM = object()


class ChannelRef:
    """The grpc channel an interceptor rides on, known once the channel exists.

    Interceptors are built before their channel; the connection gate (``pkg.clients.connection``)
    needs the channel to ask whether a connection is READY before a non-idempotent stream is
    set up. None: unknown (a channel built elsewhere), so nothing is ever taken as not sent.
    """

    __slots__ = ("channel",)

    def __init__(self) -> None:
        self.channel: Any = None


class InterceptorBase:
    """What every pkg.clients interceptor (sync or asyncio) holds: its channel's core, and a
    reference to the channel it rides on."""

    def __init__(self, core: ClientCore, ref: ChannelRef | None = None) -> None:
        self.core = core
        self.ref = ref or ChannelRef()

    def _gate(self, stream: StreamCall) -> Any:
        """The channel whose readiness a setup attempt of ``stream`` must wait for: set for
        methods that are not idempotent (their setup is retried only if it was not sent)."""
        return None if stream.state.idempotent else self.ref.channel


def _classifier(state: MethodState) -> Classifier:
    idempotent = state.idempotent
    codes = state.policy.breaker.failure_codes

    def classify(exc: BaseException, capped: bool, left: float) -> Any:
        return classify_grpc(
            exc, idempotent=idempotent, attempt_capped=capped, time_left=left, failure_codes=codes
        )

    return classify
