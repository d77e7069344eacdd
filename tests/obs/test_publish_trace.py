"""The embedded path (no Kafka): an event published through Signalman's Publish RPC keeps the
caller's trace, and its delivery to a subscriber is a child of the Publish call's server span."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.trace import set_span_in_context
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from devtools.tracetree import read_spans
from pkg.clients import Policy, aio_channel
from pkg.clients.signalman import SignalmanClient
from pkg.devstack.servers import CommandProcess
from pkg.proto.signalman.v1 import signalman_pb2 as pb
from pkg.proto.signalman.v1 import signalman_pb2_grpc as pb_grpc

pytestmark = pytest.mark.integration

TOKENS = "tsys=platform:system"


async def test_delivery_of_a_published_event_continues_the_publishers_trace(
    process_factory: Callable[..., CommandProcess], tmp_path: Path
) -> None:
    traces = tmp_path / "traces"
    signalman = process_factory(
        "signalman",
        [sys.executable, "-m", "api_realtime", "--grpc-port", "{port}", "--http-port", "0"],
        env={"PLATFORM_TOKENS": TOKENS, "SIGNALMAN_REPLICA_ID": "sm-traced",
             "PLATFORM_TRACES_DIR": str(traces)},
    )  # fmt: skip
    target = f"127.0.0.1:{signalman.port}"
    client = SignalmanClient(target, token="tsys")
    root = TracerProvider().get_tracer("test").start_span("publisher")
    carrier: dict[str, str] = {}
    TraceContextTextMapPropagator().inject(carrier, context=set_span_in_context(root))
    event = {"type": "node.registered", "tenant": "system", "id": "e-traced", "time": time.time(),
             "schema_version": 1, "source": "test", "data": {"node_id": "n-traced"}}  # fmt: skip
    try:
        async with client.subscribe(["system"]) as sub:
            await sub.wait_subscribed()
            async with aio_channel(target, Policy(timeout=5.0), token="tsys") as channel:
                await pb_grpc.SignalmanStub(channel).Publish(
                    pb.PublishRequest(events_json=[json.dumps(event)]),
                    metadata=tuple(carrier.items()),
                    timeout=5,
                )
            item = await sub.get(10)
            assert isinstance(item, pb.Event) and item.id == "e-traced"
    finally:
        await client.close()
    trace_id = f"0x{root.get_span_context().trace_id:032x}"
    deadline = time.monotonic() + 10
    while True:
        spans = [s for s in read_spans(traces) if s["context"]["trace_id"] == trace_id]
        names = {s["name"] for s in spans}
        if {"/signalman.v1.Signalman/Publish", "deliver"} <= names or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    (publish,) = [s for s in spans if s["name"] == "/signalman.v1.Signalman/Publish"]
    (deliver,) = [s for s in spans if s["name"] == "deliver"]
    assert publish["parent_id"] == f"0x{root.get_span_context().span_id:016x}"
    assert deliver["parent_id"] == publish["context"]["span_id"]
    assert deliver["attributes"]["signalman.subscribers"] == 1
