"""The one tracing setup: OpenTelemetry spans with W3C context across every hop.

A service process calls ``setup_tracing`` once (``pkg.common.telemetry.setup_metrics`` does it,
so the three services share one setup). Tracing is on only when an exporter is configured:

- ``OTEL_EXPORTER_OTLP_ENDPOINT`` (or ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``): spans go to that
  collector over OTLP/gRPC, batched. The standard OTel variables apply (headers, timeout,
  ``OTEL_SERVICE_NAME``, ``OTEL_RESOURCE_ATTRIBUTES``, ``OTEL_TRACES_SAMPLER`` and
  ``OTEL_TRACES_SAMPLER_ARG``: the default sampler is ``parentbased_always_on``, so a caller's
  decision is kept; ``parentbased_traceidratio`` with an argument of 0.01 keeps 1% of new traces).
- ``PLATFORM_TRACES_DIR``: every span is also written, as it ends, as one JSON line to
  ``<dir>/<service>-<pid>.jsonl`` (local debugging, and the cross-process trace tests).

With neither, nothing is installed: no tracer provider, no instrumentation, no interceptor, and
the hot paths pay one boolean test (``ENABLED``).

What is traced once on: gRPC servers (``server_interceptors``), HTTP servers (``wrap_asgi``),
Redis commands (redis-py instrumentation), httpx requests, and whatever the platform's code
traces itself: ``pkg.clients`` calls and attempts (``pkg.clients.tracing``), event publication in
Kafka record headers (``pkg.events``), Signalman's consume, history append and delivery.
"""

from __future__ import annotations

import inspect
import json
import os
import threading
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.metrics import NoOpMeterProvider
from opentelemetry.propagate import extract, inject
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    SimpleSpanProcessor,
    SpanExporter,
    SpanExportResult,
)
from opentelemetry.trace import Link, SpanContext

# True once ``setup_tracing`` installed a tracer provider with an exporter. Read on hot paths.
ENABLED = False

TRACES_DIR_VAR = "PLATFORM_TRACES_DIR"
# gRPC services whose calls are never traced: probes and tooling, not traffic.
UNTRACED_SERVICES = ("grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection",
                     "grpc.reflection.v1.ServerReflection")  # fmt: skip
# HTTP paths never traced (comma-separated regexes, the ASGI instrumentation's format).
UNTRACED_PATHS = "/health,/metrics"

_lock = threading.Lock()
_provider: TracerProvider | None = None


class FileSpanExporter(SpanExporter):
    """Writes each span as one JSON line (the SDK's ``ReadableSpan.to_json``) to a file."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._out: IO[str] = path.open("a", encoding="utf-8")
        self._lock = threading.Lock()

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        lines = "".join(json.dumps(json.loads(s.to_json())) + "\n" for s in spans)
        with self._lock:
            if self._out.closed:
                return SpanExportResult.FAILURE
            self._out.write(lines)
            self._out.flush()
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        with self._lock:
            self._out.close()

    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        return True


def _instance_id(service: str, env: Mapping[str, str]) -> str:
    # The replica id each service is given (FOGHORN_REPLICA_ID, BRIDGE_REPLICA_ID, ...), so that
    # spans of two replicas are told apart; else host and pid.
    replica = env.get(f"{service.upper().replace('-', '_')}_REPLICA_ID")
    if replica:
        return replica
    import socket

    return f"{service}-{socket.gethostname()}-{os.getpid()}"


def setup_tracing(
    service: str, env: Mapping[str, str] | None = None, instance: str | None = None
) -> bool:
    """Install the process-wide tracer provider if an exporter is configured (see the module
    docstring); returns whether tracing is on. Idempotent."""
    global ENABLED, _provider
    env = os.environ if env is None else env
    otlp = bool(env.get("OTEL_EXPORTER_OTLP_ENDPOINT") or
                env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))  # fmt: skip
    traces_dir = env.get(TRACES_DIR_VAR, "")
    if env.get("OTEL_SDK_DISABLED", "").lower() == "true" or not (otlp or traces_dir):
        return ENABLED
    with _lock:
        if _provider is not None:
            return ENABLED
        attributes: dict[str, str] = {"service.instance.id": instance or _instance_id(service, env)}
        if not env.get("OTEL_SERVICE_NAME"):
            attributes["service.name"] = service
        # Resource.create merges OTEL_RESOURCE_ATTRIBUTES and OTEL_SERVICE_NAME from the env;
        # the sampler comes from OTEL_TRACES_SAMPLER(_ARG), parent-based by default.
        provider = TracerProvider(resource=Resource.create(attributes))
        if otlp:
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

            provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
        if traces_dir:
            path = Path(traces_dir) / f"{service}-{os.getpid()}.jsonl"
            # Written as each span ends: a killed process loses nothing it had finished.
            provider.add_span_processor(SimpleSpanProcessor(FileSpanExporter(path)))
        trace.set_tracer_provider(provider)
        _instrument_libraries(provider)
        _provider = provider
        ENABLED = True
    import atexit

    atexit.register(shutdown)
    return True


def _instrument_libraries(provider: TracerProvider) -> None:
    """The maintained instrumentations of the libraries the services call directly."""
    from opentelemetry.instrumentation.httpx import HTTPXClientInstrumentor
    from opentelemetry.instrumentation.redis import RedisInstrumentor

    # Their own metrics are off: the services' metrics are the catalogue in
    # docs/observability.md, not whatever an instrumentation adds.
    no_metrics = NoOpMeterProvider()
    RedisInstrumentor().instrument(tracer_provider=provider, meter_provider=no_metrics)
    HTTPXClientInstrumentor().instrument(tracer_provider=provider, meter_provider=no_metrics)


def install_provider(provider: TracerProvider | None) -> TracerProvider | None:
    """Trace this process's own instrumentation (``pkg.clients``, servers built from now on,
    events) with ``provider``, or stop tracing it (None); returns the previous provider.

    For tests: the process-wide OpenTelemetry provider can be set only once, so the platform's
    code asks this module for its tracers instead. ``setup_tracing`` calls it too.
    """
    global ENABLED, _provider
    with _lock:
        previous, _provider = _provider, provider
        ENABLED = provider is not None
    return previous


def provider() -> TracerProvider | None:
    """The provider the platform's spans go to (None: tracing off)."""
    return _provider


def shutdown() -> None:
    """Flush and stop exporting (at process exit)."""
    provider = _provider
    if provider is not None:
        provider.shutdown()


def tracer(name: str) -> trace.Tracer:
    """The tracer of a component (``pkg.events``, ``signalman`` ...)."""
    current = _provider
    return current.get_tracer(name) if current is not None else trace.get_tracer(name)


# -- context in carriers -----------------------------------------------------------------------


def current_traceparent() -> str:
    """The W3C ``traceparent`` of the active span ("" when none is recording)."""
    if not ENABLED:
        return ""
    carrier: dict[str, str] = {}
    inject(carrier)
    return carrier.get("traceparent", "")


def context_of(traceparent: str | bytes | None) -> otel_context.Context | None:
    """The context a ``traceparent`` (from a header or a stored entry) names, or None."""
    if not traceparent:
        return None
    if isinstance(traceparent, bytes):
        traceparent = traceparent.decode("ascii", "replace")
    ctx = extract({"traceparent": traceparent})
    span_context = trace.get_current_span(ctx).get_span_context()
    return ctx if span_context.is_valid else None


def span_context_of(traceparent: str | bytes | None) -> SpanContext | None:
    """The remote span context a ``traceparent`` names, or None."""
    ctx = context_of(traceparent)
    return None if ctx is None else trace.get_current_span(ctx).get_span_context()


def link_to(traceparent: str | bytes | None) -> list[Link]:
    """A link to the span a ``traceparent`` names (empty when it names none)."""
    span_context = span_context_of(traceparent)
    return [] if span_context is None else [Link(span_context)]


# -- servers -----------------------------------------------------------------------------------


def server_interceptors() -> list[Any]:
    """The gRPC server interceptor continuing callers' traces (none when tracing is off)."""
    if not ENABLED:
        return []
    return [_aio_server_interceptor()]


def _aio_server_interceptor() -> Any:
    from opentelemetry.instrumentation.grpc import filters
    from opentelemetry.instrumentation.grpc._aio_server import (
        OpenTelemetryAioServerInterceptor,
        _OpenTelemetryAioServicerContext,
    )

    class AioServerInterceptor(OpenTelemetryAioServerInterceptor):  # type: ignore[misc]
        """The maintained interceptor, plus streaming handlers written as coroutines.

        Its stream wrapper iterates the handler, which fails for read/write-style handlers
        (``async def`` + ``context.write``, as Signalman's Subscribe): opentelemetry-python-
        contrib issue 3066. Those get a coroutine wrapper with the same span.
        """

        def _intercept_aio_server_stream(
            self, behavior: Callable[..., Any], handler_call_details: Any
        ) -> Any:
            if not inspect.iscoroutinefunction(behavior):
                return super()._intercept_aio_server_stream(behavior, handler_call_details)

            async def coroutine_stream(request_or_iterator: Any, context: Any) -> Any:
                with (
                    self._set_remote_context(context),
                    self._start_span(
                        handler_call_details, context, set_status_on_exception=False
                    ) as span,
                ):
                    wrapped = _OpenTelemetryAioServicerContext(context, span)
                    try:
                        return await behavior(request_or_iterator, wrapped)
                    except Exception as error:
                        if type(error) is not Exception:  # bare Exception: an abort
                            span.record_exception(error)
                        raise

            return coroutine_stream

    untraced = filters.negate(filters.any_of(*(filters.service_name(s) for s in UNTRACED_SERVICES)))
    return AioServerInterceptor(tracer("opentelemetry.instrumentation.grpc"), filter_=untraced)


def trace_http(app: Any) -> Any:
    """``app`` (ASGI) continuing callers' traces over HTTP, outermost, so a request's span covers
    every middleware and error handler; ``app`` itself when tracing is off. ``HttpServer``
    applies it to every service's HTTP side."""
    if not ENABLED:
        return app
    from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware

    return OpenTelemetryMiddleware(
        app,
        excluded_urls=UNTRACED_PATHS,
        meter_provider=NoOpMeterProvider(),
        # One span per request: the per-message receive/send spans are noise here.
        exclude_spans=["receive", "send"],
    )


__all__ = [
    "ENABLED",
    "TRACES_DIR_VAR",
    "FileSpanExporter",
    "context_of",
    "current_traceparent",
    "link_to",
    "server_interceptors",
    "setup_tracing",
    "shutdown",
    "span_context_of",
    "trace_http",
    "tracer",
]
