"""AsyncHttpClient over several replicas: picking, ejection, HTTP health re-admission and one
breaker per replica, against real HTTP server processes (``python -m http.server``) that are
killed and restarted on their port."""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from pkg.clients import (
    AsyncHttpClient,
    BreakerPolicy,
    OutlierPolicy,
    Policy,
    RetryPolicy,
    Runtime,
)
from pkg.devstack.servers import CommandProcess
from tests.clients.conftest import Outliers
from tests.waiting import eventually

pytestmark = [pytest.mark.integration, pytest.mark.failure]


def web(process_factory: Callable[..., CommandProcess], root: Path, name: str) -> CommandProcess:
    """A static HTTP server whose ``/who`` says ``name`` and whose ``/health`` says ok."""
    site = root / name
    site.mkdir()
    (site / "who").write_text(name)
    (site / "health").write_text("ok")
    command = [sys.executable, "-m", "http.server", "{port}", "--bind", "127.0.0.1"]
    return process_factory(f"web-{name}", [*command, "--directory", str(site)])


async def test_http_replicas_fail_over_and_a_restarted_one_is_health_checked_back(
    process_factory: Callable[..., CommandProcess], tmp_path: Path
) -> None:
    a = web(process_factory, tmp_path, "a")
    b = web(process_factory, tmp_path, "b")
    address_a, address_b = f"127.0.0.1:{a.port}", f"127.0.0.1:{b.port}"
    outliers = Outliers()
    runtime = Runtime(instrumentation=[outliers])
    policy = Policy(
        timeout=3.0,
        retry=RetryPolicy(max_attempts=3, base_backoff=0.01, max_backoff=0.05, attempt_timeout=0.5),
        breaker=BreakerPolicy(min_calls=4, window=30.0, open_duration=30.0),
        outlier=OutlierPolicy(base_ejection_time=30.0, health_check_interval=0.3),
    )
    client = AsyncHttpClient(
        "http://web.internal", policy, runtime=runtime, replicas=[address_a, address_b]
    )
    answers: list[str] = []
    failures: list[BaseException] = []

    async def traffic() -> None:
        while True:
            try:
                response = await client.get("/who")
                assert response.status_code == 200
                answers.append(response.text)
            except Exception as exc:
                failures.append(exc)
            await asyncio.sleep(0.01)

    task = asyncio.ensure_future(traffic())
    try:
        await eventually(lambda: set(answers[-10:]) == {"a", "b"}, timeout=10, what="both")
        a.kill()
        await eventually(
            lambda: any(e.ejected and e.replica == address_a for _, e in outliers.events),
            timeout=10,
            what="a ejected",
        )
        # No breaker for the whole set: a's own breaker takes a's failures, b's stays closed.
        assert not [name for name in runtime.breakers if "," in name or "web.internal" in name]
        assert runtime.breakers[f"http://{address_b}"].state == "closed"
        await asyncio.to_thread(a.start)
        back = time.monotonic()
        await eventually(
            lambda: any(
                not e.ejected and e.replica == address_a and e.reason == "health check: SERVING"
                for _, e in outliers.events
            ),
            timeout=10,
            what="a re-admitted by GET /health",
        )
        at = next(t for t, e in outliers.events if not e.ejected and e.replica == address_a)
        assert at - back < 2.0
        count = len(answers)
        await eventually(lambda: "a" in answers[count:], timeout=10, what="a answers again")
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await client.aclose()
    assert failures == [], failures[:3]
