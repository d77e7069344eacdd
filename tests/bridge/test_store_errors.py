"""Whatever a Redis round trip raises from the transport, Bridge falls back (never a 500)."""

from __future__ import annotations

from typing import Any

import pytest

from bridge.store.health import RedisHealth
from bridge.store.redis_store import RedisCacheStore, StoreUnavailable


class DeadTransportClient:
    """A client whose pooled socket was closed under it (what a partition leaves behind)."""

    def register_script(self, _script: str) -> Any:
        return None

    async def mget(self, _keys: list[str]) -> list[Any]:
        raise RuntimeError(
            "unable to perform operation on <TCPTransport closed=True reading=False>; "
            "the handler is closed"
        )


async def test_a_closed_transport_marks_redis_down_and_the_store_unavailable() -> None:
    client: Any = DeadTransportClient()
    health = RedisHealth(client)
    store = RedisCacheStore(client, health)
    with pytest.raises(StoreUnavailable, match="handler is closed"):
        await store.read("k", ["t"])
    assert not health.up and health.outages == 1
