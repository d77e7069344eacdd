"""The stale-node reaper: one timer loop for the single instance and, under the lease, HA."""

from __future__ import annotations

import asyncio
import dataclasses

from api_balancing.fleet import Fleet, FleetSettings
from api_balancing.model import GeoPoint, NodeIdentity
from api_balancing.reaper import Reaper
from api_balancing.scoring import Weights
from api_balancing.store.memory import MemoryNodeStore
from pkg.common.clock import FakeClock
from pkg.events import NullSink
from tests.waiting import eventually


async def _fleet_with_a_disconnected_node(clock: FakeClock) -> Fleet:
    fleet = Fleet(MemoryNodeStore(), clock, FleetSettings(weights=Weights()), NullSink())
    identity = NodeIdentity("n1", frozenset({"edge"}), frozenset(), "http://n1", GeoPoint(1, 2), 10)
    record = await fleet.register(identity)
    await fleet.store.put(
        dataclasses.replace(record, connected=False, disconnected_at=clock.time())
    )
    return fleet


async def test_the_reaper_evicts_on_its_timer_and_outlives_a_failed_pass() -> None:
    clock = FakeClock()
    fleet = await _fleet_with_a_disconnected_node(clock)
    failures = [RuntimeError("redis hiccup")]

    async def flaky_duty() -> None:
        if failures:
            raise failures.pop()

    reaper = Reaper(fleet, 5.0, clock=clock, duties=[flaky_duty])
    task = asyncio.create_task(reaper.run())
    try:
        await eventually(lambda: fleet.store.get("n1") is None, what="eviction")
        assert clock.monotonic() - 1_000.0 >= 300, "not before evict_after_s"
        assert not failures and reaper.passes >= 1
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_a_replica_reaps_only_while_it_may() -> None:
    clock = FakeClock()
    fleet = await _fleet_with_a_disconnected_node(clock)
    leading = False
    reaper = Reaper(fleet, 5.0, clock=clock, may_run=lambda: leading)
    task = asyncio.create_task(reaper.run())
    try:
        await eventually(lambda: clock.monotonic() > 2_000.0, what="time passing")
        assert reaper.passes == 0 and fleet.store.get("n1") is not None
        leading = True
        await eventually(lambda: fleet.store.get("n1") is None, what="eviction by the leader")
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
