"""Two Signalman replica processes on real servers: partition split, kill -9, SIGSTOP zombie.

Replicas run as separate processes (``python -m api_realtime``) started by ``process_factory``
and killed or paused by pid. Short session timeouts keep takeovers to a few seconds.
"""

from __future__ import annotations

import json
import sys
import threading
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import pytest
from aiokafka.partitioner import DefaultPartitioner

from pkg.clients.signalman import SignalmanClient
from pkg.devstack.servers import CommandProcess, free_port
from pkg.events import Event
from pkg.events.kafka import KafkaSink
from pkg.proto.signalman.v1 import signalman_pb2 as pb
from signalman.history.redis import RedisHistory
from tests.signalman.conftest import TOKENS, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.failure]

PARTITIONS = 4
SESSION_TIMEOUT_S = 6.0


@dataclass
class Replica:
    name: str
    proc: CommandProcess
    client: SignalmanClient

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.proc.port}"

    async def stats(self) -> pb.HubStats:
        return await self.client.stats(deadline_s=3.0)

    async def partitions(self) -> set[int]:
        try:
            return {p.partition for p in (await self.stats()).partitions}
        except Exception:
            return set()


@dataclass
class Cluster:
    topic: str
    group: str
    prefix: str
    kafka: Any
    redis: Any
    postgres: Any
    start: Callable[[str], Replica]
    replicas: list[Replica]


@pytest.fixture
async def cluster(
    kafka_broker: Any,
    redis_server: Any,
    postgres_server: Any,
    process_factory: Callable[..., CommandProcess],
) -> AsyncIterator[Cluster]:
    suffix = uuid.uuid4().hex[:8]
    topic, group, prefix = f"events-{suffix}", f"signalman-{suffix}", f"sm-{suffix}"
    replicas: list[Replica] = []

    def start(name: str) -> Replica:
        env = {
            "PLATFORM_TOKENS": TOKENS,
            "SIGNALMAN_KAFKA_BOOTSTRAP": kafka_broker.bootstrap,
            "SIGNALMAN_TOPIC": topic,
            "SIGNALMAN_GROUP_ID": group,
            "SIGNALMAN_PARTITIONS": str(PARTITIONS),
            "SIGNALMAN_REDIS_URL": redis_server.url,
            "SIGNALMAN_REDIS_PREFIX": prefix,
            "SIGNALMAN_POSTGRES_DSN": postgres_server.dsn,
            "SIGNALMAN_SESSION_TIMEOUT_MS": str(int(SESSION_TIMEOUT_S * 1000)),
            "SIGNALMAN_HEARTBEAT_INTERVAL_MS": "500",
            "SIGNALMAN_LOCK_GRACE_S": "1.0",
            "SIGNALMAN_DUTIES_INTERVAL_S": "1.0",
            "SIGNALMAN_HTTP_PORT": str(free_port()),
            "SIGNALMAN_REPLICA_ID": name,
            "LOG_LEVEL": "INFO",
        }
        proc = process_factory(
            f"signalman-{name}",
            [sys.executable, "-m", "api_realtime", "--grpc-port", "{port}"],
            env=env,
        )
        replica = Replica(name, proc, SignalmanClient(f"127.0.0.1:{proc.port}", token="ta"))
        replicas.append(replica)
        return replica

    c = Cluster(topic, group, prefix, kafka_broker, redis_server, postgres_server, start, replicas)
    try:
        yield c
    finally:
        for replica in replicas:
            await replica.client.close()


def partition_of(tenant: str) -> int:
    """The partition Kafka's default partitioner gives a tenant key (what KafkaSink uses)."""
    parts = list(range(PARTITIONS))
    return int(DefaultPartitioner()(tenant.encode(), parts, parts))


async def split_settled(replicas: list[Replica]) -> bool:
    owned = [await r.partitions() for r in replicas]
    union = set().union(*owned)
    disjoint = sum(len(o) for o in owned) == len(union)
    return union == set(range(PARTITIONS)) and disjoint and all(owned)


async def owns_all(replica: Replica) -> bool:
    return await replica.partitions() == set(range(PARTITIONS))


class Producer:
    """Emits numbered events for a tenant at a steady rate from a thread, through KafkaSink."""

    def __init__(self, bootstrap: str, topic: str, tenant: str = "acme") -> None:
        self.sink = KafkaSink(bootstrap, topic=topic, source="test")
        self.tenant = tenant
        self.count = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def emit(self, n: int) -> None:
        for _ in range(n):
            self.sink.emit(Event("stream.started", self.tenant, {"seq": self.count}))
            self.sink.emit(Event("stream.started", "globex", {"seq": self.count}))
            self.count += 1

    def start(self, rate_per_s: float) -> None:
        def loop() -> None:
            while not self._stop.wait(1.0 / rate_per_s):
                self.emit(1)

        self._thread = threading.Thread(target=loop, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)

    def close(self) -> None:
        self.stop()
        self.sink.close()


async def collect(sub: Any, seqs: list[int], until: Callable[[], int]) -> None:
    """Append every delivered seq to ``seqs`` until ``until()`` of them arrived."""
    while len(seqs) < until():
        item = await sub.get(30)
        assert isinstance(item, pb.Event), f"unexpected {item!r}"
        seqs.append(json.loads(item.data_json)["seq"])


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
    await wait_until(lambda: split_settled([a, b]), timeout=40)
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
            await wait_until(lambda: owns_all(survivor), timeout=40)
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


async def history_count(history: RedisHistory, n: int, tenant: str = "acme") -> bool:
    return (await history.info(tenant)).head_offset >= n
