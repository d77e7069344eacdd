"""Classification of a failed attempt: retry or not, what the breaker records, and why."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from pkg.clients import (
    BreakerOpenError,
)
from pkg.clients.breaker import (
    BREAKER_FAILURE,
    BREAKER_IGNORE,
    STATE_OPEN,
)
from pkg.clients.classify import classify_grpc, parse_retry_after
from pkg.clients.connection import NotSentError
from pkg.clients.policy import DEFAULT_BREAKER_FAILURE_CODES
from tests.clients.conftest import status_error


def verdict(code: grpc.StatusCode, details: str = "boom", **kw: object):  # type: ignore[no-untyped-def]
    args: dict[str, object] = {
        "idempotent": True,
        "attempt_capped": False,
        "time_left": 1.0,
        "failure_codes": DEFAULT_BREAKER_FAILURE_CODES,
    }
    args.update(kw)
    return classify_grpc(status_error(code, details), **args)  # type: ignore[arg-type]


def test_classifier_rules_each_with_a_reason() -> None:
    assert verdict(grpc.StatusCode.UNAVAILABLE).retryable
    assert not verdict(grpc.StatusCode.UNAVAILABLE, idempotent=False).retryable
    # A server's text proves nothing: only the library's own NotSentError says "not sent".
    for text in (
        "failed to connect to all addresses; last error: Connection refused",
        "Error 111 connecting to 10.0.0.5:6379. Connection refused.",
    ):
        assert not verdict(grpc.StatusCode.UNAVAILABLE, text, idempotent=False).retryable
    never_left = classify_grpc(
        NotSentError("svc:1", "no connection could be made", grpc.StatusCode.UNAVAILABLE),
        idempotent=False,
        attempt_capped=False,
        time_left=1.0,
        failure_codes=DEFAULT_BREAKER_FAILURE_CODES,
    )
    assert never_left.retryable and "not sent" in never_left.reason
    assert verdict(grpc.StatusCode.DEADLINE_EXCEEDED, attempt_capped=True).retryable
    spent = verdict(grpc.StatusCode.DEADLINE_EXCEEDED, attempt_capped=True, time_left=0.0)
    assert not spent.retryable and "overall deadline" in spent.reason
    assert not verdict(grpc.StatusCode.DEADLINE_EXCEEDED).retryable
    for code in (
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.PERMISSION_DENIED,
    ):
        result = verdict(code)
        assert not result.retryable and result.reason
    assert verdict(grpc.StatusCode.NOT_FOUND).breaker == BREAKER_IGNORE
    assert verdict(grpc.StatusCode.UNAVAILABLE).breaker == BREAKER_FAILURE
    opened = classify_grpc(
        BreakerOpenError("t", 1.0, STATE_OPEN),
        idempotent=True,
        attempt_capped=False,
        time_left=1.0,
        failure_codes=DEFAULT_BREAKER_FAILURE_CODES,
    )
    assert not opened.retryable and "breaker" in opened.reason


def test_retry_after_accepts_seconds_and_http_dates() -> None:
    assert parse_retry_after("3", 0.0) == 3.0
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:10 GMT", 1445412480.0) == pytest.approx(10.0)
    assert parse_retry_after("soon", 0.0) is None
    assert parse_retry_after(None, 0.0) is None


class _LocallyCancelled(grpc.RpcError):
    """A sync call object the caller cancelled: code CANCELLED, ``cancelled()`` True."""

    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.CANCELLED

    def cancelled(self) -> bool:
        return True


def test_cancelled_is_retried_only_when_the_server_cancelled_an_idempotent_call() -> None:
    by_server = verdict(grpc.StatusCode.CANCELLED)  # a replica stopping cancelled it
    assert by_server.retryable and "server" in by_server.reason
    assert by_server.breaker == BREAKER_IGNORE
    may_have_run = verdict(grpc.StatusCode.CANCELLED, idempotent=False)
    assert not may_have_run.retryable and "non-idempotent" in may_have_run.reason
    for local in (_LocallyCancelled(), asyncio.CancelledError()):
        result = classify_grpc(
            local,
            idempotent=True,
            attempt_capped=False,
            time_left=1.0,
            failure_codes=DEFAULT_BREAKER_FAILURE_CODES,
        )
        assert not result.retryable and "caller" in result.reason
