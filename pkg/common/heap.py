"""Short garbage-collector pauses for a service whose long-lived heap grows while it runs.

CPython's cyclic collector stops the process for as long as a collection of the oldest
generation takes to scan every tracked object outside the permanent generation. A service that
freezes its start-up heap (``gc.freeze``) but then holds thousands of long-lived objects made at
run time, such as Signalman's subscriber sessions (each with its tasks, queue, subscriptions and
gRPC call), scans all of them at every full collection: at 5,000 subscribers per replica one
took 0.9 s (``./dev bench signalman-fanout --stages``, 02:05 UTC, load ~5), a stop of every
delivery on that replica, once in each 4 s phase.

``HeapKeeper`` freezes the heap when the count of such objects has grown (a burst of
subscribers connected): ``gc.freeze`` moves every tracked object to the permanent generation in
constant time, so later collections scan only what was made since. Frozen objects are still
freed by reference counting when they are done with; only reference cycles among them wait for
a sweep (``gc.unfreeze`` then a full collection, as long as one used to take), which the
keeper runs ``sweep_every_s`` after the first freeze since the last sweep, and never without
one.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable

import structlog

from pkg.common.clock import SYSTEM_CLOCK, Clock

log = structlog.get_logger("pkg.common.heap")

# Collections of the youngest generation every 50,000 net allocations instead of 700, and of
# the oldest after 100 of the middle one instead of 10 (as Foghorn's replicas do): almost all
# of a service's garbage is freed by reference counting.
THRESHOLDS = (50_000, 20, 100)


def tune_gc(thresholds: tuple[int, int, int] = THRESHOLDS) -> None:
    """After start-up: collect once, freeze what is left (modules, clients, descriptors) out
    of every later scan, and make collections rarer."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*thresholds)


class HeapKeeper:
    """Freezes the heap after the count of long-lived objects ``held()`` grew by ``min_growth``
    and by ``growth`` (a fraction) since the last freeze; sweeps frozen cycles ``sweep_every_s``
    after the first freeze since the last sweep. Call ``check`` now and then (``run`` does,
    every ``check_every_s``)."""

    def __init__(
        self,
        held: Callable[[], int],
        *,
        min_growth: int = 200,
        growth: float = 0.1,
        check_every_s: float = 2.0,
        sweep_every_s: float = 3600.0,
        clock: Clock = SYSTEM_CLOCK,
        freeze: Callable[[], None] = gc.freeze,
        unfreeze: Callable[[], None] = gc.unfreeze,
        collect: Callable[[], object] = gc.collect,
    ) -> None:
        self.held = held
        self.min_growth = min_growth
        self.growth = growth
        self.check_every_s = check_every_s
        self.sweep_every_s = sweep_every_s
        self.clock = clock
        self._freeze, self._unfreeze, self._collect = freeze, unfreeze, collect
        self.base = held()  # the count at the last freeze, or the lowest since
        self.freezes = 0
        self.sweeps = 0
        self._frozen_since_sweep = False
        self._first_freeze = 0.0  # (monotonic) of the first freeze since the last sweep

    def check(self) -> str | None:
        """Freeze, sweep or nothing: what was done ("freeze", "sweep" or None)."""
        now = self.clock.monotonic()
        if self._frozen_since_sweep and now - self._first_freeze >= self.sweep_every_s:
            started = time.perf_counter()
            self._unfreeze()
            found = self._collect()
            self._freeze()
            self.sweeps += 1
            self._frozen_since_sweep = False
            self.base = self.held()
            log.info(
                "heap_swept", found=found, took_ms=round((time.perf_counter() - started) * 1e3)
            )
            return "sweep"
        count = self.held()
        if count - self.base >= max(self.min_growth, self.growth * self.base):
            self._freeze()
            self.freezes += 1
            if not self._frozen_since_sweep:
                self._frozen_since_sweep, self._first_freeze = True, now
            self.base = count
            return "freeze"
        self.base = min(self.base, count)  # regrowth after a fall counts from the low point
        return None

    async def run(self) -> None:
        while True:
            await self.clock.asleep(self.check_every_s)
            self.check()
