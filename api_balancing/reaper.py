"""The periodic stale-node pass, one piece for the single instance and for HA.

Every ``interval_s`` it evicts nodes disconnected for longer than ``evict_after_s``
(``Fleet.reap_once``). A single instance runs every pass; replicas run it only while
``may_run()`` says so (the leader lease), with extra ``duties`` first (HA: marking the
orphans of dead replicas disconnected, so the pass can later evict them).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence

import structlog

from api_balancing.fleet import Fleet
from pkg.common.clock import SYSTEM_CLOCK, Clock

log = structlog.get_logger("foghorn.reaper")


class Reaper:
    """Runs the stale-node pass on a timer; a failed pass is logged and the next one runs."""

    def __init__(
        self,
        fleet: Fleet,
        interval_s: float,
        *,
        clock: Clock = SYSTEM_CLOCK,
        may_run: Callable[[], bool] = lambda: True,
        duties: Sequence[Callable[[], Awaitable[object]]] = (),
    ) -> None:
        self.fleet = fleet
        self.interval_s = interval_s
        self.may_run = may_run
        self.duties = list(duties)
        self._clock = clock
        self.passes = 0

    async def run(self) -> None:
        """Loop forever (until cancelled)."""
        while True:
            await self._clock.asleep(self.interval_s)
            if not self.may_run():
                continue
            try:
                await self.run_once()
            except asyncio.CancelledError:
                raise
            except Exception:  # keep reaping; a store or Redis hiccup must not kill the loop
                log.exception("reaper pass failed")

    async def run_once(self) -> list[str]:
        """One pass: the duties, then eviction; returns the evicted node ids."""
        for duty in self.duties:
            await duty()
        evicted = await self.fleet.reap_once()
        self.passes += 1
        return evicted
