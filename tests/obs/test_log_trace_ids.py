"""Log lines written while a span is active carry its trace_id and span_id; others carry none."""

from __future__ import annotations

import io
import json

import structlog
from opentelemetry.sdk.trace import TracerProvider

from pkg.common.logging import configure_logging


def test_a_log_line_inside_a_span_names_its_trace_and_span_and_one_outside_does_not() -> None:
    out = io.StringIO()
    configure_logging("probe", json=True, stream=out)
    structlog.configure(cache_logger_on_first_use=False)
    try:
        log = structlog.get_logger("probe")
        tracer = TracerProvider().get_tracer("probe")
        with tracer.start_as_current_span("work") as span:
            log.info("inside")
        log.info("outside")
    finally:
        structlog.reset_defaults()
        structlog.contextvars.clear_contextvars()
    inside, outside = (json.loads(line) for line in out.getvalue().splitlines())
    context = span.get_span_context()
    assert inside["trace_id"] == f"{context.trace_id:032x}"
    assert inside["span_id"] == f"{context.span_id:016x}"
    assert "trace_id" not in outside and "span_id" not in outside
