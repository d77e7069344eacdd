"""Response-cache semantics on the in-memory store with a fake clock (deterministic, instant)."""

from __future__ import annotations

import asyncio

import pytest

from bridge.cache import CachePolicy, NotFound, ResponseCache
from bridge.store.memory import MemoryCacheStore
from bridge.xfetch import should_refresh_early
from pkg.common.clock import FakeClock


class Backend:
    """A loader that counts its calls and can be told to fail or report not-found."""

    def __init__(self) -> None:
        self.calls = 0
        self.value = "v1"
        self.fail: Exception | None = None
        self.missing = False
        self.gate: asyncio.Event | None = None

    async def load(self) -> str:
        self.calls += 1
        if self.gate is not None:
            await self.gate.wait()
        if self.fail is not None:
            raise self.fail
        if self.missing:
            raise NotFound()
        return self.value


POLICY = CachePolicy(ttl=10, stale=20, negative_ttl=3, error_grace=30)


def make(clock: FakeClock, rand: float = 1.0, **kw) -> ResponseCache:
    # rand=1.0 makes XFetch never fire early (log(1) = 0) unless a test asks for it.
    return ResponseCache(
        MemoryCacheStore(clock), policy=POLICY, clock=clock, rand=lambda: rand, **kw
    )


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_a_miss_loads_once_and_the_next_read_is_a_hit():
    clock, backend = FakeClock(), Backend()
    cache = make(clock)
    first = await cache.get("k", backend.load)
    second = await cache.get("k", backend.load)
    assert (first.status, first.value) == ("miss", "v1")
    assert (second.status, second.value) == ("hit", "v1")
    assert backend.calls == 1


async def test_an_entry_past_its_ttl_is_served_stale_while_one_background_refresh_runs():
    clock, backend = FakeClock(), Backend()
    cache = make(clock)
    await cache.get("k", backend.load)
    backend.value = "v2"
    clock.advance(11)
    results = [await cache.get("k", backend.load) for _ in range(5)]
    assert [r.status for r in results] == ["stale"] * 5
    assert all(r.value == "v1" for r in results)
    await settle()
    assert backend.calls == 2  # five stale reads, one refresh
    fresh = await cache.get("k", backend.load)
    assert (fresh.status, fresh.value) == ("hit", "v2")


async def test_an_entry_past_its_stale_window_is_a_miss():
    clock, backend = FakeClock(), Backend()
    cache = make(clock)
    await cache.get("k", backend.load)
    clock.advance(31)
    result = await cache.get("k", backend.load)
    assert result.status == "miss"
    assert backend.calls == 2


async def test_an_authoritative_not_found_is_cached_negatively_for_its_own_ttl():
    clock, backend = FakeClock(), Backend()
    backend.missing = True
    cache = make(clock)
    first = await cache.get("k", backend.load)
    second = await cache.get("k", backend.load)
    assert (first.found, first.status) == (False, "negative")
    assert (second.found, second.status) == (False, "negative")
    assert backend.calls == 1
    backend.missing = False
    clock.advance(3.1)
    third = await cache.get("k", backend.load)
    assert (third.found, third.value, third.status) == (True, "v1", "miss")


async def test_a_transient_error_is_not_cached():
    clock, backend = FakeClock(), Backend()
    backend.fail = RuntimeError("backend down")
    cache = make(clock)
    with pytest.raises(RuntimeError):
        await cache.get("k", backend.load)
    assert cache.stats.errors == 1
    backend.fail = None
    assert (await cache.get("k", backend.load)).status == "miss"
    assert backend.calls == 2


async def test_an_expired_entry_is_served_when_the_backend_fails():
    clock, backend = FakeClock(), Backend()
    cache = make(clock)
    await cache.get("k", backend.load)
    clock.advance(35)  # beyond ttl + stale, inside the error grace
    backend.fail = RuntimeError("backend down")
    result = await cache.get("k", backend.load)
    assert (result.status, result.value) == ("stale_error", "v1")


async def test_an_invalidated_entry_is_never_served_for_a_failing_backend():
    clock, backend = FakeClock(), Backend()
    cache = make(clock)
    await cache.get("k", backend.load, tags=["nodes"])
    await cache.invalidate(["nodes"])
    backend.fail = RuntimeError("backend down")
    with pytest.raises(RuntimeError):
        await cache.get("k", backend.load, tags=["nodes"])


async def test_concurrent_misses_in_one_process_share_one_backend_call():
    clock, backend = FakeClock(), Backend()
    backend.gate = asyncio.Event()
    cache = make(clock)
    tasks = [asyncio.create_task(cache.get("k", backend.load)) for _ in range(50)]
    await settle()
    backend.gate.set()
    results = await asyncio.gather(*tasks)
    assert backend.calls == 1
    assert {r.value for r in results} == {"v1"}


async def test_a_cancelled_caller_does_not_cancel_the_shared_load():
    clock, backend = FakeClock(), Backend()
    backend.gate = asyncio.Event()
    cache = make(clock)
    first = asyncio.create_task(cache.get("k", backend.load))
    second = asyncio.create_task(cache.get("k", backend.load))
    await settle()
    first.cancel()
    backend.gate.set()
    assert (await second).value == "v1"
    assert backend.calls == 1


async def test_invalidating_a_tag_makes_its_entries_miss_and_leaves_others_alone():
    clock, backend = FakeClock(), Backend()
    cache = make(clock)
    await cache.get("a", backend.load, tags=["tenant:acme"])
    await cache.get("b", backend.load, tags=["tenant:other"])
    await cache.invalidate(["tenant:acme"])
    assert (await cache.get("a", backend.load, tags=["tenant:acme"])).status == "miss"
    assert (await cache.get("b", backend.load, tags=["tenant:other"])).status == "hit"


async def test_xfetch_refreshes_a_fresh_entry_early_in_the_background():
    clock, backend = FakeClock(), Backend()

    async def slow() -> str:
        await clock.asleep(2.0)  # delta = 2 s of compute time recorded with the entry
        return await backend.load()

    cache = make(clock, rand=0.01)  # -ln(0.01) * 2 s = 9.2 s early window
    await cache.get("k", slow)
    clock.advance(2)  # 8 s of freshness left, inside the early window
    result = await cache.get("k", slow)
    assert result.status == "early" and result.value == "v1"
    await settle()
    await settle()
    assert backend.calls == 2


def test_xfetch_probability_grows_towards_expiry():
    # With the same random draw, a reader far from expiry keeps the entry, one close refreshes.
    assert not should_refresh_early(now=0, fresh_until=100, delta=1, beta=1, rand=0.5)
    assert should_refresh_early(now=99.5, fresh_until=100, delta=1, beta=1, rand=0.5)
    assert should_refresh_early(now=100, fresh_until=100, delta=0, beta=1, rand=0.9)


async def test_a_corrupt_entry_is_a_miss_not_an_error():
    clock, backend = FakeClock(), Backend()
    store = MemoryCacheStore(clock)
    cache = ResponseCache(store, policy=POLICY, clock=clock, rand=lambda: 1.0)
    await store.write("k", b"\x00not json", 60_000)
    result = await cache.get("k", backend.load)
    assert result.status == "miss" and result.value == "v1"


async def test_a_lock_is_extended_only_by_its_holder_and_only_while_held():
    clock = FakeClock()
    store = MemoryCacheStore(clock)
    assert await store.acquire("k", "mine", 300)
    assert not await store.extend("k", "theirs", 300)
    clock.advance(0.2)
    assert await store.extend("k", "mine", 300)  # now held until 0.5 s
    clock.advance(0.25)
    assert not await store.acquire("k", "theirs", 300)
    clock.advance(0.1)  # 0.55 s: lapsed
    assert not await store.extend("k", "mine", 300)
    assert await store.acquire("k", "theirs", 300)


class LostCancelStore(MemoryCacheStore):
    """A store whose lock renewal loses a cancellation, as redis-py's does on Python 3.11 when
    the cancel meets a reply already read (``asyncio.wait_for`` returns the result then)."""

    def __init__(self, clock: FakeClock) -> None:
        super().__init__(clock)
        self.extends = 0
        self.renewing = asyncio.Event()  # the first renewal is in flight
        self.reply = asyncio.Event()

    async def extend(self, key: str, token: str, ttl_ms: int) -> bool:
        self.extends += 1
        done = await super().extend(key, token, ttl_ms)
        if self.extends == 1:
            self.renewing.set()
            try:
                await self.reply.wait()
            except asyncio.CancelledError:
                pass  # the reply was there: the cancel is lost, the result returned
        return done


async def test_a_load_returns_at_once_when_its_lock_renewal_loses_the_cancel():
    clock = FakeClock()
    store = LostCancelStore(clock)
    backend = Backend()
    backend.gate = asyncio.Event()
    cache = ResponseCache(
        store, policy=POLICY, clock=clock, rand=lambda: 1.0, lock_ttl_s=60, lock_lease_s=0.5
    )
    call = asyncio.ensure_future(cache.get("k", backend.load))
    await asyncio.wait_for(store.renewing.wait(), 5)
    backend.gate.set()  # the load ends while the renewal's reply is being read
    loaded_at = clock.monotonic()
    result = await asyncio.wait_for(call, 5)
    assert result.status == "miss" and result.value == "v1"
    # The renewal stopped with the load: no renewing on until the lock TTL (60 s of the fake
    # clock, one renewal per 0.17 s), with the answer held back meanwhile.
    assert store.extends == 1
    assert clock.monotonic() - loaded_at < 0.5
