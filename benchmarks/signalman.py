"""Benchmark of Signalman on loopback: ``./dev bench signalman`` -> ``.bench/signalman.json``.

Real servers (tansu, redis-server, PostgreSQL) and real replica processes, in one run:

1. raw baseline: aiokafka produce -> consume latency at the target rate (``kafka_e2e_p99_ms``);
2. catch-up throughput of one replica, then of two replicas (fresh group and history each) over
   the same preloaded backlog (``events_per_s_1_replica``, ``events_per_s_2_replicas``,
   ``scale_ratio``; on a 2-core machine the broker, Redis and both replicas share the cores);
3. produce (KafkaSink) -> subscriber receive latency at the target rate through the two replicas
   (``e2e_p99_ms``);
4. kill -9 of one replica while events flow: ``takeover_s`` (kill until the survivor owns every
   partition) and ``lost_events`` / ``duplicate_events`` counted per subscription.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import sys
import time
import uuid
from pathlib import Path
from typing import Any

TENANTS = [f"t{i}" for i in range(8)]
TOKENS = ",".join(f"bench{i}=bench@{t}:reader" for i, t in enumerate(TENANTS))
PARTITIONS = 4
SESSION_TIMEOUT_MS = 6_000


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


class Stack:
    """The servers and replica processes of one benchmark run (all stopped by pid at the end)."""

    def __init__(self, root: Path) -> None:
        from pkg.devstack.servers import KafkaBroker, PostgresServer, RedisServer

        self.root = root
        self.kafka = KafkaBroker(run_dir=root / "tansu")
        self.redis = RedisServer(run_dir=root / "redis")
        self.postgres = PostgresServer(run_dir=root / "postgres")
        self.procs: list[Any] = []

    def start(self) -> None:
        for server in (self.kafka, self.redis, self.postgres):
            server.start()

    def replica(self, name: str, group: str, topic: str, prefix: str) -> Any:
        from pkg.devstack.servers import CommandProcess, free_port

        http_port = free_port()
        env = {
            "PLATFORM_TOKENS": TOKENS,
            "SIGNALMAN_KAFKA_BOOTSTRAP": self.kafka.bootstrap,
            "SIGNALMAN_TOPIC": topic,
            "SIGNALMAN_GROUP_ID": group,
            "SIGNALMAN_PARTITIONS": str(PARTITIONS),
            "SIGNALMAN_REDIS_URL": self.redis.url,
            "SIGNALMAN_REDIS_PREFIX": prefix,
            "SIGNALMAN_POSTGRES_DSN": self.postgres.dsn,
            "SIGNALMAN_SESSION_TIMEOUT_MS": str(SESSION_TIMEOUT_MS),
            "SIGNALMAN_HEARTBEAT_INTERVAL_MS": "500",
            "SIGNALMAN_LOCK_GRACE_S": "1.0",
            "SIGNALMAN_SUBSCRIBER_BUFFER": "20000",
            "SIGNALMAN_HTTP_PORT": str(http_port),
            "SIGNALMAN_REPLICA_ID": name,
            "LOG_LEVEL": "WARNING",
        }
        proc = CommandProcess(
            f"signalman-{name}",
            [sys.executable, "-m", "api_realtime", "--grpc-port", "{port}"],
            run_dir=self.root / name,
            env=env,
        )
        self.procs.append(proc)
        proc.start()
        proc.http_port = http_port  # type: ignore[attr-defined]
        return proc

    def stop(self) -> None:
        for proc in reversed(self.procs):
            proc.stop(timeout=5)
        for server in (self.postgres, self.redis, self.kafka):
            server.stop()
            server.cleanup()


async def raw_kafka_latency(bootstrap: str, rate: int, seconds: float) -> list[float]:
    """Plain aiokafka: produce at ``rate`` and consume; returns latencies in ms."""
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

    from signalman.consumer import ensure_topics

    topic = f"raw-{uuid.uuid4().hex[:6]}"
    await ensure_topics(bootstrap, {topic: PARTITIONS})
    # Same fetch wait as Signalman's consumer (tansu holds fetches for the max wait).
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, auto_offset_reset="latest", fetch_max_wait_ms=20
    )
    await consumer.start()
    consumer.assign([TopicPartition(topic, p) for p in range(PARTITIONS)])
    await consumer.seek_to_end()
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=0)
    await producer.start()
    latencies: list[float] = []
    total = int(rate * seconds)

    async def consume() -> None:
        while len(latencies) < total:
            batch = await consumer.getmany(timeout_ms=100)
            now = time.time()
            for records in batch.values():
                for rec in records:
                    latencies.append((now - json.loads(rec.value)["t"]) * 1000)

    task = asyncio.create_task(consume())
    start = time.monotonic()
    for i in range(total):
        await asyncio.sleep(max(0.0, start + i / rate - time.monotonic()))
        tenant = TENANTS[i % len(TENANTS)]
        await producer.send(topic, json.dumps({"t": time.time()}).encode(), key=tenant.encode())
    await asyncio.wait_for(task, 20)
    await producer.stop()
    await consumer.stop()
    return latencies


async def broker_join_delay(bootstrap: str, topic: str) -> float:
    """Seconds a fresh consumer group waits for its first assignment on this broker. tansu
    holds every join round for a fixed ~3 s, which is also part of every takeover."""
    from aiokafka import AIOKafkaConsumer

    consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap,
                                group_id=f"probe-{uuid.uuid4().hex[:6]}")  # fmt: skip
    start = time.monotonic()
    await consumer.start()
    try:
        while not consumer.assignment():
            await consumer.getmany(timeout_ms=50)
        return time.monotonic() - start
    finally:
        await consumer.stop()


async def preload(bootstrap: str, topic: str, n: int) -> None:
    from aiokafka import AIOKafkaProducer

    from pkg.events import Event
    from pkg.events.envelope import encode_event
    from signalman.consumer import ensure_topics

    await ensure_topics(bootstrap, {topic: PARTITIONS, f"{topic}.dlq": PARTITIONS})
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=5)
    await producer.start()
    futures = []
    for i in range(n):
        tenant = TENANTS[i % len(TENANTS)]
        event = Event("stream.started", tenant, {"seq": i // len(TENANTS)})
        futures.append(await producer.send(topic, encode_event(event), key=tenant.encode()))
    await asyncio.gather(*futures)
    await producer.stop()


async def appended(redis_url: str, prefix: str) -> int:
    from signalman.history.redis import RedisHistory

    history = RedisHistory(redis_url, prefix=prefix)
    try:
        return sum([(await history.info(t)).head_offset for t in TENANTS])
    finally:
        await history.close()


async def catch_up_rate(redis_url: str, prefix: str, n: int, timeout: float = 30.0) -> float:
    """Events/s from the first append to the last, polling the shared history."""
    deadline = time.monotonic() + timeout
    first_at = None
    while time.monotonic() < deadline:
        count = await appended(redis_url, prefix)
        now = time.monotonic()
        if count and first_at is None:
            first_at, first_count = now, count
        if count >= n and first_at is not None:
            elapsed = max(now - first_at, 1e-3)
            return (count - first_count) / elapsed
        await asyncio.sleep(0.05)
    raise TimeoutError(f"only {await appended(redis_url, prefix)} of {n} events appended")


async def age_buckets(http_ports: list[int]) -> dict[str, dict[float, float]]:
    """Cumulative ``signalman_event_age`` bucket counts per stage, summed over replicas."""
    from pkg.clients.http import AsyncHttpClient

    buckets: dict[str, dict[float, float]] = {}
    for port in http_ports:
        async with AsyncHttpClient(base_url=f"http://127.0.0.1:{port}") as http:
            text = (await http.get("/metrics")).text
        for line in text.splitlines():
            if not line.startswith("signalman_event_age_milliseconds_bucket"):
                continue
            labels, _, value = line.rpartition(" ")
            stage = labels.split('stage="', 1)[1].split('"', 1)[0]
            le = labels.split('le="', 1)[1].split('"', 1)[0]
            bound = float("inf") if le == "+Inf" else float(le)
            per = buckets.setdefault(stage, {})
            per[bound] = per.get(bound, 0.0) + float(value)
    return buckets


def bucket_quantile(before: dict[float, float], after: dict[float, float], q: float) -> float:
    """Upper bucket bound holding quantile ``q`` of what was observed between two scrapes."""
    diff = {b: after.get(b, 0.0) - before.get(b, 0.0) for b in after}
    total = diff.get(float("inf"), 0.0)
    if total <= 0:
        return float("nan")
    for bound in sorted(diff):
        if diff[bound] >= q * total:
            return bound
    return float("inf")


async def owned(address: str) -> set[int]:
    from pkg.clients.signalman import SignalmanClient

    client = SignalmanClient(address, token="bench0")
    try:
        return {p.partition for p in (await client.stats(deadline_s=2.0)).partitions}
    except Exception:
        return set()
    finally:
        await client.close()


async def wait_for(pred: Any, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await pred():
            return
        await asyncio.sleep(0.05)
    raise TimeoutError("condition not met")


async def run(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    from pkg.clients.signalman import SignalmanClient
    from pkg.proto.signalman.v1 import signalman_pb2 as pb

    stack = Stack(root)
    result: dict[str, Any] = {}
    t_start = time.monotonic()
    try:
        stack.start()
        bootstrap = stack.kafka.bootstrap
        # 1. raw Kafka baseline, and the backlog for the throughput runs.
        raw = await raw_kafka_latency(bootstrap, args.rate, args.seconds)
        result["kafka_e2e_p50_ms"] = round(_pct(raw, 0.50), 2)
        result["kafka_e2e_p99_ms"] = round(_pct(raw, 0.99), 2)
        backlog_topic = f"backlog-{uuid.uuid4().hex[:6]}"
        await preload(bootstrap, backlog_topic, args.backlog)
        result["fresh_group_join_s"] = round(await broker_join_delay(bootstrap, backlog_topic), 2)

        # 2. catch-up throughput: one replica, then two (fresh group + history namespace each).
        one = stack.replica("solo", "g-solo", backlog_topic, "sm-solo")
        rate1 = await catch_up_rate(stack.redis.url, "sm-solo", args.backlog)
        one.stop(timeout=5)
        a = stack.replica("a", "g-pair", backlog_topic, "sm-pair")
        b = stack.replica("b", "g-pair", backlog_topic, "sm-pair")
        rate2 = await catch_up_rate(stack.redis.url, "sm-pair", args.backlog)
        result["events_per_s_1_replica"] = round(rate1)
        result["events_per_s_2_replicas"] = round(rate2)
        result["scale_ratio"] = round(rate2 / rate1, 2)
        addr_a, addr_b = f"127.0.0.1:{a.port}", f"127.0.0.1:{b.port}"

        async def settled() -> bool:
            oa, ob = await owned(addr_a), await owned(addr_b)
            return bool(oa) and bool(ob) and oa | ob == set(range(PARTITIONS))

        await wait_for(settled, 30)

        # 3. end-to-end latency at the target rate through both replicas, one subscriber per
        # tenant, each pinned first to the replica that does NOT own its partition half the time.
        clients = [SignalmanClient([addr_a, addr_b] if i % 2 else [addr_b, addr_a],
                                   token=f"bench{i}") for i in range(len(TENANTS))]  # fmt: skip
        subs = [c.subscribe(["streams"], buffer=100_000) for c in clients]
        for sub in subs:
            sub.start()
        for sub in subs:
            await sub.wait_subscribed(15)
        received: dict[str, list[int]] = {t: [] for t in TENANTS}
        latencies: list[float] = []
        measuring = True

        async def drain(tenant: str, sub: Any) -> None:
            while True:
                item = await sub.get()
                if isinstance(item, pb.Event):
                    data = json.loads(item.data_json)
                    received[tenant].append(data["seq"])
                    if measuring:
                        latencies.append((time.time() - data["sent"]) * 1000)

        drains = [asyncio.create_task(drain(t, s)) for t, s in zip(TENANTS, subs, strict=True)]
        seq = dict.fromkeys(TENANTS, 100_000)  # live seqs start above the backlog's

        async def produce(rate: int, seconds: float) -> None:
            # The producer is its own process (like Foghorn), so measuring does not steal its
            # CPU; it reports the next seq per tenant when done.
            spec = {"bootstrap": bootstrap, "topic": backlog_topic, "rate": rate,
                    "seconds": seconds, "seq": seq}  # fmt: skip
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "benchmarks.signalman", "--produce", json.dumps(spec),
                stdout=asyncio.subprocess.PIPE,
            )  # fmt: skip
            out, _ = await proc.communicate()
            report = json.loads(out.decode().strip().splitlines()[-1])
            seq.update(report["seq"])
            result["producer_dropped"] = result.get("producer_dropped", 0) + report["dropped"]

        ports = [a.http_port, b.http_port]
        ages_before = await age_buckets(ports)
        await produce(args.rate, args.seconds)
        await asyncio.sleep(0.5)
        ages_after = await age_buckets(ports)
        # Where the time goes, from the replicas' own histograms (bucket upper bounds).
        for stage in ("appended", "delivered"):
            for q, name in ((0.5, "p50"), (0.99, "p99")):
                result[f"{stage}_age_{name}_ms_bucket"] = bucket_quantile(
                    ages_before.get(stage, {}), ages_after.get(stage, {}), q
                )
        result["e2e_p50_ms"] = round(_pct(latencies, 0.50), 2)
        result["e2e_p99_ms"] = round(_pct(latencies, 0.99), 2)
        result["e2e_events"] = len(latencies)
        measuring = False

        # 4. kill -9 one replica while events keep flowing.
        kill_task = asyncio.create_task(produce(args.kill_rate, args.kill_seconds))
        await asyncio.sleep(1.0)
        killed_at = time.monotonic()
        a.kill()

        async def survivor_owns_all() -> bool:
            return await owned(addr_b) == set(range(PARTITIONS))

        await wait_for(survivor_owns_all, 30)
        result["takeover_s"] = round(time.monotonic() - killed_at, 2)
        await kill_task
        sent_live = {t: seq[t] - 100_000 for t in TENANTS}
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            live = {t: [s for s in received[t] if s >= 100_000] for t in TENANTS}
            if all(len(set(live[t])) >= sent_live[t] for t in TENANTS):
                break
            await asyncio.sleep(0.1)
        lost = dup = 0
        for t in TENANTS:
            live = [s for s in received[t] if s >= 100_000]
            lost += len(set(range(100_000, seq[t])) - set(live))
            dup += len(live) - len(set(live))
        result["lost_events"] = lost
        result["duplicate_events"] = dup
        result["events_across_kill"] = sum(sent_live.values())
        result["reconnects"] = sum(s.stats.reconnects for s in subs)
        for task in drains:
            task.cancel()
        for sub in subs:
            await sub.close()
        for client in clients:
            await client.close()
    finally:
        stack.stop()
    result["session_timeout_s"] = SESSION_TIMEOUT_MS / 1000
    result["rate_events_per_s"] = args.rate
    result["wall_s"] = round(time.monotonic() - t_start, 1)
    return result


def produce_main(spec_json: str) -> int:
    """``--produce SPEC``: emit numbered events at a steady rate through KafkaSink, then print
    the next seq per tenant (the child process of the benchmark's live phases)."""
    from pkg.events import Event
    from pkg.events.kafka import KafkaSink

    spec = json.loads(spec_json)
    seq: dict[str, int] = spec["seq"]
    sink = KafkaSink(spec["bootstrap"], topic=spec["topic"], source="bench", buffer_size=100_000)
    rate, total = spec["rate"], int(spec["rate"] * spec["seconds"])
    start = time.monotonic()
    for i in range(total):
        delay = start + i / rate - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        tenant = TENANTS[i % len(TENANTS)]
        sink.emit(Event("stream.started", tenant, {"seq": seq[tenant], "sent": time.time()}))
        seq[tenant] += 1
    sink.close(flush_timeout=10)
    print(json.dumps({"seq": seq, "dropped": sink.dropped}))
    return 0


def main(argv: list[str]) -> int:
    if argv[:1] == ["--produce"]:
        return produce_main(argv[1])
    parser = argparse.ArgumentParser(prog="./dev bench signalman")
    parser.add_argument("--rate", type=int, default=2_000, help="events/s for latency phases")
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--backlog", type=int, default=12_000)
    parser.add_argument("--kill-rate", type=int, default=400)
    parser.add_argument("--kill-seconds", type=float, default=12.0)
    args = parser.parse_args(argv)
    root = Path(".bench") / "signalman-run"
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True, exist_ok=True)
    from pkg.common.logging import configure_logging

    configure_logging("bench-signalman", level="WARNING")
    result = asyncio.run(run(args, root))
    shutil.rmtree(root, ignore_errors=True)
    targets = {
        "e2e_p99_ms": result["e2e_p99_ms"] <= 50,
        "lost_events": result["lost_events"] == 0,
        "duplicate_events": result["duplicate_events"] == 0,
        "takeover_s": result["takeover_s"] <= result["session_timeout_s"] + 3,
    }
    result["targets_met"] = targets
    out = Path(".bench")
    out.mkdir(exist_ok=True)
    (out / "signalman.json").write_text(json.dumps(result, indent=2) + "\n")
    rows = [
        ("e2e p50 / p99 (ms) @ rate", f"{result['e2e_p50_ms']} / {result['e2e_p99_ms']}",
         f"raw kafka {result['kafka_e2e_p50_ms']} / {result['kafka_e2e_p99_ms']}"),
        ("events/s 1 replica", result["events_per_s_1_replica"], ""),
        ("events/s 2 replicas", result["events_per_s_2_replicas"],
         f"scale_ratio {result['scale_ratio']}"),
        ("takeover (s)", result["takeover_s"],
         f"session timeout {result['session_timeout_s']}; fresh group join "
         f"{result['fresh_group_join_s']} s on this broker"),
        ("lost / duplicate across kill", f"{result['lost_events']} / {result['duplicate_events']}",
         f"of {result['events_across_kill']} events"),
    ]  # fmt: skip
    for name, value, note in rows:
        print(f"{name:32} {value!s:>16}  {note}")
    ok = all(targets.values())
    print(f"wall {result['wall_s']} s -> .bench/signalman.json ({'OK' if ok else 'OUT OF TARGET'})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
