"""Log events of pkg.clients, through whatever logging the application set up.

A library must not print: an application that configured nothing gets no output from it (in
particular nothing on stdout, which may carry a program's data). When the application has
configured structlog (as the platform's services do, ``pkg.common.logging``), events go
through it as structured events; otherwise they go to the stdlib logger of the same name
(``pkg.clients``, ``pkg.clients.shared_breaker``, ...), which has a ``NullHandler`` and so
prints only where the application has configured stdlib logging.
"""

from __future__ import annotations

import logging
from typing import Any

import structlog

logging.getLogger("pkg.clients").addHandler(logging.NullHandler())


class ClientLog:
    """A logger with structlog's call style (``log.warning("event", key=value)``)."""

    __slots__ = ("name", "std")

    def __init__(self, name: str) -> None:
        self.name = name
        self.std = logging.getLogger(name)

    def _emit(self, level: int, event: str, fields: dict[str, Any]) -> None:
        if structlog.is_configured():
            structlog.get_logger(self.name).log(level, event, **fields)
        elif self.std.isEnabledFor(level):
            rendered = " ".join(f"{key}={value!r}" for key, value in fields.items())
            self.std.log(level, "%s %s", event, rendered, extra={"event_fields": fields})

    def debug(self, event: str, **fields: Any) -> None:
        """A debug event."""
        self._emit(logging.DEBUG, event, fields)

    def info(self, event: str, **fields: Any) -> None:
        """An info event."""
        self._emit(logging.INFO, event, fields)

    def warning(self, event: str, **fields: Any) -> None:
        """A warning event."""
        self._emit(logging.WARNING, event, fields)


def get_logger(name: str = "pkg.clients") -> ClientLog:
    """The logger ``name`` (a child of ``pkg.clients``)."""
    return ClientLog(name)
