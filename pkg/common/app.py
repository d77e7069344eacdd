"""The one service lifecycle: start in order, serve, stop in reverse order; and the process
entry every service's ``__main__`` calls.

A service's app object (``FoghornApp``, ``BridgeApp``, ``SignalmanApp``) builds its parts from
its frozen config in ``__init__`` (no I/O), and in ``start()`` brings them up one by one through
a ``Lifecycle``: each step registers how to undo it, and ``stop()`` undoes them in reverse order
(``contextlib.AsyncExitStack``), so a step that fails half-way leaves nothing behind. Background
tasks started through the lifecycle are cancelled at stop; one that dies of an exception stops
the process (exit status 1) so that the supervisor restarts it, instead of a replica running on
without, say, its sync loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
import time
from collections.abc import Awaitable, Callable, Coroutine
from contextlib import AbstractAsyncContextManager
from typing import Any, Protocol, TypeVar

import structlog

from pkg.common.config import ConfigError
from pkg.common.health import HealthReport
from pkg.common.logging import configure_logging
from pkg.common.telemetry import setup_metrics

log = structlog.get_logger("pkg.common.app")

# A stop step taking at least this long is logged (``stop_step_slow``) with its name, so that
# where a replica's stop spends its time can be read from its log.
SLOW_STOP_STEP_S = 0.25
# A task still running this long after its cancel is cancelled again, at most this many times
# (see Lifecycle._cancel).
RECANCEL_AFTER_S = 2.0
RECANCEL_TRIES = 5

C = TypeVar("C")
T = TypeVar("T")


class Service(Protocol):
    """What the process entry and the tests drive: the same three verbs for every service."""

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    def health(self) -> HealthReport: ...


class Lifecycle:
    """Ordered start-up with reverse-order stop (see the module docstring)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._stack = contextlib.AsyncExitStack()
        self._tasks: set[asyncio.Task[Any]] = set()
        self.stopping = False
        self.crashed: BaseException | None = None
        self._crash = asyncio.Event()

    async def enter(self, cm: AbstractAsyncContextManager[T]) -> T:
        """Enter ``cm`` now; it exits at stop (before everything entered earlier)."""
        return await self._stack.enter_async_context(cm)

    def on_stop(self, callback: Callable[..., Awaitable[Any]], *args: Any) -> None:
        """Await ``callback(*args)`` at stop, before the steps registered earlier."""
        name = getattr(callback, "__qualname__", repr(callback))
        self._stack.push_async_callback(self._timed, name, callback, *args)

    async def _timed(self, step: str, callback: Callable[..., Awaitable[Any]], *args: Any) -> None:
        started = time.monotonic()
        try:
            await callback(*args)
        finally:
            took = time.monotonic() - started
            if took >= SLOW_STOP_STEP_S:
                log.info("stop_step_slow", service=self.name, step=step, took_s=round(took, 3))

    def spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]:
        """Run ``coro`` until stop (cancelled then, in reverse order with the other steps)."""
        task = asyncio.create_task(coro, name=f"{self.name}-{name}")
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        self._stack.push_async_callback(self._cancel_timed, task)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if task.cancelled() or self.stopping:
            return
        exc = task.exception()
        if exc is not None:
            log.error("background task died", service=self.name, task=task.get_name(),
                      error=repr(exc))  # fmt: skip
            self.crashed = exc
            self._crash.set()

    async def _cancel_timed(self, task: asyncio.Task[Any]) -> None:
        """Cancel ``task``; when its unwinding is slow, log where it was suspended (the
        innermost awaits: what held the stop)."""
        where = suspended_at(task)
        started = time.monotonic()
        await self._cancel(task)
        took = time.monotonic() - started
        if took >= SLOW_STOP_STEP_S:
            log.info("stop_step_slow", service=self.name, step=f"cancel {task.get_name()}",
                     took_s=round(took, 3), suspended_at=where)  # fmt: skip

    @staticmethod
    async def _cancel(task: asyncio.Task[Any]) -> None:
        """Cancel ``task`` and wait for it, cancelling again while it runs on: on Python 3.11 a
        cancel can be lost (``asyncio.wait_for`` returns the inner result instead of raising
        when the cancel meets a reply already read, as redis-py's reads do), and a loop that
        missed its cancel would hold the stop for ever. Each wait gives the task's own cleanup
        ``RECANCEL_AFTER_S``; after ``RECANCEL_TRIES`` the stop goes on without it."""
        task.cancel()
        for attempt in range(1, RECANCEL_TRIES + 1):
            done, _ = await asyncio.wait({task}, timeout=RECANCEL_AFTER_S)
            if done:
                break
            log.warning("task_cancel_lost", task=task.get_name(), attempt=attempt,
                        suspended_at=suspended_at(task))  # fmt: skip
            task.cancel()
        else:
            log.error("task_not_stopping", task=task.get_name(), suspended_at=suspended_at(task))
            return
        with contextlib.suppress(BaseException):
            await task

    async def wait_crash(self) -> BaseException | None:
        """Return once a background task died of an exception."""
        await self._crash.wait()
        return self.crashed

    async def close(self) -> None:
        """Undo every step, newest first (idempotent)."""
        self.stopping = True
        await self._stack.aclose()


def suspended_at(task: asyncio.Task[Any] | None, depth: int = 4) -> list[str]:
    """The innermost ``depth`` coroutine frames ``task`` is suspended in (function:line), for a
    log line saying what held something up; [] for no task or a finished one."""
    if task is None or task.done():
        return []
    frames: list[str] = []
    coro: Any = task.get_coro()
    while coro is not None:
        frame = getattr(coro, "cr_frame", None) or getattr(coro, "gi_frame", None)
        if frame is not None:
            frames.append(f"{frame.f_code.co_qualname}:{frame.f_lineno}")
        coro = getattr(coro, "cr_await", None) or getattr(coro, "gi_yieldfrom", None)
    return frames[-depth:]


async def serve(service: Service, lifecycle: Lifecycle, started: Callable[[], None]) -> int:
    """Start ``service``, serve until SIGINT/SIGTERM or a crashed background task, stop."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await service.start()
    started()
    waiters = [
        asyncio.create_task(stop.wait(), name="stop-signal"),
        asyncio.create_task(lifecycle.wait_crash(), name="crash-watch"),
    ]
    try:
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()
        await service.stop()
    return 1 if lifecycle.crashed is not None else 0


class Runnable(Service, Protocol):
    @property
    def lifecycle(self) -> Lifecycle: ...


A = TypeVar("A", bound=Runnable)


EVENT_LOOPS = ("asyncio", "uvloop")


def loop_factory(name: str) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """The event loop a process runs on: ``asyncio``'s own (None) or ``uvloop``'s (libuv, the
    loop uvicorn picks by default; installed with ``uvicorn[standard]``)."""
    if name == "asyncio":
        return None
    if name == "uvloop":
        import uvloop

        return uvloop.new_event_loop
    raise ValueError(f"event loop must be one of {', '.join(EVENT_LOOPS)}, got {name!r}")


def run_main(
    name: str,
    load_config: Callable[[], C],
    build: Callable[[C], A],
    started: Callable[[A], None] = lambda _app: None,
    event_loop: Callable[[C], str] = lambda _config: "asyncio",
) -> int:
    """The body of every service's ``main()``: logging, config (refused with exit status 2 and
    the variable's name), metrics, then serve until a signal on the loop ``event_loop(config)``
    names (``loop_factory``)."""
    configure_logging(name)
    try:
        config = load_config()
    except (ConfigError, ValueError) as exc:
        return _refuse(name, exc)
    setup_metrics(name)

    async def main() -> int:
        try:  # built on the loop: parts may create asyncio objects
            app = build(config)
        except (ConfigError, ValueError, OSError) as exc:
            return _refuse(name, exc)
        return await serve(app, app.lifecycle, lambda: started(app))

    try:
        with asyncio.Runner(loop_factory=loop_factory(event_loop(config))) as runner:
            return runner.run(main())
    except OSError as exc:
        structlog.get_logger(name).error("cannot start", error=str(exc))
        return 1
    except KeyboardInterrupt:
        return 0


def _refuse(name: str, exc: Exception) -> int:
    print(f"{name}: bad configuration: {exc}", file=sys.stderr, flush=True)
    return 2
