"""The one logging setup: structlog, JSON lines in production, readable console in a terminal."""

from __future__ import annotations

import logging
import os
import sys
from typing import Any, TextIO

import structlog
from opentelemetry import trace


def add_trace_ids(
    logger: Any, method: str, event_dict: structlog.typing.EventDict
) -> structlog.typing.EventDict:
    """structlog processor: ``trace_id``/``span_id`` of the active span, when one records.

    A line logged while handling a traced call can be found from the trace, and the trace from
    the line. No span (tracing off, or outside any call): nothing added.
    """
    span_context = trace.get_current_span().get_span_context()
    if span_context.is_valid:
        event_dict["trace_id"] = format(span_context.trace_id, "032x")
        event_dict["span_id"] = format(span_context.span_id, "016x")
    return event_dict


def configure_logging(
    service: str,
    level: str | None = None,
    json: bool | None = None,
    stream: TextIO | None = None,
) -> None:
    """Configure structlog and stdlib logging for a service process.

    ``level`` defaults to ``$LOG_LEVEL`` or INFO; ``json`` defaults to true unless stderr is a TTY;
    ``stream`` (default stderr) is where log lines go.
    """
    out = stream or sys.stderr
    level_name = (level or os.environ.get("LOG_LEVEL", "INFO")).upper()
    numeric = logging.getLevelName(level_name)
    if not isinstance(numeric, int):
        numeric = logging.INFO
    use_json = (not out.isatty()) if json is None else json
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer() if use_json else structlog.dev.ConsoleRenderer()
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            add_trace_ids,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.StackInfoRenderer(),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(file=out),
        cache_logger_on_first_use=True,
    )
    structlog.contextvars.bind_contextvars(service=service)
    logging.basicConfig(level=max(numeric, logging.WARNING), stream=out)
