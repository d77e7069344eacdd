"""SharedEvents: a tenant's subscriptions share one upstream stream (pure logic, fake upstream)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import pytest

from api_gateway.backend import BackendError, Json
from api_gateway.fanout import SharedEvents


class Upstream:
    """A fake Signalman: one queue per open stream; records every subscribe."""

    def __init__(self) -> None:
        self.opened: list[tuple[str, list[str]]] = []
        self.open = 0
        self.queues: dict[str, asyncio.Queue[Json | BaseException]] = {}

    async def subscribe(self, tenant: str, channels: list[str]) -> AsyncIterator[Json]:
        self.opened.append((tenant, channels))
        self.open += 1
        queue = self.queues.setdefault(tenant, asyncio.Queue())
        try:
            while True:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            self.open -= 1

    def emit(self, tenant: str, etype: str, n: int = 0) -> None:
        self.queues[tenant].put_nowait({"type": etype, "channel": "all", "id": str(n)})


async def _next(stream: AsyncIterator[Json]) -> Json:
    return await asyncio.wait_for(anext(stream), 2)


async def _settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_subscriptions_of_a_tenant_share_one_upstream_and_get_their_channels() -> None:
    up = Upstream()
    shared = SharedEvents(up)
    streams = shared.subscribe("acme", ["streams"])
    everything = shared.subscribe("acme", ["all"])
    first = asyncio.create_task(_next(streams))
    second = asyncio.create_task(_next(everything))
    await _settle()
    up.emit("acme", "node.updated", 1)
    up.emit("acme", "stream.started", 2)
    assert (await first)["id"] == "2" and (await first)["channel"] == "streams"
    got = await second
    assert (got["id"], got["channel"]) == ("1", "all")
    assert up.opened == [("acme", ["all"])] and shared.upstream_streams() == 1
    await streams.aclose()  # type: ignore[attr-defined]
    await _settle()
    assert up.open == 1  # the other one still reads
    await everything.aclose()  # type: ignore[attr-defined]
    await _settle()
    assert up.open == 0 and shared.upstream_streams() == 0


async def test_the_cap_per_tenant_is_a_non_retryable_error_and_others_are_unaffected() -> None:
    up = Upstream()
    shared = SharedEvents(up, max_per_tenant=1)
    held = shared.subscribe("acme", ["all"])
    task = asyncio.create_task(_next(held))
    await _settle()
    with pytest.raises(BackendError) as refused:
        await _next(shared.subscribe("acme", ["nodes"]))
    assert refused.value.code == "SUBSCRIPTION_LIMIT"
    other = asyncio.create_task(_next(shared.subscribe("globex", ["all"])))
    await _settle()
    up.emit("globex", "stream.started")
    assert (await other)["type"] == "stream.started"
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def test_a_slow_subscription_is_ended_without_holding_back_the_others() -> None:
    up = Upstream()
    shared = SharedEvents(up, buffer=2)
    slow, fast = shared.subscribe("acme", ["all"]), shared.subscribe("acme", ["all"])
    first = asyncio.create_task(_next(slow))
    fast_first = asyncio.create_task(_next(fast))
    await _settle()
    for n in range(5):
        up.emit("acme", "stream.started", n)
        await _settle()
        if n == 0:
            await first
            await fast_first
        else:
            assert (await _next(fast))["id"] == str(n)  # the fast one keeps up
    seen: list[Any] = []
    with pytest.raises(BackendError) as ended:
        while True:
            seen.append(await _next(slow))
    assert ended.value.code == "SLOW_SUBSCRIBER" and len(seen) <= 2


async def test_an_upstream_failure_reaches_every_subscription_and_a_new_one_reconnects() -> None:
    up = Upstream()
    shared = SharedEvents(up)
    a, b = shared.subscribe("acme", ["all"]), shared.subscribe("acme", ["nodes"])
    ta, tb = asyncio.create_task(_next(a)), asyncio.create_task(_next(b))
    await _settle()
    up.queues["acme"].put_nowait(BackendError("BACKEND_UNAVAILABLE", "Signalman is unavailable"))
    for task in (ta, tb):
        with pytest.raises(BackendError) as failed:
            await task
        assert failed.value.code == "BACKEND_UNAVAILABLE"
    again = asyncio.create_task(_next(shared.subscribe("acme", ["all"])))
    await _settle()
    up.emit("acme", "stream.ended")
    assert (await again)["type"] == "stream.ended" and len(up.opened) == 2


async def test_an_unknown_channel_is_refused_before_any_stream_opens() -> None:
    up = Upstream()
    with pytest.raises(BackendError) as refused:
        await _next(SharedEvents(up).subscribe("acme", ["system"]))
    assert refused.value.code == "BAD_USER_INPUT" and up.opened == []
