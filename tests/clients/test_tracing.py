"""pkg.clients' traces: a call span over every attempt, an attempt span each, the engine's
decisions as events (the real test service, over gRPC). That the attempt's context reaches the
server and continues there: tests/obs/test_traces.py, across real service processes."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from pkg.clients import BreakerPolicy, aio_channel
from pkg.common import tracing
from pkg.proto.testsvc.v1 import testsvc_pb2 as pb
from pkg.proto.testsvc.v1 import testsvc_pb2_grpc as pb_grpc
from tests.clients.conftest import fast_policy

UNARY = "/testsvc.v1.TestService/Unary"
UNAVAILABLE = grpc.StatusCode.UNAVAILABLE.value[0]
INVALID_ARGUMENT = grpc.StatusCode.INVALID_ARGUMENT.value[0]


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    previous = tracing.install_provider(provider)
    try:
        yield exporter
    finally:
        tracing.install_provider(previous)


def named(exporter: InMemorySpanExporter, name: str) -> list[ReadableSpan]:
    return [s for s in exporter.get_finished_spans() if s.name == name]


def events(span: ReadableSpan) -> list[tuple[str, dict[str, Any]]]:
    return [(e.name, dict(e.attributes or {})) for e in span.events]


async def test_a_retried_call_is_one_call_span_with_an_attempt_span_per_attempt_and_the_retry_reasons(  # noqa: E501
    spans: InMemorySpanExporter, target: str, key: str
) -> None:
    async with aio_channel(target, fast_policy()) as channel:
        behavior = pb.Behavior(fail_times=2, fail_code=UNAVAILABLE)
        reply = await pb_grpc.TestServiceStub(channel).Unary(
            pb.UnaryRequest(key=key, behavior=behavior), timeout=5
        )
    assert reply.attempt == 3
    (call,) = named(spans, f"call {UNARY}")
    attempts = named(spans, UNARY)
    assert call.kind == SpanKind.CLIENT
    assert call.status.status_code == StatusCode.UNSET
    assert len(attempts) == 3
    assert all(a.parent is not None and a.parent.span_id == call.context.span_id for a in attempts)
    assert [a.status.status_code for a in attempts] == [
        StatusCode.ERROR,
        StatusCode.ERROR,
        StatusCode.UNSET,
    ]
    retries = [attrs for name, attrs in events(call) if name == "retry"]
    assert [r["attempt"] for r in retries] == [1, 2]
    assert all(r["code"] == "UNAVAILABLE" and r["reason"] for r in retries)


async def test_a_call_given_up_has_an_error_status_and_the_reason_it_was_not_retried(
    spans: InMemorySpanExporter, target: str, key: str
) -> None:
    async with aio_channel(target, fast_policy()) as channel:
        behavior = pb.Behavior(fail_times=-1, fail_code=INVALID_ARGUMENT)
        with pytest.raises(grpc.aio.AioRpcError):
            await pb_grpc.TestServiceStub(channel).Unary(
                pb.UnaryRequest(key=key, behavior=behavior), timeout=5
            )
    (call,) = named(spans, f"call {UNARY}")
    assert call.status.status_code == StatusCode.ERROR
    assert call.attributes is not None
    assert call.attributes["rpc.grpc.status_code_name"] == "INVALID_ARGUMENT"
    [(name, attrs)] = events(call)
    assert name == "give_up" and attrs["code"] == "INVALID_ARGUMENT"
    assert len(named(spans, UNARY)) == 1  # one attempt, never retried


async def test_a_call_rejected_by_an_open_breaker_has_the_rejection_as_an_event_and_no_attempt(
    spans: InMemorySpanExporter, target: str, key: str
) -> None:
    policy = fast_policy(
        breaker=BreakerPolicy(enabled=True, failure_ratio=0.5, min_calls=2, open_duration=30.0)
    )
    async with aio_channel(target, policy) as channel:
        stub = pb_grpc.TestServiceStub(channel)
        failing = pb.Behavior(fail_times=-1, fail_code=UNAVAILABLE)
        for i in range(6):  # enough failures to open it
            with pytest.raises(grpc.aio.AioRpcError):
                await stub.Unary(pb.UnaryRequest(key=f"{key}-{i}", behavior=failing), timeout=5)
        spans.clear()
        with pytest.raises(grpc.aio.AioRpcError):
            await stub.Unary(pb.UnaryRequest(key=f"{key}-after"), timeout=5)
    (call,) = named(spans, f"call {UNARY}")
    assert call.status.status_code == StatusCode.ERROR
    assert "breaker_rejected" in [name for name, _ in events(call)]
    assert named(spans, UNARY) == []  # nothing was sent
