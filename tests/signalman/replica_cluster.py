"""Two or more Signalman replica processes on real servers, for the failure tests.

Replicas run as separate processes (``python -m api_realtime``) started by ``process_factory``
and killed or paused by pid. Short session timeouts keep takeovers to a few seconds.
"""

from __future__ import annotations

import json
import sys
import threading
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from aiokafka.partitioner import DefaultPartitioner

from pkg.clients.signalman import SignalmanClient
from pkg.devstack.servers import CommandProcess, free_port
from pkg.events import Event
from pkg.events.kafka import KafkaSink
from pkg.proto.signalman.v1 import signalman_pb2 as pb
from signalman.history.redis import RedisHistory
from tests.signalman.conftest import TOKENS

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
    start: Callable[..., Replica]
    replicas: list[Replica]


@asynccontextmanager
async def open_cluster(
    kafka: Any,
    redis: Any,
    postgres: Any,
    process_factory: Callable[..., CommandProcess],
    **env: str,
) -> AsyncIterator[Cluster]:
    """A fresh topic, group and history namespace on the given servers; ``start(name)`` starts
    a replica process (``env`` overrides its ``SIGNALMAN_*`` settings)."""
    suffix = uuid.uuid4().hex[:8]
    topic, group, prefix = f"events-{suffix}", f"signalman-{suffix}", f"sm-{suffix}"
    replicas: list[Replica] = []

    def start(name: str, **overrides: str) -> Replica:
        proc_env = {
            "PLATFORM_TOKENS": TOKENS,
            "SIGNALMAN_KAFKA_BOOTSTRAP": kafka.bootstrap,
            "SIGNALMAN_TOPIC": topic,
            "SIGNALMAN_GROUP_ID": group,
            "SIGNALMAN_PARTITIONS": str(PARTITIONS),
            "SIGNALMAN_REDIS_URL": redis.url,
            "SIGNALMAN_REDIS_PREFIX": prefix,
            "SIGNALMAN_POSTGRES_DSN": postgres.dsn,
            "SIGNALMAN_SESSION_TIMEOUT_MS": str(int(SESSION_TIMEOUT_S * 1000)),
            "SIGNALMAN_HEARTBEAT_INTERVAL_MS": "500",
            "SIGNALMAN_LOCK_GRACE_S": "1.0",
            "SIGNALMAN_DUTIES_INTERVAL_S": "1.0",
            "SIGNALMAN_HTTP_PORT": str(free_port()),
            "SIGNALMAN_REPLICA_ID": name,
            "LOG_LEVEL": "INFO",
            **env,
            **overrides,
        }
        proc = process_factory(
            f"signalman-{name}",
            [sys.executable, "-m", "api_realtime", "--grpc-port", "{port}"],
            env=proc_env,
        )
        replica = Replica(name, proc, SignalmanClient(f"127.0.0.1:{proc.port}", token="ta"))
        replicas.append(replica)
        return replica

    c = Cluster(topic, group, prefix, kafka, redis, postgres, start, replicas)
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


async def history_count(history: RedisHistory, n: int, tenant: str = "acme") -> bool:
    return (await history.info(tenant)).head_offset >= n
