"""The one health report of every service: what ``/health`` answers and gRPC health follows.

A report has a status (``ok``, ``degraded``: serving with a reason, ``not_serving``: do not
send traffic here), the reasons for it, the state of each dependency (store, event sink, lock
connection ...), a few figures for status views (``./dev up``), and service-specific detail
that ``to_json`` keeps at the top level (so a caller reads ``doc["ha"]`` or ``doc["redis"]``
next to ``doc["status"]``). ``/health`` answers 200 unless the status is ``not_serving`` (503);
gRPC health answers SERVING unless it is ``not_serving``.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from pkg.common.clock import SYSTEM_CLOCK, Clock

Figure = int | float | str | bool | None


class Status(enum.StrEnum):
    OK = "ok"
    DEGRADED = "degraded"
    NOT_SERVING = "not_serving"


_RANK = {Status.OK: 0, Status.DEGRADED: 1, Status.NOT_SERVING: 2}


def worst(statuses: Iterable[Status]) -> Status:
    """The most severe of ``statuses`` (``ok`` when there are none)."""
    return max(statuses, key=_RANK.__getitem__, default=Status.OK)


@dataclass(frozen=True)
class Dependency:
    """One dependency's state. ``status`` is its effect on the service: a Redis whose loss the
    service rides out in memory is ``degraded``; one it cannot serve without is
    ``not_serving``. A dependency that is not ``critical`` (an event sink whose events wait in
    a buffer) is reported but leaves the service's status alone."""

    name: str
    kind: str  # e.g. "redis", "memory", "kafka", "postgres", "none"
    status: Status = Status.OK
    reason: str = ""
    detail: Mapping[str, Any] = field(default_factory=dict)
    critical: bool = True

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"kind": self.kind, "status": self.status.value}
        if self.reason:
            doc["reason"] = self.reason
        doc.update(self.detail)
        return doc


@dataclass(frozen=True)
class HealthReport:
    """One replica's health; build it with ``HealthReport.of`` so the status follows the
    dependencies and reasons."""

    service: str
    replica: str
    status: Status
    reasons: tuple[str, ...] = ()
    dependencies: tuple[Dependency, ...] = ()
    figures: Mapping[str, Figure] = field(default_factory=dict)
    detail: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def of(
        cls,
        service: str,
        replica: str,
        dependencies: Iterable[Dependency] = (),
        figures: Mapping[str, Figure] | None = None,
        detail: Mapping[str, Any] | None = None,
        *,
        stopping: bool = False,
        reasons: Iterable[str] = (),
        floor: Status = Status.OK,
    ) -> HealthReport:
        """The report whose status is the worst of ``floor``, the critical dependencies and a
        stop in progress (``not_serving`` from its first moment); each critical dependency that
        is not ok adds a reason."""
        deps = tuple(dependencies)
        counted = [d for d in deps if d.critical]
        why = list(reasons)
        for dep in counted:
            if dep.status is not Status.OK:
                why.append(f"{dep.name}: {dep.reason or dep.status.value}")
        status = worst([floor, *(d.status for d in counted)])
        if stopping:
            status = Status.NOT_SERVING
            why.insert(0, "stopping")
        return cls(service, replica, status, tuple(why), deps, dict(figures or {}),
                   dict(detail or {}))  # fmt: skip

    @property
    def serving(self) -> bool:
        return self.status is not Status.NOT_SERVING

    @property
    def http_status(self) -> int:
        return 200 if self.serving else 503

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "status": self.status.value,
            "service": self.service,
            "replica": self.replica,
            "reasons": list(self.reasons),
        }
        doc.update(self.detail)
        doc["dependencies"] = {d.name: d.to_json() for d in self.dependencies}
        doc["figures"] = dict(self.figures)
        return doc


HealthSource = Callable[[], HealthReport]


class Probe:
    """A dependency checked in the background (``check()`` raises when it is down), so that a
    health report never waits on the network: ``state`` is the last outcome and its reason."""

    def __init__(
        self,
        check: Callable[[], Awaitable[object]],
        *,
        interval_s: float = 1.0,
        timeout_s: float = 1.0,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        self._check = check
        self._interval_s = interval_s
        self._timeout_s = timeout_s
        self._clock = clock
        self.up: bool | None = None  # None until the first check finished
        self.reason = "not checked yet"

    async def check_once(self) -> bool:
        try:
            await asyncio.wait_for(self._check(), self._timeout_s)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self.up, self.reason = False, f"{type(exc).__name__}: {exc}"[:200]
        else:
            self.up, self.reason = True, ""
        return self.up

    async def run(self) -> None:
        while True:
            await self.check_once()
            await self._clock.asleep(self._interval_s)

    @contextlib.asynccontextmanager
    async def running(self) -> Any:
        """Check once, then keep checking until the block exits."""
        await self.check_once()
        task = asyncio.create_task(self.run(), name="health-probe")
        try:
            yield self
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
