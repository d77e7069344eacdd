"""A Signalman replica stopped with SIGTERM hands its work over: it commits, releases its
partition locks and leaves the consumer group at once (the other replica owns every partition
well within one session timeout, where a crash waits for it), and its subscribers resume on the
other replica from their offset with nothing lost or repeated. Real processes on real servers."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from pkg.clients.signalman import SignalmanClient
from pkg.devstack.servers import CommandProcess
from tests.signalman.conftest import wait_until
from tests.signalman.replica_cluster import (
    SESSION_TIMEOUT_S,
    Cluster,
    Producer,
    collect,
    open_cluster,
    owns_all,
    partition_of,
    split_settled,
)

pytestmark = [pytest.mark.integration, pytest.mark.failure]


@pytest.fixture
async def cluster(
    kafka_broker: Any,
    redis_server: Any,
    postgres_server: Any,
    process_factory: Callable[..., CommandProcess],
) -> AsyncIterator[Cluster]:
    async with open_cluster(kafka_broker, redis_server, postgres_server, process_factory) as c:
        yield c


async def test_sigterm_moves_partitions_within_a_session_timeout_and_loses_nothing(
    cluster: Cluster,
) -> None:
    a, b = cluster.start("a"), cluster.start("b")
    await wait_until(lambda: split_settled([a, b]), timeout=40)
    victim, survivor = (a, b) if partition_of("acme") in await a.partitions() else (b, a)
    client = SignalmanClient([victim.address, survivor.address], token="ta")
    producer = Producer(cluster.kafka.bootstrap, cluster.topic)
    seqs: list[int] = []
    try:
        async with client.subscribe(["streams"]) as sub:
            await sub.wait_subscribed()
            assert sub.stats.replicas == [victim.address]
            producer.start(rate_per_s=100)
            await collect(sub, seqs, lambda: 100)
            started = time.monotonic()
            stopping = asyncio.create_task(asyncio.to_thread(victim.proc.stop, 15.0))
            await wait_until(lambda: owns_all(survivor), timeout=40, interval=0.1)
            moved_s = time.monotonic() - started
            await stopping
            target = len(seqs) + 100
            await collect(sub, seqs, lambda: target)  # flowing again, via the survivor
            producer.stop()
            await wait_until(lambda: producer.sink.sent == 2 * producer.count, timeout=20)
            await collect(sub, seqs, lambda: producer.count)
            assert sub.stats.replicas[-1] == survivor.address and sub.stats.reconnects >= 1
            assert sub.stats.duplicates_skipped == 0 and sub.stats.gaps == 0
    finally:
        producer.close()
        await client.close()
    assert seqs == list(range(producer.count))  # nothing lost, nothing twice, in order
    print(f"partitions moved {moved_s:.2f} s after SIGTERM")
    # A crash is detected only after the session timeout; a hand-over does not wait for it.
    assert moved_s < SESSION_TIMEOUT_S, f"partitions took {moved_s:.2f} s to move"
