"""Fixtures for store failover tests: a Sentinel-managed Redis of its own per test (they kill,
pause and promote servers), with short Sentinel timings so a failover takes about a second."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from pkg.devstack.servers import RedisHA


@pytest.fixture
def redis_ha_factory(tmp_path: Path) -> Iterator[Callable[..., RedisHA]]:
    made: list[RedisHA] = []

    def make(**kwargs: object) -> RedisHA:
        options: dict[str, object] = {
            "replicas": 1,
            "down_after_ms": 500,
            "failover_timeout_ms": 2000,
            "min_replicas_to_write": 0,
        }
        options.update(kwargs)
        ha = RedisHA(tmp_path / f"redis-ha-{len(made)}", **options)  # type: ignore[arg-type]
        made.append(ha)
        ha.start()
        return ha

    try:
        yield make
    finally:
        for ha in made:
            ha.stop()
            ha.cleanup()
