"""One writer per node: a load report that arrives while another write of the node waits on
the store is applied after that write, never lost under it (and without one, at once)."""

from __future__ import annotations

import asyncio

from api_balancing.fleet import Fleet, FleetSettings
from api_balancing.model import GeoPoint, LoadReport, NodeIdentity, NodeMode, NodeRecord
from api_balancing.scoring import Weights
from api_balancing.store.memory import MemoryNodeStore
from pkg.common.clock import FakeClock
from pkg.events import NullSink

IDENTITY = NodeIdentity("n1", frozenset({"edge"}), frozenset(), "http://n1", GeoPoint(1, 2), 10)
REPORT = LoadReport(12.0, 1, 2, 0, 0, 100)


class GatedStore(MemoryNodeStore):
    """An in-memory store whose ``put`` waits for the test to open the gate (a store round
    trip in flight); ``stage`` applies at once, as every store's does."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = asyncio.Event()
        self.gate.set()

    async def put(self, record: NodeRecord) -> NodeRecord:
        await self.gate.wait()
        return await super().put(record)

    async def stage(self, record: NodeRecord) -> NodeRecord:
        return await super().put(record)


async def test_a_report_during_another_write_of_the_node_is_applied_after_it() -> None:
    store = GatedStore()
    fleet = Fleet(store, FakeClock(), FleetSettings(weights=Weights()), NullSink())
    await fleet.register(IDENTITY)
    store.gate.clear()
    mode = asyncio.create_task(fleet.set_mode("n1", NodeMode.DRAINING, "maintenance soon"))
    await asyncio.sleep(0)  # set_mode read the record and waits on the store
    report = asyncio.create_task(fleet.accept_report("n1", REPORT))
    await asyncio.sleep(0)
    assert not report.done()  # waits for the node's other write
    store.gate.set()
    await asyncio.gather(mode, report)
    record = store.get("n1")
    assert record is not None
    assert record.mode is NodeMode.DRAINING and record.report == REPORT
    assert record.reports_accepted == 1


async def test_a_report_with_no_other_write_under_way_is_applied_at_once() -> None:
    store = GatedStore()
    fleet = Fleet(store, FakeClock(), FleetSettings(weights=Weights()), NullSink())
    await fleet.register(IDENTITY)
    stored = await fleet.accept_report("n1", REPORT)
    assert store.get("n1") is stored and stored.report == REPORT
    assert stored.reports_accepted == 1
