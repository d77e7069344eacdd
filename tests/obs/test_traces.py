"""One trace across processes: a viewer routing through Bridge, a node event through Kafka.

The platform of ``./dev up`` (tests/obs/conftest.py) runs with ``PLATFORM_TRACES_DIR`` set, so
every service process writes its finished spans to its own JSON-lines file. The test process
plays the viewer and the edge node: it starts the root span itself and sends its W3C context,
then reads every process's spans and checks that they form one trace with the expected spans,
in order, across the process boundaries.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import set_span_in_context
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from api_gateway.devtoken import mint
from devtools import up
from devtools.tracetree import read_spans
from pkg.clients import Policy, aio_channel
from pkg.clients.signalman import SignalmanClient
from pkg.proto.foghorn.v1 import foghorn_pb2 as pb
from pkg.proto.foghorn.v1 import foghorn_pb2_grpc
from pkg.proto.signalman.v1 import signalman_pb2

pytestmark = [pytest.mark.integration]
T = TypeVar("T")

ROUTE_QUERY = (
    "query($c: String!) { route(contentId: $c, latitude: 48.85, longitude: 2.35) "
    "{ best { nodeId } } }"
)


class Viewer:
    """The test process's own tracer: the root span a viewer or node would start."""

    def __init__(self) -> None:
        self.exporter = InMemorySpanExporter()
        self.provider = TracerProvider()
        self.provider.add_span_processor(SimpleSpanProcessor(self.exporter))
        self.tracer = self.provider.get_tracer("test")

    def headers(self, span: Any) -> dict[str, str]:
        carrier: dict[str, str] = {}
        TraceContextTextMapPropagator().inject(carrier, context=set_span_in_context(span))
        return carrier


def wait_until(found: Callable[[], T | None], timeout: float, what: str) -> T:
    deadline = time.monotonic() + timeout
    while True:
        value = found()
        if value is not None:
            return value
        assert time.monotonic() < deadline, f"not within {timeout} s: {what}"
        time.sleep(0.2)


def of_trace(spans: list[dict[str, Any]], trace_id: int) -> list[dict[str, Any]]:
    want = f"0x{trace_id:032x}"
    return [s for s in spans if s["context"]["trace_id"] == want]


def service(span: dict[str, Any]) -> str:
    return str(span["resource"]["attributes"]["service.name"])


def one(spans: list[dict[str, Any]], svc: str, name: str, kind: str) -> dict[str, Any]:
    found = [s for s in spans if service(s) == svc and s["name"] == name and s["kind"] == kind]
    assert len(found) == 1, (svc, name, kind, [(service(s), s["name"], s["kind"]) for s in spans])
    return found[0]


def assert_child(child: dict[str, Any], parent_id: str) -> None:
    assert child["parent_id"] == parent_id, (child["name"], child["parent_id"], parent_id)


def span_id(span: dict[str, Any]) -> str:
    return str(span["context"]["span_id"])


def starts_in_order(*spans: dict[str, Any]) -> None:
    starts = [s["start_time"] for s in spans]
    assert starts == sorted(starts), [(s["name"], s["start_time"]) for s in spans]


def test_viewer_routing_through_bridge_is_one_trace_across_processes(
    platform: tuple[up.Stack, Path],
) -> None:
    stack, traces = platform
    viewer = Viewer()
    bridge_url = stack.endpoints["bridge graphql"][0]
    jwt = mint(up.BRIDGE_JWT_SECRET, "traced", ["viewer"], "platform", "bridge", 600)
    with viewer.tracer.start_as_current_span("viewer asks for a node") as root:
        reply = httpx.post(
            bridge_url,
            json={"query": ROUTE_QUERY, "variables": {"c": "traced-content"}},
            headers={"authorization": f"Bearer {jwt}", **viewer.headers(root)},
            timeout=10,
        )
    assert reply.status_code == 200, reply.text
    assert "errors" not in reply.json(), reply.text
    root_id = f"0x{root.get_span_context().span_id:016x}"

    def trace_complete() -> list[dict[str, Any]] | None:
        spans = of_trace(read_spans(traces), root.get_span_context().trace_id)
        names = {(service(s), s["kind"]) for s in spans}
        return spans if ("foghorn", "SpanKind.SERVER") in names else None

    spans = wait_until(trace_complete, timeout=10, what="Foghorn's server span in the trace")
    # Bridge continues the viewer's trace over HTTP ...
    server = one(spans, "bridge", "POST /graphql", "SpanKind.SERVER")
    assert_child(server, root_id)
    # ... pkg.clients makes the call span and one attempt span under it ...
    call = one(spans, "bridge", "call /foghorn.v1.Routing/RouteViewer", "SpanKind.CLIENT")
    attempt = one(spans, "bridge", "/foghorn.v1.Routing/RouteViewer", "SpanKind.CLIENT")
    assert_child(attempt, span_id(call))
    ancestors = {span_id(s): s["parent_id"] for s in spans}
    parent = call["parent_id"]
    while parent is not None and parent != span_id(server):
        parent = ancestors.get(parent)
    assert parent == span_id(server), "the call span is not under Bridge's server span"
    # ... and Foghorn continues it from the attempt's traceparent.
    routed = one(spans, "foghorn", "/foghorn.v1.Routing/RouteViewer", "SpanKind.SERVER")
    assert_child(routed, span_id(attempt))
    starts_in_order(server, call, attempt, routed)
    assert call["status"]["status_code"] == "UNSET"  # the call succeeded


async def _node_event(stack: up.Stack, viewer: Viewer, node_id: str) -> tuple[Any, str]:
    """Subscribe to SYSTEM events, connect a node in a root span, wait for its event."""
    signalman = SignalmanClient(stack.endpoints["signalman grpc"], token=up.DEV_TOKEN)
    channel = aio_channel(stack.endpoints["foghorn grpc"], Policy(timeout=10.0),
                          token=up.NODE_TOKEN)  # fmt: skip
    try:
        async with signalman.subscribe(["system"]) as sub:
            await sub.wait_subscribed()
            with viewer.tracer.start_as_current_span("edge node connects") as root:
                outbox: asyncio.Queue[pb.NodeMessage] = asyncio.Queue()
                outbox.put_nowait(pb.NodeMessage(register=pb.Register(
                    node_id=node_id, roles=["edge"], capabilities=["hls"],
                    base_url="http://127.0.0.1:9", capacity=10,
                    location=pb.GeoPoint(latitude=48.85, longitude=2.35))))  # fmt: skip

                async def messages() -> Any:
                    while True:
                        yield await outbox.get()

                metadata = tuple(viewer.headers(root).items())
                call = foghorn_pb2_grpc.NodeControlStub(channel).Connect(
                    messages(), metadata=metadata
                )
                first = await asyncio.wait_for(call.read(), 10)
                assert first.WhichOneof("msg") == "registered", first
                deadline = time.monotonic() + 15
                while True:
                    item = await sub.get(max(0.1, deadline - time.monotonic()))
                    if isinstance(item, signalman_pb2.Event) and node_id in item.data_json:
                        break
                    assert time.monotonic() < deadline, "the node's event never arrived"
                call.cancel()  # the stream's server span ends with the stream
            return root, item.type
    finally:
        await channel.close()
        await signalman.close()


def test_node_event_is_one_trace_from_edge_node_to_subscriber(
    platform: tuple[up.Stack, Path],
) -> None:
    stack, traces = platform
    viewer = Viewer()
    root, event_type = asyncio.run(_node_event(stack, viewer, "drill-traced-node-1"))
    root_id = f"0x{root.get_span_context().span_id:016x}"

    def trace_complete() -> list[dict[str, Any]] | None:
        spans = of_trace(read_spans(traces), root.get_span_context().trace_id)
        names = {(service(s), s["name"]) for s in spans}
        wanted = {("foghorn", "/foghorn.v1.NodeControl/Connect"), ("signalman", "deliver")}
        return spans if wanted <= names else None

    spans = wait_until(trace_complete, timeout=15, what="the node's whole trace")
    # Foghorn continues the node's stream ...
    stream = one(spans, "foghorn", "/foghorn.v1.NodeControl/Connect", "SpanKind.SERVER")
    assert_child(stream, root_id)
    # ... publishes the event as a producer span whose context rides in the record headers ...
    publishes = [s for s in spans if s["name"] == "publish signalman.events"]
    assert publishes and all(p["parent_id"] == span_id(stream) for p in publishes), publishes
    # ... Signalman consumes the record as its child, appends it to history and delivers it.
    processes = [s for s in spans if s["name"] == "process signalman.events"]
    by_id = {span_id(s): s for s in spans}
    assert processes, [s["name"] for s in spans]
    for process in processes:
        assert service(process) == "signalman"
        assert process["kind"] == "SpanKind.CONSUMER"
        assert by_id[process["parent_id"]]["name"] == "publish signalman.events"
        assert process["attributes"]["signalman.outcome"] == "appended"
    appends = [s for s in spans if s["name"] == "history append"]
    assert appends, "no history append span in the trace"
    for append in appends:
        assert append["parent_id"] in {span_id(p) for p in processes}
    delivers = [s for s in spans if s["name"] == "deliver"]
    for deliver in delivers:
        assert service(deliver) == "signalman"
        assert deliver["parent_id"] in {span_id(p) for p in processes}
        assert deliver["attributes"]["signalman.subscribers"] >= 1
    first_process = min(processes, key=lambda s: s["start_time"])
    starts_in_order(stream, publishes[0], first_process, appends[0], delivers[0])
    assert event_type.startswith("node.")
