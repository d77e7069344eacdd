"""In-process singleflight: concurrent callers for one key share one in-flight call.

The call runs in its own task, so a caller that is cancelled (client went away) neither cancels
the shared call nor the other waiters.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable, Callable
from typing import Any, Generic, TypeVar

T = TypeVar("T")


class SingleFlight(Generic[T]):
    """Deduplicate concurrent ``do(key, fn)`` calls per key."""

    def __init__(self) -> None:
        self._flights: dict[str, asyncio.Future[T]] = {}

    def in_flight(self, key: str) -> bool:
        return key in self._flights

    async def do(self, key: str, fn: Callable[[], Awaitable[T]]) -> T:
        """Run ``fn`` unless a call for ``key`` is already running; either way return its result."""
        fut = self._flights.get(key)
        if fut is None:
            task: asyncio.Task[T] = asyncio.ensure_future(self._run(fn))
            self._flights[key] = task
            task.add_done_callback(functools.partial(self._forget, key))
            fut = task
        return await asyncio.shield(fut)

    async def _run(self, fn: Callable[[], Awaitable[T]]) -> T:
        return await fn()

    def _forget(self, key: str, fut: asyncio.Future[Any]) -> None:
        if self._flights.get(key) is fut:
            del self._flights[key]
        if not fut.cancelled():
            fut.exception()  # mark retrieved: waiters got it, no "never retrieved" warning
