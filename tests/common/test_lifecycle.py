"""The one lifecycle: steps undone newest first; a crashed background task is noticed."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys

import pytest
from structlog.testing import capture_logs

from pkg.common import app
from pkg.common.app import SLOW_STOP_STEP_S, Lifecycle, loop_factory


async def test_steps_are_undone_in_reverse_order_and_tasks_cancelled() -> None:
    lc = Lifecycle("svc")
    done: list[str] = []

    async def undo(name: str) -> None:
        done.append(name)

    async def forever() -> None:
        try:
            await asyncio.Event().wait()
        finally:
            done.append("task")

    lc.on_stop(undo, "store")
    lc.on_stop(undo, "grpc")
    lc.spawn(forever(), "loop")
    lc.on_stop(undo, "http")
    await asyncio.sleep(0)
    await lc.close()
    assert done == ["http", "task", "grpc", "store"]
    assert lc.crashed is None


async def test_a_slow_stop_step_is_logged_with_its_name() -> None:
    lc = Lifecycle("svc")

    async def flush_history() -> None:
        await asyncio.sleep(SLOW_STOP_STEP_S + 0.05)

    async def quick() -> None:
        return None

    async def unwinds_slowly() -> None:
        try:
            await asyncio.Event().wait()
        finally:
            await asyncio.shield(asyncio.sleep(SLOW_STOP_STEP_S + 0.05))

    lc.on_stop(flush_history)
    lc.on_stop(quick)
    lc.spawn(unwinds_slowly(), "duties")
    await asyncio.sleep(0)
    with capture_logs() as logs:
        await lc.close()
    slow = [e for e in logs if e["event"] == "stop_step_slow"]
    assert [e["step"] for e in slow] == ["cancel svc-duties", flush_history.__qualname__]
    assert all(e["service"] == "svc" and e["took_s"] >= SLOW_STOP_STEP_S for e in slow)
    assert any("unwinds_slowly" in frame for frame in slow[0]["suspended_at"])


async def test_a_background_task_that_dies_is_reported() -> None:
    lc = Lifecycle("svc")

    async def boom() -> None:
        raise RuntimeError("sync loop broke")

    lc.spawn(boom(), "sync")
    crashed = await asyncio.wait_for(lc.wait_crash(), 2.0)
    assert isinstance(crashed, RuntimeError)
    await lc.close()


# A service that records the loop it was started on, then stops itself (a crashed task: exit 1).
_RECORD_LOOP = """
import asyncio, sys
from pkg.common.app import Lifecycle, run_main

class App:
    def __init__(self, config):
        self.lifecycle = Lifecycle("t")
    async def start(self):
        print(type(asyncio.get_running_loop()).__module__, flush=True)
        self.lifecycle.spawn(self.end(), "end")
    async def end(self):
        raise RuntimeError("done")
    async def stop(self):
        await self.lifecycle.close()
    def health(self):
        raise NotImplementedError

sys.exit(run_main("t", lambda: sys.argv[1], App, event_loop=lambda name: name))
"""


@pytest.mark.parametrize(("name", "module"), [("uvloop", "uvloop"), ("asyncio", "asyncio")])
def test_a_service_runs_on_the_event_loop_its_config_names(name: str, module: str) -> None:
    done = subprocess.run(
        [sys.executable, "-c", _RECORD_LOOP, name],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1, done.stderr
    assert done.stdout.split()[0].startswith(module)


def test_an_unknown_event_loop_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match="trio"):
        loop_factory("trio")


async def test_a_task_that_lost_its_cancel_is_cancelled_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Python 3.11's wait_for returns an inner result that was ready instead of raising the
    # cancel (seen with redis-py reads): a loop then runs on as if never cancelled.
    monkeypatch.setattr(app, "RECANCEL_AFTER_S", 0.05)
    lc = Lifecycle("svc")
    rounds: list[int] = []

    async def loop_that_misses_one_cancel() -> None:
        lost = False
        while True:
            rounds.append(1)
            try:
                await asyncio.sleep(0.01)
            except asyncio.CancelledError:
                if lost:
                    raise
                lost = True  # swallowed, as the lost cancel is

    lc.spawn(loop_that_misses_one_cancel(), "renewal")
    await asyncio.sleep(0.03)
    with capture_logs() as logs:
        await asyncio.wait_for(lc.close(), 2)
    assert [e["attempt"] for e in logs if e["event"] == "task_cancel_lost"] == [1]
    assert not lc._tasks


async def test_a_task_that_never_stops_does_not_hold_the_stop_for_ever(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(app, "RECANCEL_AFTER_S", 0.02)
    lc = Lifecycle("svc")
    stop = asyncio.Event()

    async def deaf() -> None:
        while not stop.is_set():
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.sleep(0.005)

    task = lc.spawn(deaf(), "deaf")
    await asyncio.sleep(0.01)
    with capture_logs() as logs:
        await asyncio.wait_for(lc.close(), 2)
    assert [e["task"] for e in logs if e["event"] == "task_not_stopping"] == ["svc-deaf"]
    stop.set()
    await task
