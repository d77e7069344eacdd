"""Telemetry: OpenTelemetry metrics (exported as Prometheus text) and instrumentation hooks."""

from __future__ import annotations

import grpc
import grpc.aio
import pytest

from pkg.clients import (
    BreakerOpenError,
    BreakerPolicy,
    Instrumentation,
    RetryEvent,
    Runtime,
    aio_channel,
)
from pkg.clients.breaker import STATE_OPEN
from pkg.common.telemetry import prometheus_text, setup_metrics
from pkg.proto.testsvc.v1 import testsvc_pb2 as pb
from pkg.proto.testsvc.v1 import testsvc_pb2_grpc as pb_grpc
from tests.clients.conftest import NOT_FOUND, failing, fast_policy

pytestmark = pytest.mark.integration


async def test_metrics_count_attempts_retries_budget_breaker_and_latency(target, key) -> None:
    setup_metrics("tests-clients")

    def value(text: str, prefix: str, *needles: str) -> float:
        for line in text.splitlines():
            # The exact label: a channel over several replicas has a target such as
            # "<this one>,<another>", and its series, listed first, matched a substring test.
            if (
                line.startswith(prefix)
                and (f'target="{target}"' in line or f'breaker="{target}"' in line)
                and all(n in line for n in needles)
            ):
                return float(line.rsplit(" ", 1)[1])
        return 0.0

    # The test service is shared with other tests: compare before and after.
    probes = [
        ("client_attempts", "Unary"),
        ("client_calls", "Unary"),
        ("client_retries", 'outcome="retry"', 'reason="UNAVAILABLE"'),
        ("client_breaker_transitions", 'to="open"'),
        ("client_call_duration_seconds_count", "Unary"),
        ("client_call_duration_seconds_bucket", 'le="+Inf"', "Unary"),
    ]
    before_text = prometheus_text().decode()
    before = [value(before_text, *p) for p in probes]
    runtime = Runtime()
    channel = aio_channel(target, fast_policy(breaker=BreakerPolicy()), runtime=runtime)
    stub = pb_grpc.TestServiceStub(channel)
    await stub.Unary(failing(key, 2), timeout=5)
    runtime.breakers[target].force(STATE_OPEN, open_for=60)
    after_text = prometheus_text().decode()
    await channel.close()
    deltas = [value(after_text, *p) - b for p, b in zip(probes, before, strict=True)]
    assert deltas == [3, 1, 2, 1, 1, 1]
    assert value(after_text, "client_breaker_state") == 2  # open


async def test_custom_instrumentation_hooks_see_every_decision(target, key) -> None:
    class Recorder(Instrumentation):
        def __init__(self) -> None:
            self.events: list[RetryEvent] = []
            self.transitions: list[tuple[str, str]] = []
            self.rejected = 0

        def on_retry_decision(self, event: RetryEvent) -> None:
            self.events.append(event)

        def on_breaker_transition(self, name: str, old: str, new: str, reason: str) -> None:
            self.transitions.append((old, new))

        def on_breaker_rejected(self, name: str, retry_after: float) -> None:
            self.rejected += 1

    recorder = Recorder()
    runtime = Runtime(instrumentation=[recorder])
    channel = aio_channel(target, fast_policy(breaker=BreakerPolicy()), runtime=runtime)
    stub = pb_grpc.TestServiceStub(channel)
    await stub.Unary(failing(key, 1), timeout=5)
    with pytest.raises(grpc.aio.AioRpcError) as not_found:
        await stub.Unary(failing(key + "-nf", 1, NOT_FOUND), timeout=5)
    assert not_found.value.code() == grpc.StatusCode.NOT_FOUND
    runtime.breakers[target].force(STATE_OPEN, open_for=60)
    with pytest.raises(BreakerOpenError):
        await stub.Unary(pb.UnaryRequest(key=key), timeout=5)
    await channel.close()
    assert [(e.retry, e.code) for e in recorder.events] == [
        (True, "UNAVAILABLE"),
        (False, "NOT_FOUND"),
    ]
    assert recorder.events[1].reason == "NOT_FOUND is not retryable"
    assert recorder.transitions == [("closed", "open")]
    assert recorder.rejected == 1
