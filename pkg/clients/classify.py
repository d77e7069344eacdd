"""The one place that decides whether a failed attempt may be retried, and why.

Every decision carries a human-readable ``reason`` that ends up in the structlog event and in
the ``reason`` attribute of the retry metrics. The rules (see docs/rfcs/client-resilience.md):

* UNAVAILABLE and transport failures are retryable for idempotent methods; for the others only
  when the request provably never left this process: the library itself refused to send it
  because no connection was READY (``NotSentError``, see ``pkg.clients.connection``). The text
  of a status is never evidence: a server may send "connection refused" itself.
* DEADLINE_EXCEEDED is retryable only when it was a capped per-attempt timeout and the overall
  deadline still has time; never once the overall deadline is spent.
* RESOURCE_EXHAUSTED with a ``grpc-retry-pushback-ms`` (a server shedding load) is retried for
  idempotent methods after the pushback; it costs a budget token but does not count against
  the breaker (the server is alive). Without pushback it is a domain error (a quota).
* CANCELLED by the caller (a cancelled task or call) is never retried. CANCELLED that came from
  the server (grpc-core cancels the calls that reach a server as it shuts down, before the
  caller has seen its GOAWAY) is retried for idempotent methods, on another replica; it does not
  count against the breaker or outlier detection.
* The breaker's own open error, the limiter's refusal and domain errors are never retried.
* A negative ``grpc-retry-pushback-ms`` (or an unparsable one) means "do not retry".
"""

from __future__ import annotations

import asyncio
import email.utils
from dataclasses import dataclass

import grpc

from pkg.clients.breaker import BREAKER_FAILURE, BREAKER_IGNORE, BreakerOpenError
from pkg.clients.connection import NotSentError
from pkg.clients.limiter import LimitExceededError
from pkg.clients.outlier import OUTCOME_ERROR, OUTCOME_LOCAL, OUTCOME_NEUTRAL, OUTCOME_SUCCESS

PUSHBACK_KEY = "grpc-retry-pushback-ms"

# Server errors that count against a replica in outlier detection (Envoy's consecutive 5xx).
_OUTLIER_ERROR_CODES = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.DATA_LOSS,
    }
)

HTTP_RETRYABLE_STATUS = frozenset({429, 502, 503, 504})
HTTP_IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"})


@dataclass(frozen=True, slots=True)
class Verdict:
    """What one failed attempt means: retry or not (and why), and what the breaker records."""

    retryable: bool
    reason: str
    breaker: int
    pushback: float | None = None  # seconds the server asked us to wait; < 0: do not retry
    code: str = "ERROR"
    overload: bool = False  # the callee shed the call: costs a budget token like a failure


CANCELLED_VERDICT = Verdict(False, "cancelled by the caller", BREAKER_IGNORE, code="CANCELLED")


def _pushback_from(metadata: object) -> float | None:
    if not metadata:
        return None
    try:
        items = list(metadata)  # type: ignore[call-overload]
    except TypeError:
        return None
    for item in items:
        key, value = item[0], item[1]
        if key == PUSHBACK_KEY:
            try:
                ms = int(value)
            except (TypeError, ValueError):
                return -1.0  # gRFC A6: an unparsable pushback means do not retry
            return ms / 1000.0 if ms >= 0 else -1.0
    return None


def outlier_outcome(exc: BaseException, timeout_counts: bool, connected: bool = True) -> int:
    """What a failed attempt says about the replica it went to (``pkg.clients.outlier``).

    Not sent for want of a connection, UNAVAILABLE while the replica's connection is not READY
    (``connected`` is False: it broke or could not be made), or a timeout when
    ``timeout_counts`` (the attempt had ample time, see ``pkg.clients.grpc_aio_calls``): the
    replica did not answer (OUTCOME_LOCAL). A server error status on a live connection: it
    answered badly (OUTCOME_ERROR), whatever its text says. A domain error: it is alive
    (OUTCOME_SUCCESS). Cancellation, or a timeout with too little time: nothing
    (OUTCOME_NEUTRAL), since a caller's tiny deadline must not eject healthy replicas.
    """
    if isinstance(exc, NotSentError):
        return OUTCOME_LOCAL
    if not isinstance(exc, grpc.RpcError) or not hasattr(exc, "code"):
        return OUTCOME_NEUTRAL
    code = exc.code()
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return OUTCOME_LOCAL if timeout_counts else OUTCOME_NEUTRAL
    if code == grpc.StatusCode.CANCELLED:
        return OUTCOME_NEUTRAL
    if code in _OUTLIER_ERROR_CODES:
        if code == grpc.StatusCode.UNAVAILABLE and not connected:
            return OUTCOME_LOCAL
        return OUTCOME_ERROR
    return OUTCOME_SUCCESS


def _cancelled_here(exc: BaseException) -> bool:
    """Whether this process cancelled the call itself. grpc.aio raises asyncio.CancelledError
    for a local cancel (classified before this), never a CANCELLED status; a sync call object
    says so through ``cancelled()``. A CANCELLED status otherwise came from the peer."""
    cancelled = getattr(exc, "cancelled", None)
    return bool(callable(cancelled) and cancelled())


def classify_grpc(
    exc: BaseException,
    *,
    idempotent: bool,
    attempt_capped: bool,
    time_left: float,
    failure_codes: frozenset[grpc.StatusCode],
) -> Verdict:
    """Classify an exception raised by one gRPC attempt."""
    if isinstance(exc, BreakerOpenError):
        return Verdict(False, "circuit breaker open (never retried)", BREAKER_IGNORE, code="OPEN")
    if isinstance(exc, asyncio.CancelledError):
        return CANCELLED_VERDICT
    if isinstance(exc, LimitExceededError):
        return Verdict(
            False, "client concurrency limit reached (never retried)", BREAKER_IGNORE, code="LIMIT"
        )
    if isinstance(exc, LimitExceededError):
        return Verdict(
            False, "client concurrency limit reached (never retried)", BREAKER_IGNORE, code="LIMIT"
        )
    if isinstance(exc, NotSentError):
        name = exc.code().name
        if time_left <= 0:
            why = f"not sent ({exc.why}); overall deadline spent"
            return Verdict(False, why, BREAKER_FAILURE, code=name)
        return Verdict(True, f"not sent: {exc.why}", BREAKER_FAILURE, code=name)
    if not isinstance(exc, grpc.RpcError) or not hasattr(exc, "code"):
        return Verdict(False, f"{type(exc).__name__} is not a gRPC status", BREAKER_IGNORE)
    code = exc.code()
    name = code.name if isinstance(code, grpc.StatusCode) else str(code)
    breaker = BREAKER_FAILURE if code in failure_codes else BREAKER_IGNORE
    pushback = None
    trailing = getattr(exc, "trailing_metadata", None)
    if trailing is not None:
        try:
            pushback = _pushback_from(trailing())
        except Exception:  # a call object without trailers yet
            pushback = None
    if pushback is not None and pushback < 0:
        return Verdict(False, "server pushback says do not retry", breaker, pushback, name)
    if code == grpc.StatusCode.UNAVAILABLE:
        if idempotent:
            return Verdict(True, "UNAVAILABLE", breaker, pushback, name)
        return Verdict(
            False,
            "UNAVAILABLE on a non-idempotent method that may have been sent",
            breaker,
            pushback,
            name,
        )
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        if not attempt_capped or time_left <= 0:
            return Verdict(False, "overall deadline spent", breaker, pushback, name)
        if idempotent:
            return Verdict(True, "per-attempt timeout", breaker, pushback, name)
        return Verdict(
            False, "per-attempt timeout on a non-idempotent method", breaker, pushback, name
        )
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED and pushback is not None:
        # A server shedding load says when to come back (pkg.common.shedding does). Without a
        # pushback RESOURCE_EXHAUSTED may be a quota, which a retry does not fix.
        if idempotent:
            why = "RESOURCE_EXHAUSTED: server shed load"
            return Verdict(True, why, breaker, pushback, name, overload=True)
        return Verdict(
            False,
            "RESOURCE_EXHAUSTED on a non-idempotent method",
            breaker,
            pushback,
            name,
            overload=True,
        )
    if code == grpc.StatusCode.CANCELLED:
        if _cancelled_here(exc):
            return Verdict(False, "cancelled by the caller", BREAKER_IGNORE, pushback, name)
        # The peer cancelled: a server shutting down cancels the calls that reach it as it
        # stops accepting (they raced its GOAWAY), and after its grace the ones still running.
        if idempotent:
            why = "CANCELLED by the server (a replica stopping)"
            return Verdict(True, why, BREAKER_IGNORE, pushback, name)
        why = "CANCELLED by the server on a non-idempotent method that may have run"
        return Verdict(False, why, BREAKER_IGNORE, pushback, name)
    return Verdict(False, f"{name} is not retryable", breaker, pushback, name)


def parse_retry_after(value: str | None, now_wall: float) -> float | None:
    """``Retry-After`` as seconds to wait: delta-seconds or an HTTP date; None if absent/bad."""
    if value is None:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when is None:
        return None
    return max(0.0, when.timestamp() - now_wall)


def http_idempotent(method: str, headers: object) -> bool:
    """Idempotent HTTP methods, or any method carrying an ``Idempotency-Key`` header."""
    if method.upper() in HTTP_IDEMPOTENT_METHODS:
        return True
    get = getattr(headers, "get", None)
    return bool(get and get("idempotency-key"))
