"""Node ownership kept alive by the writes themselves: every report's write extends the owner
record in Redis; an explicit refresh happens only when writes stopped or one found the record
gone."""

from __future__ import annotations

from typing import Any

import pytest

from api_balancing.ha.ownership import NodeOwnership
from api_balancing.sessions import SessionRegistry
from pkg.common.clock import FakeClock
from tests.foghorn_ha.conftest import StoreFactory, make_record

pytestmark = pytest.mark.integration


async def _owned_node(store_factory: StoreFactory) -> tuple[Any, NodeOwnership, list[str], Any]:
    store = await store_factory("a")
    clock = FakeClock()
    ownership = NodeOwnership(store, SessionRegistry(), ttl_s=15.0, clock=clock)
    ownership.address = "127.0.0.1:1"
    explicit: list[str] = []
    refresh = ownership._owners.refresh

    async def counting(entity: str, record: Any) -> Any:
        explicit.append(entity)
        return await refresh(entity, record)

    ownership._owners.refresh = counting  # type: ignore[method-assign]
    fence = await ownership.acquire("n1")
    await store.put(make_record("n1", owner="a", fence=fence))
    return store, ownership, explicit, clock


async def test_writes_keep_the_owner_record_alive_without_explicit_refreshes(
    store_factory: StoreFactory,
) -> None:
    store, ownership, explicit, clock = await _owned_node(store_factory)
    for _ in range(5):
        clock.advance(4.0)  # more than ttl/3 in all, but each write is a refresh
        assert await ownership.refresh("n1")
        await store.put(make_record("n1", owner="a", fence=ownership.fence_of("n1") or 0))
    assert explicit == []
    assert 10_000 < await store.redis.pttl(store.keys.owner("n1")) <= 15_000
    clock.advance(5.0)  # no write for a third of the TTL: now Redis is asked
    assert await ownership.refresh("n1")
    assert explicit == ["n1"]


async def test_a_write_that_finds_the_owner_record_gone_makes_the_next_check_restore_it(
    store_factory: StoreFactory,
) -> None:
    store, ownership, explicit, _clock = await _owned_node(store_factory)
    key = store.keys.owner("n1")
    held = await store.redis.get(key)
    await store.redis.delete(key)  # lapsed (e.g. Redis lost it): writes still land
    await store.put(make_record("n1", owner="a", fence=ownership.fence_of("n1") or 0))
    assert not ownership.fresh("n1"), "the write reported that its touch missed"
    assert await ownership.refresh("n1")
    assert explicit == ["n1"] and await store.redis.get(key) == held, "restored at once"


async def test_a_node_taken_from_a_peer_that_never_released_it_names_that_peer(
    store_factory: StoreFactory,
) -> None:
    store_a, store_b = await store_factory("a"), await store_factory("b")
    a = NodeOwnership(store_a, SessionRegistry(), ttl_s=15.0)
    b = NodeOwnership(store_b, SessionRegistry(), ttl_s=15.0)
    told: list[str] = []
    b.on_unreleased(told.append)
    await a.acquire("n1")  # a owns n1 and then dies: its record stays until its TTL
    await b.acquire("n1")
    assert told == ["a"]

    await a.acquire("n2")
    await a.release("n2")  # a graceful hand-over: a let n2 go first
    await b.acquire("n2")
    await b.acquire("n3")  # nobody owned n3
    await b.acquire("n1")  # b registering its own node again names nobody
    assert told == ["a"]
