"""The one lifecycle: steps undone newest first; a crashed background task is noticed."""

from __future__ import annotations

import asyncio

from pkg.common.app import Lifecycle


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


async def test_a_background_task_that_dies_is_reported() -> None:
    lc = Lifecycle("svc")

    async def boom() -> None:
        raise RuntimeError("sync loop broke")

    lc.spawn(boom(), "sync")
    crashed = await asyncio.wait_for(lc.wait_crash(), 2.0)
    assert isinstance(crashed, RuntimeError)
    await lc.close()
