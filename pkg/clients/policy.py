"""The resilience policy: plain, immutable settings validated at construction.

A ``Policy`` says *what* a client does (deadline, retries, budget, breaker, hedging); the
runtime objects in ``runtime.py`` hold the mutable state per target. Every invalid setting
raises ``ValueError`` here, naming the field, so a bad configuration fails at start-up and
never at call time.
"""

from __future__ import annotations

import fnmatch
import functools
import math
from dataclasses import dataclass, field, replace

import grpc

from pkg.clients.contract import declared_safe

# The verbs of the old name-prefix guess (``GetNode`` -> idempotent). Not used unless a policy
# opts in with ``RetryPolicy(idempotent_verbs=NAME_PREFIX_VERBS)``: a name proves nothing
# (``GetOrCreateCart``, ``ListenAndCharge``); the method's contract (``idempotency_level`` in
# its .proto, see ``pkg.clients.contract``) or an explicit pattern does.
NAME_PREFIX_VERBS: tuple[str, ...] = (
    "Get",
    "List",
    "Read",
    "Watch",
    "Describe",
    "Check",
    "Lookup",
    "Resolve",
    "Route",
    "Find",
    "Search",
    "Query",
    "Echo",
    "Health",
    "Subscribe",
    "Stream",
)

# gRPC codes that say "the callee (or the path to it) is unhealthy": they drive the breaker.
# Domain errors (INVALID_ARGUMENT, NOT_FOUND, ...) prove the callee is alive and are ignored
# by the breaker (neither failure nor success).
DEFAULT_BREAKER_FAILURE_CODES: frozenset[grpc.StatusCode] = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.DATA_LOSS,
    }
)


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


def finite_number(value: float) -> bool:
    """Whether ``value`` is a finite int or float (a bool is a mistake here, not 0 or 1)."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _integer(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


_WILDCARDS = frozenset("*?[")


def check_method_patterns(patterns: object, field: str) -> None:
    """Method patterns: a tuple of fnmatch patterns on full method names ("/pkg.Svc/Method").

    A pattern without the leading ``/`` (``"testsvc.v1.TestService/*"``) or with a wrong shape
    (``"/testsvc.v1.TestService.Unary"``) would silently match nothing: ``ValueError`` naming
    the pattern instead.
    """
    _require(
        isinstance(patterns, tuple) and all(isinstance(p, str) and p for p in patterns),
        f"{field} must be a tuple of non-empty strings, got {patterns!r}",
    )
    assert isinstance(patterns, tuple)
    for pattern in patterns:
        bad = not pattern.startswith("/") or any(c.isspace() for c in pattern)
        if not bad and not _WILDCARDS.intersection(pattern):
            # A literal must be exactly "/<package.Service>/<Method>".
            service, sep, method = pattern[1:].partition("/")
            bad = not (sep and service and method and "/" not in method)
        _require(
            not bad,
            f"{field}: bad method pattern {pattern!r}: expected a full method name such as "
            "'/pkg.v1.Service/Method' or an fnmatch pattern starting with '/' "
            "('/pkg.v1.Service/*')",
        )


def _require_seconds(value: float, field: str) -> None:
    """A duration setting: a finite number of seconds > 0, else ``ValueError`` naming it."""
    _require(finite_number(value) and value > 0, f"{field} must be > 0 seconds, got {value!r}")


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """When and how often a failed attempt is retried.

    ``max_attempts`` counts the first attempt (1 disables retries). Backoff is exponential with
    full jitter: attempt n waits ``uniform(0, min(max_backoff, base_backoff * multiplier**(n-1)))``.
    ``attempt_timeout`` caps one attempt (None: an attempt may use all the time left); only a
    capped attempt that times out is retryable. ``attempt_timeouts`` sets the cap per method:
    ``(("/foghorn.v1.Routing/*", 0.3),)`` (fnmatch patterns, first match wins, methods that match
    none use ``attempt_timeout``), because a routing lookup should fail over in a fraction of a
    second while a command waiting for a node's ack legitimately takes seconds.
    ``min_attempt_time`` is the least time a retry must have left after its backoff to be worth
    starting.
    """

    max_attempts: int = 3
    base_backoff: float = 0.1
    max_backoff: float = 2.0
    multiplier: float = 2.0
    attempt_timeout: float | None = None
    attempt_timeouts: tuple[tuple[str, float], ...] = ()
    min_attempt_time: float = 0.02
    honour_pushback: bool = True
    idempotent_verbs: tuple[str, ...] = ()
    idempotent_methods: tuple[str, ...] = ()
    non_idempotent_methods: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        _require(
            _integer(self.max_attempts) and 1 <= self.max_attempts <= 10,
            f"retry.max_attempts must be an integer in 1..10, got {self.max_attempts!r}",
        )
        _require(
            finite_number(self.base_backoff) and self.base_backoff >= 0,
            f"retry.base_backoff must be a finite number >= 0, got {self.base_backoff!r}",
        )
        _require(
            finite_number(self.max_backoff) and self.max_backoff >= self.base_backoff,
            f"retry.max_backoff must be finite and >= base_backoff ({self.base_backoff}), "
            f"got {self.max_backoff!r}",
        )
        _require(
            finite_number(self.multiplier) and self.multiplier >= 1,
            f"retry.multiplier must be >= 1, got {self.multiplier!r}",
        )
        if self.attempt_timeout is not None:
            _require_seconds(self.attempt_timeout, "retry.attempt_timeout")
        _require(
            isinstance(self.attempt_timeouts, tuple)
            and all(
                isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str) and item[0]
                for item in self.attempt_timeouts
            ),
            "retry.attempt_timeouts must be a tuple of (method pattern, seconds) pairs, "
            f"got {self.attempt_timeouts!r}",
        )
        check_method_patterns(
            tuple(pattern for pattern, _ in self.attempt_timeouts), "retry.attempt_timeouts"
        )
        for pattern, seconds in self.attempt_timeouts:
            _require_seconds(seconds, f"retry.attempt_timeouts[{pattern!r}]")
        _require(
            finite_number(self.min_attempt_time) and self.min_attempt_time >= 0,
            f"retry.min_attempt_time must be >= 0, got {self.min_attempt_time!r}",
        )
        for name in ("idempotent_methods", "non_idempotent_methods"):
            check_method_patterns(getattr(self, name), f"retry.{name}")
        _require(
            isinstance(self.idempotent_verbs, tuple)
            and all(isinstance(v, str) and v and v.isidentifier() for v in self.idempotent_verbs),
            "retry.idempotent_verbs must be a tuple of method-name prefixes such as 'Get', "
            f"got {self.idempotent_verbs!r}",
        )

    def attempt_timeout_for(self, method: str) -> float | None:
        """The per-attempt timeout of ``method``: the first matching pattern, else the default."""
        for pattern, seconds in self.attempt_timeouts:
            if fnmatch.fnmatchcase(method, pattern):
                return float(seconds)
        return self.attempt_timeout

    def is_idempotent(self, method: str) -> bool:
        """Whether ``method`` ("/pkg.Service/Method") may be retried after it may have been sent.

        Order: an explicit ``non_idempotent_methods`` match wins, then ``idempotent_methods``
        (fnmatch patterns such as ``"/testsvc.v1.TestService/*"``), then the method's contract
        (``idempotency_level`` NO_SIDE_EFFECTS or IDEMPOTENT in its .proto, read from
        protobuf's default descriptor pool), then, only when a policy opts in, the verb prefix
        of the method name (``idempotent_verbs``). Anything else is not idempotent.
        """
        for pattern in self.non_idempotent_methods:
            if fnmatch.fnmatchcase(method, pattern):
                return False
        for pattern in self.idempotent_methods:
            if fnmatch.fnmatchcase(method, pattern):
                return True
        if declared_safe(method):
            return True
        if self.idempotent_verbs:
            name = method.rsplit("/", 1)[-1]
            return name.startswith(self.idempotent_verbs)
        return False


@dataclass(frozen=True, slots=True)
class BudgetPolicy:
    """Retry budget per target: a token bucket in the style of gRFC A6 retryThrottling.

    The bucket starts full at ``max_tokens``. Every failed attempt takes one token, every
    success gives back ``token_ratio``. Retries (and hedges) are allowed only while more than
    half the bucket is left, so under a total outage a caller sends at most about
    ``max_tokens / 2`` extra attempts, and in steady state at most ``token_ratio`` retries per
    success.
    """

    enabled: bool = True
    max_tokens: float = 10.0
    token_ratio: float = 0.1

    def __post_init__(self) -> None:
        _require(
            finite_number(self.max_tokens) and 1 <= self.max_tokens <= 1000,
            f"budget.max_tokens must be in 1..1000, got {self.max_tokens!r}",
        )
        _require(
            finite_number(self.token_ratio) and 0 < self.token_ratio <= 1,
            f"budget.token_ratio must be a ratio in (0, 1], got {self.token_ratio!r}",
        )


@dataclass(frozen=True, slots=True)
class BreakerPolicy:
    """Circuit breaker per target (and per method when ``per_method``).

    Opens when, within the last ``window`` seconds, at least ``min_calls`` outcomes were seen
    and the share of failures reached ``failure_ratio``. Stays open ``open_duration`` seconds,
    then lets exactly one probe through (half-open): success closes it, failure re-opens it.
    A probe that never reports (cancelled, crashed thread) frees its slot after
    ``probe_timeout`` seconds.

    Slow calls (resilience4j's slow-call rate): with ``slow_call_duration`` set, an attempt
    that took longer counts as slow (whether it succeeded or failed), and the breaker also
    opens when, with at least ``min_calls`` outcomes in the window, the share of slow ones
    reaches ``slow_call_ratio``. A callee that still answers, but ten times slower, ties up the
    caller's concurrency as surely as one that fails. A slow probe re-opens the breaker.
    """

    enabled: bool = True
    failure_ratio: float = 0.5
    min_calls: int = 20
    window: float = 10.0
    buckets: int = 10
    open_duration: float = 5.0
    probe_timeout: float = 30.0
    per_method: bool = False
    failure_codes: frozenset[grpc.StatusCode] = DEFAULT_BREAKER_FAILURE_CODES
    slow_call_duration: float | None = None
    slow_call_ratio: float = 0.5

    def __post_init__(self) -> None:
        _require(
            finite_number(self.failure_ratio) and 0 < self.failure_ratio <= 1,
            f"breaker.failure_ratio must be a ratio in (0, 1], got {self.failure_ratio!r}",
        )
        _require(
            _integer(self.min_calls) and self.min_calls >= 1,
            f"breaker.min_calls must be an integer >= 1, got {self.min_calls!r}",
        )
        _require_seconds(self.window, "breaker.window")
        _require(
            _integer(self.buckets) and 1 <= self.buckets <= 600,
            f"breaker.buckets must be an integer in 1..600, got {self.buckets!r}",
        )
        _require_seconds(self.open_duration, "breaker.open_duration")
        _require_seconds(self.probe_timeout, "breaker.probe_timeout")
        if self.slow_call_duration is not None:
            _require_seconds(self.slow_call_duration, "breaker.slow_call_duration")
        _require(
            finite_number(self.slow_call_ratio) and 0 < self.slow_call_ratio <= 1,
            f"breaker.slow_call_ratio must be a ratio in (0, 1], got {self.slow_call_ratio!r}",
        )


@dataclass(frozen=True, slots=True)
class HedgePolicy:
    """Hedging for idempotent unary calls on asyncio gRPC channels (``aio_channel``).

    When the first attempt has not answered after ``delay`` seconds, a second one is sent (up
    to ``max_attempts`` in flight, each ``delay`` apart); the first success wins and the others
    are cancelled. Every hedge costs one token of the retry budget.
    """

    enabled: bool = False
    delay: float = 0.05
    max_attempts: int = 2
    methods: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        _require(
            finite_number(self.delay) and self.delay >= 0,
            f"hedge.delay must be >= 0 seconds, got {self.delay!r}",
        )
        _require(
            _integer(self.max_attempts) and 2 <= self.max_attempts <= 5,
            f"hedge.max_attempts must be an integer in 2..5, got {self.max_attempts!r}",
        )
        check_method_patterns(self.methods, "hedge.methods")

    def applies_to(self, method: str) -> bool:
        """Whether hedging is on for ``method`` (any idempotent one if ``methods`` is empty)."""
        if not self.enabled:
            return False
        if not self.methods:
            return True
        return any(fnmatch.fnmatchcase(method, pattern) for pattern in self.methods)


@dataclass(frozen=True, slots=True)
class OutlierPolicy:
    """Outlier ejection for channels given several replica addresses (asyncio channels).

    Each replica gets its own connection and pkg.clients picks the replica of every attempt.
    ``consecutive_local_failures`` per-attempt timeouts or connection failures in a row (the
    replica did not answer), or ``consecutive_errors`` server errors in a row (UNAVAILABLE,
    INTERNAL, UNKNOWN, DATA_LOSS sent by the replica), eject it from the rotation for
    ``base_ejection_time * 2**(n-1)`` seconds at its n-th ejection in a row, capped at
    ``max_ejection_time``. At most ``max_ejection_percent`` of the replicas (rounded down) are
    ejected at once, so a two-replica fleet ejects at most one and a single replica never
    ejects itself. After its ejection one probe attempt goes through: success brings the
    replica back. ``enabled=False`` falls back to grpc's own round robin (no ejection).

    Re-admission is active: with ``health_check`` each channel asks an ejected replica (or one
    whose circuit breaker is open) for its gRPC health (``grpc.health.v1.Health/Check`` of
    ``health_service``, through that replica's own connection) every
    ``health_check_interval`` seconds, and returns it to rotation as soon as it answers
    SERVING (a server without the health service answers UNIMPLEMENTED: it is up, so that
    counts too). When every replica in rotation is failing, ejected replicas are tried as
    well (panic routing).
    """

    enabled: bool = True
    consecutive_local_failures: int = 2
    consecutive_errors: int = 5
    base_ejection_time: float = 2.0
    max_ejection_time: float = 30.0
    max_ejection_percent: int = 50
    health_check: bool = True
    health_check_interval: float = 0.5
    health_check_timeout: float = 1.0
    health_service: str = ""

    def __post_init__(self) -> None:
        _require(
            _integer(self.consecutive_local_failures)
            and 1 <= self.consecutive_local_failures <= 100,
            "outlier.consecutive_local_failures must be an integer in 1..100, "
            f"got {self.consecutive_local_failures!r}",
        )
        _require(
            _integer(self.consecutive_errors) and 1 <= self.consecutive_errors <= 100,
            f"outlier.consecutive_errors must be an integer in 1..100, "
            f"got {self.consecutive_errors!r}",
        )
        _require_seconds(self.base_ejection_time, "outlier.base_ejection_time")
        _require(
            finite_number(self.max_ejection_time)
            and self.max_ejection_time >= self.base_ejection_time,
            "outlier.max_ejection_time must be finite and >= base_ejection_time "
            f"({self.base_ejection_time}), got {self.max_ejection_time!r}",
        )
        _require(
            _integer(self.max_ejection_percent) and 0 <= self.max_ejection_percent <= 100,
            "outlier.max_ejection_percent must be an integer in 0..100, "
            f"got {self.max_ejection_percent!r}",
        )
        _require(
            isinstance(self.health_check, bool),
            f"outlier.health_check must be True or False, got {self.health_check!r}",
        )
        _require_seconds(self.health_check_interval, "outlier.health_check_interval")
        _require_seconds(self.health_check_timeout, "outlier.health_check_timeout")
        _require(
            isinstance(self.health_service, str),
            f"outlier.health_service must be a string, got {self.health_service!r}",
        )


@dataclass(frozen=True, slots=True)
class LimiterPolicy:
    """Adaptive concurrency limit per target (``pkg.clients.limiter``), off unless enabled.

    The limit starts at ``initial_limit`` and moves within ``min_limit``..``max_limit``,
    updated once per window (one round of the calls in flight): it grows while fewer than
    ``alpha * log10(limit)`` calls seem to queue at the callee, shrinks back towards what the
    callee serves without queueing above ``beta * log10(limit)`` (log10 taken as at least 1),
    and shrinks by 10% of the calls in flight, once per window, when the callee sheds a call
    (RESOURCE_EXHAUSTED) or one times out. A call over the limit waits up to ``max_wait``
    seconds for a slot (default 0: at once), then fails with ``LimitExceededError``.
    ``probe_interval``:
    successful calls between two chances for the no-load latency to rise (by 10% at most).
    ``alpha``/``beta`` are Netflix VegasLimit's defaults (3/6): averaging each window's
    latencies keeps an event loop's scheduling noise from reading as queueing.
    """

    enabled: bool = False
    initial_limit: int = 20
    min_limit: int = 1
    max_limit: int = 1000
    alpha: float = 3.0
    beta: float = 6.0
    max_wait: float = 0.0
    probe_interval: int = 1000

    def __post_init__(self) -> None:
        for name in ("initial_limit", "min_limit", "max_limit", "probe_interval"):
            value = getattr(self, name)
            _require(
                _integer(value) and value >= 1,
                f"limiter.{name} must be an integer >= 1, got {value!r}",
            )
        _require(
            self.min_limit <= self.initial_limit <= self.max_limit,
            "limiter: min_limit <= initial_limit <= max_limit must hold, got "
            f"{self.min_limit}, {self.initial_limit}, {self.max_limit}",
        )
        _require(
            finite_number(self.alpha) and finite_number(self.beta) and 0 < self.alpha < self.beta,
            f"limiter: 0 < alpha < beta must hold, got {self.alpha!r}, {self.beta!r}",
        )
        _require(
            finite_number(self.max_wait) and self.max_wait >= 0,
            f"limiter.max_wait must be >= 0 seconds, got {self.max_wait!r}",
        )


# What a gRPC server built with grpc-core's defaults accepts from a client (the values of
# ``grpc.http2.min_recv_ping_interval_without_data_ms`` and ``grpc.keepalive_permit_without_calls``
# when a server sets neither): one ping per 5 minutes, and none while no call is active. Three
# pings sooner than that and the server sends GOAWAY ``too_many_pings``, which ends every
# stream on the connection.
GRPC_DEFAULT_SERVER_MIN_PING_INTERVAL_S = 300.0
GRPC_DEFAULT_SERVER_PERMITS_PINGS_WITHOUT_CALLS = False


@dataclass(frozen=True, slots=True)
class KeepalivePolicy:
    """HTTP/2 keepalive pings of a gRPC channel (per target: one policy per channel).

    The defaults work against any server, including one we do not own with grpc's default
    settings: a ping every ``time`` = 330 s, only while a call or stream is active
    (``without_calls=False``), and a connection whose ping is not answered within ``timeout``
    seconds is closed. 330 s is 10% above the default server minimum (300 s): the server
    measures between arrivals, and a ping arriving even a millisecond early is a strike.
    Against a server that permits more (the platform's own servers accept a ping every 10 s,
    also without calls), a shorter ``time`` notices a silently dead peer sooner.
    """

    time: float = 1.1 * GRPC_DEFAULT_SERVER_MIN_PING_INTERVAL_S
    timeout: float = 20.0
    without_calls: bool = GRPC_DEFAULT_SERVER_PERMITS_PINGS_WITHOUT_CALLS

    def __post_init__(self) -> None:
        _require_seconds(self.time, "keepalive.time")
        _require_seconds(self.timeout, "keepalive.timeout")
        _require(
            isinstance(self.without_calls, bool),
            f"keepalive.without_calls must be a bool, got {self.without_calls!r}",
        )


# What the platform's own servers accept (``pkg.common.grpcserver``: a ping every 10 s, also
# without calls). The typed clients of Foghorn and Signalman use it: an edge node's control
# stream, or a subscription, to a replica that went silent without closing its sockets (no
# FIN, no RST: a partition, a frozen host) ends within time + timeout = 30 s and reconnects.
PLATFORM_KEEPALIVE = KeepalivePolicy(time=20.0, timeout=10.0, without_calls=True)


@dataclass(frozen=True, slots=True)
class Policy:
    """Everything a resilient client does: one overall deadline plus the sub-policies.

    ``timeout`` is the overall deadline used when a call gives none (a call's own ``timeout=``
    always wins). It covers every attempt and backoff, and is what the callee sees. Streams get
    no deadline unless the call gives one; for them ``timeout`` bounds only the setup retries.
    ``stream_setup``: a stream counts as established at its first message, or once it has
    stayed alive (no error) this many seconds; it is never retried after that.
    ``record_latency`` records every call in the latency histogram (about 1-2 us per call).
    """

    timeout: float = 10.0
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    budget: BudgetPolicy = field(default_factory=BudgetPolicy)
    breaker: BreakerPolicy = field(default_factory=BreakerPolicy)
    hedge: HedgePolicy = field(default_factory=HedgePolicy)
    outlier: OutlierPolicy = field(default_factory=OutlierPolicy)
    keepalive: KeepalivePolicy = field(default_factory=KeepalivePolicy)
    limiter: LimiterPolicy = field(default_factory=LimiterPolicy)
    stream_setup: float = 0.5
    record_latency: bool = True

    def __post_init__(self) -> None:
        _require_seconds(self.timeout, "policy.timeout")
        _require_seconds(self.stream_setup, "policy.stream_setup")
        for name, cls in (
            ("retry", RetryPolicy),
            ("budget", BudgetPolicy),
            ("breaker", BreakerPolicy),
            ("hedge", HedgePolicy),
            ("outlier", OutlierPolicy),
            ("keepalive", KeepalivePolicy),
            ("limiter", LimiterPolicy),
        ):
            _require(
                isinstance(getattr(self, name), cls),
                f"policy.{name} must be a {cls.__name__}, got {type(getattr(self, name)).__name__}",
            )

    @classmethod
    def no_retries(cls, timeout: float = 10.0) -> Policy:
        """A policy that never retries (breaker and deadline still apply)."""
        return cls(timeout=timeout, retry=RetryPolicy(max_attempts=1))


@functools.lru_cache(maxsize=256)
def per_replica_breakers(policy: Policy) -> Policy:
    """``policy`` without the service-wide breaker, for clients over several replicas: each
    replica's own breaker (same settings) takes its place. Cached: the runtime keeps method
    state per policy object, and clients built per request must not add one each."""
    if not policy.breaker.enabled:
        return policy
    return replace(policy, breaker=replace(policy.breaker, enabled=False))
