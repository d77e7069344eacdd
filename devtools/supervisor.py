"""Supervision of the local platform's processes: restart with exponential backoff, health polling.

``RestartPolicy`` is pure (time passed in) so its schedule is unit-tested with a fake clock:
1 s, 2 s, 4 s ... capped at 60 s, back to 1 s once a process has stayed healthy for
``reset_after`` seconds. ``Supervisor`` drives real ``CommandProcess`` objects by pid.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import structlog

from devtools.devtls import http_verify
from pkg.clients import BreakerPolicy, Policy
from pkg.clients.backoff import ceiling
from pkg.clients.http import HttpClient
from pkg.common.clock import SYSTEM_CLOCK, Clock
from pkg.devstack.servers import ServerProcess

log = structlog.get_logger("supervisor")


@dataclass
class RestartPolicy:
    """Exponential restart backoff that resets after a healthy stretch."""

    initial: float = 1.0
    factor: float = 2.0
    cap: float = 60.0
    reset_after: float = 30.0
    failures: int = 0
    healthy_since: float | None = None

    def __post_init__(self) -> None:
        if self.initial <= 0 or self.factor < 1 or self.cap < self.initial:
            raise ValueError("restart policy needs initial > 0, factor >= 1, cap >= initial")

    def on_exit(self) -> float:
        """The process died: returns how long to wait before the restart."""
        delay = ceiling(self.failures + 1, self.initial, self.cap, self.factor)
        self.failures += 1
        self.healthy_since = None
        return delay

    def on_health(self, healthy: bool, now: float) -> None:
        """Report a health observation; a long enough healthy stretch resets the backoff."""
        if not healthy:
            self.healthy_since = None
            return
        if self.healthy_since is None:
            self.healthy_since = now
        elif now - self.healthy_since >= self.reset_after:
            self.failures = 0


@dataclass
class Managed:
    """One supervised process and what the status view shows about it."""

    name: str
    proc: ServerProcess
    health_url: str | None = None
    kind: str = "service"  # "server" (redis, postgres, broker) or "service"
    policy: RestartPolicy = field(default_factory=RestartPolicy)
    restarts: int = 0
    state: str = "starting"
    restart_at: float | None = None
    health: dict[str, Any] = field(default_factory=dict)
    supervise: bool = True

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc.running else None


_HEALTH_CLIENT: HttpClient | None = None


def fetch_health(url: str, timeout: float = 0.5, token: str | None = None) -> dict[str, Any]:
    """GET a service's /health JSON through pkg.clients (one attempt: a probe must not retry).

    ``token``: an operator credential, for the full document (figures, dependencies); without
    one, services answer only ok/degraded."""
    global _HEALTH_CLIENT
    if _HEALTH_CLIENT is None:
        policy = Policy.no_retries(timeout=timeout)
        _HEALTH_CLIENT = HttpClient(
            policy=replace(policy, breaker=BreakerPolicy(enabled=False)), verify=http_verify()
        )
    try:
        headers = {"authorization": f"Bearer {token}"} if token else None
        response = _HEALTH_CLIENT.get(url, timeout=timeout, headers=headers)
    except Exception:  # connection refused, timeout: the process is not answering
        return {"status": "unreachable"}
    try:
        body = response.json()
    except ValueError:
        return {"status": f"http {response.status_code}"}
    return body if isinstance(body, dict) else {"status": f"http {response.status_code}"}


def is_healthy(health: dict[str, Any]) -> bool:
    return health.get("status") in ("ok", "serving")


class Supervisor:
    """Starts processes in order, restarts crashed ones with backoff, stops all in reverse."""

    def __init__(
        self,
        clock: Clock = SYSTEM_CLOCK,
        health_fetcher: Callable[[str], dict[str, Any]] = fetch_health,
    ) -> None:
        self.clock = clock
        self.items: list[Managed] = []
        self._fetch = health_fetcher
        self.events: list[str] = []

    def add(self, item: Managed, start: bool = True, wait: bool = True) -> Managed:
        self.items.append(item)
        if start:
            item.proc.start(wait=wait)
            item.state = "running"
            self._event(f"{item.name} started (pid {item.proc.pid})")
        return item

    def _event(self, text: str) -> None:
        stamp = time.strftime("%H:%M:%S")
        self.events.append(f"{stamp} {text}")
        del self.events[:-8]
        log.info("supervisor", message=text)

    def tick(self) -> None:
        """One supervision round: detect exits, run due restarts, poll health."""
        now = self.clock.monotonic()
        for item in self.items:
            if not item.supervise:
                continue
            if item.restart_at is not None:
                if now >= item.restart_at:
                    item.restart_at = None
                    try:
                        item.proc.start(wait=False)
                        item.restarts += 1
                        item.state = "running"
                        self._event(f"{item.name} restarted (pid {item.proc.pid})")
                    except Exception as exc:  # the restart itself failed: back off again
                        delay = item.policy.on_exit()
                        item.restart_at = now + delay
                        self._event(f"{item.name} restart failed ({exc}); retry in {delay:.0f}s")
                continue
            proc = item.proc.proc
            if item.state == "running" and (proc is None or proc.poll() is not None):
                code = None if proc is None else proc.returncode
                item.proc.proc = None
                delay = item.policy.on_exit()
                item.restart_at = now + delay
                item.state = "backoff"
                self._event(f"{item.name} exited ({code}); restart in {delay:.0f}s")
                continue
            if item.health_url and item.state == "running":
                item.health = self._fetch(item.health_url)
                item.policy.on_health(is_healthy(item.health), now)

    def all_healthy(self) -> bool:
        """Every supervised process with a health check is running and says it is healthy."""
        checked = [i for i in self.items if i.health_url and i.supervise]
        return bool(checked) and all(i.state == "running" and is_healthy(i.health) for i in checked)

    def stop_all(self) -> None:
        for item in reversed(self.items):
            item.supervise = False
            try:
                item.proc.stop(timeout=10)
            except Exception as exc:  # keep stopping the rest
                log.warning("stop failed", name=item.name, error=str(exc))
            item.state = "stopped"
