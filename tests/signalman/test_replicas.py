"""Two Signalman replica processes on real servers: partition split, kill -9, SIGSTOP zombie.

Replicas run as separate processes (``python -m api_realtime``) started by ``process_factory``
and killed or paused by pid. Short session timeouts keep takeovers to a few seconds.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from pkg.clients.signalman import SignalmanClient
from pkg.devstack.servers import CommandProcess
from signalman.history.redis import RedisHistory
from tests.signalman.conftest import wait_until
from tests.signalman.replica_cluster import (
    PARTITIONS,
    Cluster,
    Producer,
    collect,
    history_count,
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


async def test_two_replicas_split_the_partitions(cluster: Cluster) -> None:
    a, b = cluster.start("a"), cluster.start("b")
    await wait_until(lambda: split_settled([a, b]), timeout=40)
    owned_a, owned_b = await a.partitions(), await b.partitions()
    assert owned_a.isdisjoint(owned_b) and owned_a | owned_b == set(range(PARTITIONS))
    # Every event reaches a subscriber whatever replica processed it.
    producer = Producer(cluster.kafka.bootstrap, cluster.topic)
    try:
        async with a.client.subscribe(["streams"]) as sub_a:
            await sub_a.wait_subscribed()
            async with b.client.subscribe(["streams"]) as sub_b:
                await sub_b.wait_subscribed()
                producer.emit(50)
                got_a: list[int] = []
                got_b: list[int] = []
                await collect(sub_a, got_a, lambda: 50)
                await collect(sub_b, got_b, lambda: 50)
                assert got_a == got_b == list(range(50))
    finally:
        producer.close()


async def test_kill_replica_subscribers_resume_without_loss_or_duplicates(cluster: Cluster) -> None:
    a, b = cluster.start("a"), cluster.start("b")
    await wait_until(lambda: split_settled([a, b]), timeout=40, what="a and b split the partitions")
    owner_partition = partition_of("acme")
    victim, survivor = (a, b) if owner_partition in await a.partitions() else (b, a)
    client = SignalmanClient([victim.address, survivor.address], token="ta")
    producer = Producer(cluster.kafka.bootstrap, cluster.topic)
    seqs: list[int] = []
    try:
        async with client.subscribe(["streams"]) as sub:
            await sub.wait_subscribed()
            assert sub.stats.replicas == [victim.address]  # on the replica we are about to kill
            producer.start(rate_per_s=100)
            await collect(sub, seqs, lambda: 100)
            victim.proc.kill()  # kill -9: no goodbye to Kafka, PostgreSQL or the subscriber
            await wait_until(
                lambda: owns_all(survivor), timeout=40, what="the survivor owns every partition"
            )
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


async def test_paused_replica_is_fenced_after_wakeup(cluster: Cluster) -> None:
    a, b = cluster.start("a"), cluster.start("b")
    await wait_until(lambda: split_settled([a, b]), timeout=40)
    owner_partition = partition_of("acme")
    zombie, survivor = (a, b) if owner_partition in await a.partitions() else (b, a)
    producer = Producer(cluster.kafka.bootstrap, cluster.topic)
    history = RedisHistory(cluster.redis.url, prefix=cluster.prefix)
    try:
        producer.emit(50)
        await wait_until(lambda: history_count(history, 50), timeout=20)
        before = await zombie.stats()
        producer.start(rate_per_s=50)  # the zombie's fetcher has records in flight when paused
        zombie.proc.pause()  # SIGSTOP: its PostgreSQL connection and locks stay open
        await wait_until(lambda: owns_all(survivor), timeout=40)
        producer.stop()
        # The survivor catches up on everything first, so after waking the zombie has nothing it
        # may legitimately process: any append of its own would be a duplicate.
        await wait_until(lambda: producer.sink.sent == 2 * producer.count, timeout=20)
        await wait_until(lambda: history_count(history, producer.count), timeout=30)
        await wait_until(lambda: history_count(history, producer.count, "globex"), timeout=30)
        zombie.proc.resume()  # SIGCONT: it wakes up believing it still owns its partitions
        await wait_until(lambda: split_settled([zombie, survivor]), timeout=40)
        after = await zombie.stats()
        # The woken replica appended nothing: anything it had in flight was fenced or skipped.
        assert after.events_appended == before.events_appended
        producer.emit(20)  # and the group works normally afterwards
        await wait_until(lambda: producer.sink.sent == 2 * producer.count, timeout=20)
        await wait_until(lambda: history_count(history, producer.count), timeout=30)
        sources = await history.sources("acme")
        assert len(sources) == len(set(sources)) == producer.count  # no duplicate appends
        entries = await history.read_after("acme", 0, 10_000)
        assert [e.event.data["seq"] for e in entries] == list(range(producer.count))
    finally:
        producer.close()
        await history.close()
