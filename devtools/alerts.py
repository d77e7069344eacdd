"""Reading the local Prometheus: its alerts and recorded figures (status view, drills).

Plain HTTP against the Prometheus API (``/api/v1/alerts``, ``/api/v1/query``) with short
timeouts: the status view redraws every second and a drill polls during a fault, so a slow or
absent Prometheus must cost little and never raise.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import urllib.parse
import urllib.request
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RULES_DIR = ROOT / "deploy" / "prometheus"
RULE_FILES = (RULES_DIR / "rules.yml", RULES_DIR / "alerts.yml")
# The local platform's clock for the rules: faults last seconds here, minutes in production
# (pkg.devstack.servers.scaled_rules).
DEV_TIME_SCALE = 1 / 20


@dataclass(frozen=True)
class Alert:
    name: str
    state: str  # "pending" or "firing"
    labels: dict[str, str]
    summary: str

    def describe(self) -> str:
        where = self.labels.get("instance") or self.labels.get("job") or ""
        return f"{self.name} [{self.labels.get('severity', '?')}] {where}: {self.summary}".strip()


def _get(url: str, timeout: float) -> Any:
    with urllib.request.urlopen(url, timeout=timeout) as reply:
        return json.loads(reply.read())


def alerts(prometheus_url: str, timeout: float = 0.5) -> list[Alert] | None:
    """Every pending or firing alert (None when Prometheus did not answer)."""
    try:
        doc = _get(f"{prometheus_url}/api/v1/alerts", timeout)
    except (OSError, ValueError):
        return None
    out = []
    for item in doc.get("data", {}).get("alerts", []):
        labels = dict(item.get("labels", {}))
        name = labels.pop("alertname", "?")
        summary = str(item.get("annotations", {}).get("summary", ""))
        out.append(Alert(name, str(item.get("state", "")), labels, summary))
    return out


def firing(prometheus_url: str, timeout: float = 0.5) -> list[Alert] | None:
    """The firing alerts only (None when Prometheus did not answer)."""
    found = alerts(prometheus_url, timeout)
    return None if found is None else [a for a in found if a.state == "firing"]


def recorded(prometheus_url: str, timeout: float = 0.5) -> dict[str, float]:
    """The recording rules' current values, ``{"job:metric:op{job}": value}`` ({} on error)."""
    query = urllib.parse.quote('{__name__=~"job:.+"}')
    try:
        doc = _get(f"{prometheus_url}/api/v1/query?query={query}", timeout)
    except (OSError, ValueError):
        return {}
    out: dict[str, float] = {}
    for item in doc.get("data", {}).get("result", []):
        metric = item.get("metric", {})
        try:
            value = float(item["value"][1])
        except (KeyError, IndexError, TypeError, ValueError):
            continue
        out[f"{metric.get('__name__', '?')}{{{metric.get('job', '')}}}"] = value
    return out


def scraped(prometheus_url: str, timeout: float = 0.5) -> bool:
    """True when Prometheus has targets and its last scrape of every one succeeded."""
    try:
        doc = _get(f"{prometheus_url}/api/v1/targets?state=active", timeout)
    except (OSError, ValueError):
        return False
    targets = doc.get("data", {}).get("activeTargets", [])
    return bool(targets) and all(t.get("health") == "up" for t in targets)


async def wait_scraped(prometheus_url: str, timeout_s: float, interval_s: float = 0.25) -> bool:
    """Wait (bounded) until ``scraped``; False when it never was."""
    deadline = time.monotonic() + timeout_s
    while not await asyncio.to_thread(scraped, prometheus_url):
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(interval_s)
    return True


class AlertWatch:
    """Polls ``/api/v1/alerts`` while a drill runs: which alerts fired, and when they resolved.

    ``start()`` at the fault; ``fired`` maps each alert name seen firing to the first time
    (monotonic) it was; ``wait_resolved`` then polls until the named alerts stop firing.
    """

    def __init__(self, prometheus_url: str, interval_s: float = 0.5) -> None:
        self.url = prometheus_url
        self.interval_s = interval_s
        self.fired: dict[str, float] = {}
        self.polls = 0
        self.failed_polls = 0
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._poll(), name="alert-watch")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def firing_now(self) -> set[str] | None:
        found = await asyncio.to_thread(firing, self.url, 2.0)
        self.polls += 1
        if found is None:
            self.failed_polls += 1
            return None
        now = time.monotonic()
        names = {a.name for a in found}
        for name in names:
            self.fired.setdefault(name, now)
        return names

    async def _poll(self) -> None:
        while True:
            await self.firing_now()
            await asyncio.sleep(self.interval_s)

    async def wait_fired(self, names: Iterable[str], timeout_s: float) -> None:
        """Wait (bounded) until each of ``names`` has been seen firing; needs ``start()``."""
        wanted = set(names)
        deadline = time.monotonic() + timeout_s
        while True:  # the poll task fills ``fired``
            if wanted <= self.fired.keys() or time.monotonic() >= deadline:
                return
            await asyncio.sleep(self.interval_s)

    async def wait_resolved(self, names: Iterable[str], timeout_s: float) -> set[str]:
        """Poll until none of ``names`` fires (bounded); returns those no longer firing."""
        wanted = set(names)
        deadline = time.monotonic() + timeout_s
        while True:
            now_firing = await self.firing_now()
            if now_firing is not None and not (wanted & now_firing):
                return wanted
            if time.monotonic() >= deadline:
                return wanted - (now_firing or wanted)
            await asyncio.sleep(self.interval_s)
