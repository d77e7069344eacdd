"""The staging rules of write-behind load reports (``api_balancing.store.staging``), as pure
logic: records are plain strings, "sending" is ``take`` and "Redis answered" is ``finish``."""

from __future__ import annotations

import asyncio

import pytest

from api_balancing.store.staging import NodeWrites
from pkg.coord import FencedWriteRejected


async def test_a_newer_record_replaces_the_staged_one_before_it_is_sent() -> None:
    writes: NodeWrites[str] = NodeWrites()
    assert writes.stage("n1", "r1") is None
    assert writes.stage("n1", "r2") is None  # nothing in flight: no reason to wait
    assert writes.take(10) == [("n1", "r2")], "only the newest is written"
    assert writes.counters.coalesced == 1


async def test_a_node_never_has_two_writes_in_flight() -> None:
    writes: NodeWrites[str] = NodeWrites()
    writes.stage("n1", "r1")
    writes.stage("n2", "x1")
    assert writes.take(10) == [("n1", "r1"), ("n2", "x1")]
    writes.stage("n1", "r2")
    assert writes.take(10) == [], "r2 is held back while r1 travels"
    assert writes.in_flight("n1") and writes.staged("n1") == "r2"
    writes.finish("n1")
    assert writes.take(10) == [("n1", "r2")], "sent once r1's write ended"
    writes.finish("n1")
    writes.finish("n2")
    assert len(writes) == 0, "idle nodes keep nothing"


async def test_a_third_record_waits_while_one_is_in_flight_and_one_staged() -> None:
    writes: NodeWrites[str] = NodeWrites()
    writes.stage("n1", "r1")
    writes.take(10)
    assert writes.stage("n1", "r2") is None, "one staged behind the in-flight write is free"
    wait = writes.stage("n1", "r3")
    assert wait is not None and not wait.done(), "the third must wait (backpressure)"
    assert writes.staged("n1") == "r3", "and it replaced r2 (memory stays one record per node)"
    assert writes.counters.waits == 1
    writes.finish("n1")
    assert wait.done() and wait.exception() is None
    assert writes.take(10) == [("n1", "r3")]


async def test_the_in_flight_write_ending_wakes_the_waiter_even_when_it_was_refused() -> None:
    writes: NodeWrites[str] = NodeWrites()
    writes.stage("n1", "r1")
    writes.take(10)
    writes.stage("n1", "r2")
    wait = writes.stage("n1", "r3")
    assert wait is not None
    refusal = FencedWriteRejected("owner", 9)
    assert writes.drop_staged("n1", refusal) == "r3"
    told = writes.finish("n1", refusal)
    assert not told, "nobody asked for a confirmation: the caller must act on the refusal"
    assert wait.done() and wait.exception() is None, "backpressure waiters are only woken"
    assert writes.take(10) == [] and len(writes) == 0, "nothing more is written for the node"


async def test_a_confirmation_follows_its_record_into_the_write_that_replaced_it() -> None:
    writes: NodeWrites[str] = NodeWrites()
    writes.stage("n1", "r1")
    writes.take(10)
    confirmed = writes.stage("n1", "mode=draining", confirm=True)
    assert confirmed is not None
    writes.stage("n1", "r3")  # a newer whole record carries the mode change too
    writes.finish("n1")
    assert not confirmed.done(), "r1's write did not carry it"
    assert writes.take(10) == [("n1", "r3")]
    assert writes.finish("n1")
    assert confirmed.done() and confirmed.exception() is None


async def test_a_refused_write_fails_the_confirmations_it_carried() -> None:
    writes: NodeWrites[str] = NodeWrites()
    confirmed = writes.stage("n1", "register", confirm=True)
    assert confirmed is not None
    writes.take(10)
    refusal = FencedWriteRejected("state", 7)
    assert writes.finish("n1", refusal), "a waiting writer was told"
    with pytest.raises(FencedWriteRejected):
        await confirmed


async def test_a_cancelled_waiter_does_not_count_as_told() -> None:
    writes: NodeWrites[str] = NodeWrites()
    confirmed = writes.stage("n1", "register", confirm=True)
    assert confirmed is not None
    confirmed.cancel()
    writes.take(10)
    assert not writes.finish("n1", FencedWriteRejected("owner", 3))


async def test_ready_nodes_go_out_oldest_first_and_within_the_batch_bound() -> None:
    writes: NodeWrites[str] = NodeWrites()
    for i in range(5):
        writes.stage(f"n{i}", f"r{i}")
    writes.stage("n0", "r0b")  # replacing keeps n0's place in line
    assert [n for n, _ in writes.take(3)] == ["n0", "n1", "n2"]
    assert writes.ready_count() == 2
    assert [r for _, r in writes.take(3)] == ["r3", "r4"]
    assert not writes


async def test_many_nodes_under_a_burst_stay_bounded_to_one_staged_record_each() -> None:
    writes: NodeWrites[int] = NodeWrites()
    waits: list[asyncio.Future[None]] = []
    for k in range(50):  # 50 reports per node while Redis never answers
        for i in range(10):
            wait = writes.stage(f"n{i}", k)
            if wait is not None:
                waits.append(wait)
        writes.take(100)
    assert len(writes) == 10
    assert all(writes.staged(f"n{i}") == 49 for i in range(10))
    for i in range(10):
        writes.finish(f"n{i}")
    assert all(w.done() for w in waits)
