"""With OTEL_EXPORTER_OTLP_ENDPOINT set, a process's spans reach that collector over OTLP/gRPC;
without any exporter configured, tracing stays off (no provider installed)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

PROBE = """
from pkg.common import tracing
from pkg.common.telemetry import setup_metrics
setup_metrics("probe")
assert tracing.ENABLED, "tracing not on with an OTLP endpoint"
with tracing.tracer("probe").start_as_current_span("probe span"):
    pass
tracing.shutdown()
"""

OFF = """
from opentelemetry import trace
from pkg.common import tracing
from pkg.common.telemetry import setup_metrics
setup_metrics("probe")
assert not tracing.ENABLED and tracing.provider() is None
assert type(trace.get_tracer_provider()).__name__ == "ProxyTracerProvider"
"""


class Collector(trace_service_pb2_grpc.TraceServiceServicer):  # type: ignore[misc]
    def __init__(self) -> None:
        self.requests: list[trace_service_pb2.ExportTraceServiceRequest] = []

    async def Export(self, request: object, context: object) -> object:
        self.requests.append(request)  # type: ignore[arg-type]
        return trace_service_pb2.ExportTraceServiceResponse()


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "PLATFORM_TRACES"))}
    return {**env, **extra}


async def test_spans_reach_the_otlp_collector_named_by_the_standard_variable() -> None:
    collector = Collector()
    server = grpc.aio.server()
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(collector, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        env = _env(
            OTEL_EXPORTER_OTLP_ENDPOINT=f"http://127.0.0.1:{port}",
            OTEL_EXPORTER_OTLP_INSECURE="true",
            PROBE_REPLICA_ID="probe-7",
        )
        proc = await asyncio.create_subprocess_exec(sys.executable, "-c", PROBE, env=env)
        assert await asyncio.wait_for(proc.wait(), 60) == 0
    finally:
        await server.stop(None)
    spans = [
        (resource.resource, span.name)
        for request in collector.requests
        for resource in request.resource_spans
        for scope in resource.scope_spans
        for span in scope.spans
    ]
    assert [name for _, name in spans] == ["probe span"]
    attributes = {a.key: a.value.string_value for a in spans[0][0].attributes}
    assert attributes["service.name"] == "probe"
    assert attributes["service.instance.id"] == "probe-7"


def test_without_an_exporter_tracing_is_off() -> None:
    result = subprocess.run(
        [sys.executable, "-c", OFF], env=_env(), capture_output=True, text=True, timeout=60,
        check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
