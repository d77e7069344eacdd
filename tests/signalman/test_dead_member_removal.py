"""A killed replica's partitions move before its session expires: the survivor sees its lock
connection gone in PostgreSQL and removes it from the consumer group (real tansu, PostgreSQL,
Redis and replica processes)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from pkg.devstack.servers import CommandProcess
from tests.signalman.conftest import wait_until
from tests.signalman.replica_cluster import (
    PARTITIONS,
    Cluster,
    open_cluster,
    owns_all,
    split_settled,
)

pytestmark = [pytest.mark.integration, pytest.mark.failure]

# tansu holds every join for half the session timeout: after a kill, the session expiry moves the
# partitions in 12 + 6 s, a removal in about 0.5 + 6 s. The waits below end before 12 s, so only
# a removal can pass them (and a wrong removal of a live replica would show within them).
SESSION_TIMEOUT_MS = 12_000
WITHIN_S = SESSION_TIMEOUT_MS / 1000 - 1


@pytest.fixture
async def cluster(
    kafka_broker: Any,
    redis_server: Any,
    postgres_server: Any,
    process_factory: Callable[..., CommandProcess],
) -> AsyncIterator[Cluster]:
    async with open_cluster(
        kafka_broker, redis_server, postgres_server, process_factory,
        SIGNALMAN_SESSION_TIMEOUT_MS=str(SESSION_TIMEOUT_MS),
        SIGNALMAN_PEER_EVICT_AFTER_S="0.5",
    ) as c:  # fmt: skip
        yield c


def removals(proc: CommandProcess) -> list[dict[str, Any]]:
    found = []
    for line in proc.log_path.read_text(errors="replace").splitlines():
        if "dead_member_removed_from_group" in line:
            found.append(json.loads(line))
    return found


async def test_killed_replica_is_removed_from_the_group_before_its_session_expires(
    cluster: Cluster,
) -> None:
    a, b = cluster.start("a"), cluster.start("b")
    await wait_until(lambda: split_settled([a, b]), timeout=40)
    a.proc.kill()  # kill -9: its PostgreSQL backend ends with the process, its session does not
    await wait_until(lambda: owns_all(b), timeout=WITHIN_S)
    [removal] = removals(b.proc)
    assert removal["owner"] == "a"
    assert removals(a.proc) == []


async def test_stopped_replica_is_not_removed(cluster: Cluster) -> None:
    a, b = cluster.start("a"), cluster.start("b")
    await wait_until(lambda: split_settled([a, b]), timeout=40)
    a.proc.pause()  # SIGSTOP: a paused process keeps its connections, so it is not dead
    try:
        # Were it removed, b would own every partition ~7 s later; its session does not expire
        # before the watch ends.
        deadline = time.monotonic() + WITHIN_S
        while time.monotonic() < deadline:
            assert await b.partitions() != set(range(PARTITIONS))
            await asyncio.sleep(0.25)
        assert removals(b.proc) == []
    finally:
        a.proc.resume()
    await wait_until(lambda: split_settled([a, b]), timeout=40)
