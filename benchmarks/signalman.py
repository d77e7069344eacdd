"""Benchmark of Signalman on loopback: ``./dev bench signalman`` -> ``.bench/signalman.json``.

Real servers (tansu, redis-server, PostgreSQL) and real replica processes, in one run:

1. raw baseline: aiokafka produce -> consume latency at the target rate (``kafka_e2e_p99_ms``);
2. catch-up throughput of one replica, then of two replicas (fresh group and history each) over
   the same preloaded backlog (``events_per_s_1_replica``, ``events_per_s_2_replicas``,
   ``scale_ratio``; on a 2-core machine the broker, Redis and both replicas share the cores);
3. produce (KafkaSink) -> subscriber receive latency at the target rate through the two replicas
   (``e2e_p99_ms``), after a half-second warm-up at the same rate (here and in the raw baseline;
   the producer is connected before it emits, like a running Foghorn), with the replicas' own
   event-age histograms per stage and their CPU per event;
4. kill -9 of one replica while events flow: ``takeover_s`` (kill until the survivor owns every
   partition) and ``lost_events`` / ``duplicate_events`` counted per subscription. Beside it, in
   the same run, the broker's own floor: ``kafka_takeover_s``, plain aiokafka members with the
   same session timeout and heartbeat, one killed -9. ``takeover_s`` is broken down from the
   survivor's log: ``takeover_removed_s`` (kill until the survivor removed the dead member from
   the group, seeing its lock connection gone in PostgreSQL), ``takeover_detect_s`` (kill until
   the survivor sees the rebalance: that removal, or else the session expiry, plus a
   heartbeat), ``takeover_join_s`` (JoinGroup/SyncGroup: tansu holds every join
   ~3 s), ``takeover_acquire_s`` (advisory locks, fencing tokens, history claims: ours) and
   ``takeover_observe_s`` (until the benchmark's poll saw it).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from benchmarks.common import cpu_seconds

TENANTS = [f"t{i}" for i in range(8)]
OPERATOR_TOKEN = "bench-ops"
TOKENS = ",".join(
    [*(f"bench{i}=bench@{t}:tenant-user" for i, t in enumerate(TENANTS)), "bench-ops=ops:operator"]
)
PARTITIONS = 4
SESSION_TIMEOUT_MS = 6_000
# The survivor learns of a dead member at its first heartbeat after the session expired, so the
# interval adds up to one interval to every takeover (measured: +0.0-0.45 s at 500 ms, +0.0-0.05
# s at 200 ms); 200 ms is 1/30 of the session timeout, a negligible load on the coordinator.
HEARTBEAT_MS = 200


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

    def replica(
        self,
        name: str,
        group: str,
        topic: str,
        prefix: str,
        log_level: str = "WARNING",
        wait: bool = True,
    ) -> Any:
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
            "SIGNALMAN_HEARTBEAT_INTERVAL_MS": str(HEARTBEAT_MS),
            "SIGNALMAN_LOCK_GRACE_S": "1.0",
            "SIGNALMAN_SUBSCRIBER_BUFFER": "20000",
            "SIGNALMAN_HTTP_PORT": str(http_port),
            "SIGNALMAN_REPLICA_ID": name,
            "LOG_LEVEL": log_level,
        }
        proc = CommandProcess(
            f"signalman-{name}",
            [sys.executable, "-m", "api_realtime", "--grpc-port", "{port}"],
            run_dir=self.root / name,
            env=env,
        )
        self.procs.append(proc)
        proc.start(wait=wait)
        proc.http_port = http_port  # type: ignore[attr-defined]
        return proc

    def stop(self) -> None:
        for proc in reversed(self.procs):
            proc.stop(timeout=5)
        for server in (self.postgres, self.redis, self.kafka):
            server.stop()
            server.cleanup()


async def raw_kafka_latency(
    bootstrap: str, rate: int, seconds: float, warmup_s: float = 0.0
) -> list[float]:
    """Plain aiokafka: produce the same envelopes at ``rate`` and consume them; returns the
    latencies in ms of what was sent after the first ``warmup_s`` seconds."""
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

    from pkg.events import Event
    from pkg.events.envelope import encode_event
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
    warmup = int(rate * warmup_s)
    total = warmup + int(rate * seconds)
    received = 0

    async def consume() -> None:
        nonlocal received
        while received < total:
            batch = await consumer.getmany(timeout_ms=100)
            now = time.time()
            for records in batch.values():
                for rec in records:
                    received += 1
                    data = json.loads(rec.value)["data"]
                    if not data["warmup"]:
                        latencies.append((now - data["sent"]) * 1000)

    task = asyncio.create_task(consume())
    start = time.monotonic()
    for i in range(total):
        await asyncio.sleep(max(0.0, start + i / rate - time.monotonic()))
        tenant = TENANTS[i % len(TENANTS)]
        data = {"seq": i, "sent": time.time(), "warmup": i < warmup}
        await producer.send(topic, encode_event(Event("stream.started", tenant, data)),
                            key=tenant.encode())  # fmt: skip
    await asyncio.wait_for(task, 20)
    await producer.stop()
    await consumer.stop()
    return latencies


async def raw_takeover(bootstrap: str, topic: str) -> tuple[float, float]:
    """Plain aiokafka on this broker: the floor of any takeover, and of any fresh join.

    A member process joins a fresh group (``fresh join`` = until it holds partitions), a second
    member (this process) joins, the first is killed -9; returns (fresh join seconds, seconds
    from the kill until the survivor holds every partition).
    """
    from aiokafka import AIOKafkaConsumer

    group = f"raw-{uuid.uuid4().hex[:6]}"
    spec = json.dumps({"bootstrap": bootstrap, "topic": topic, "group": group})
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "benchmarks.signalman", "--raw-member", spec,
        stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    survivor = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False,
        session_timeout_ms=SESSION_TIMEOUT_MS, heartbeat_interval_ms=HEARTBEAT_MS,
        rebalance_timeout_ms=SESSION_TIMEOUT_MS,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        fresh_join_s = float((await asyncio.wait_for(proc.stdout.readline(), 30)).split()[1])
        await survivor.start()
        survivor.subscribe([topic])

        async def poll_until(done: Any, timeout: float) -> None:
            deadline = time.monotonic() + timeout
            while not done():
                if time.monotonic() > deadline:
                    raise TimeoutError("raw consumer group did not settle")
                await survivor.getmany(timeout_ms=20)

        await poll_until(lambda: 0 < len(survivor.assignment()) < PARTITIONS, 30)
        await asyncio.sleep(1.0)  # steady state, as for the replica kill
        killed_at = time.monotonic()
        proc.kill()
        await proc.wait()
        await poll_until(lambda: len(survivor.assignment()) == PARTITIONS, 30)
        return fresh_join_s, time.monotonic() - killed_at
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        await survivor.stop()


async def raw_member_main(spec_json: str) -> int:
    """``--raw-member SPEC``: one plain group member; prints ``joined <seconds>`` once it holds
    partitions, then stays in the group until killed (at most a minute)."""
    from aiokafka import AIOKafkaConsumer

    spec = json.loads(spec_json)
    consumer = AIOKafkaConsumer(
        bootstrap_servers=spec["bootstrap"], group_id=spec["group"], enable_auto_commit=False,
        session_timeout_ms=SESSION_TIMEOUT_MS, heartbeat_interval_ms=HEARTBEAT_MS,
        rebalance_timeout_ms=SESSION_TIMEOUT_MS,
    )  # fmt: skip
    await consumer.start()
    started = time.monotonic()
    consumer.subscribe([spec["topic"]])
    reported = False
    try:
        while time.monotonic() - started < 60:
            await consumer.getmany(timeout_ms=20)
            if consumer.assignment() and not reported:
                print(f"joined {time.monotonic() - started:.3f}", flush=True)
                reported = True
    finally:
        await consumer.stop()
    return 0


def takeover_breakdown(log_path: Path, killed_at_wall: float, takeover_s: float) -> dict[str, Any]:
    """Where ``takeover_s`` went, from the survivor's own log lines after the kill."""
    from datetime import datetime

    revoked_at = assigned = removed_at = None
    for line in log_path.read_text(errors="replace").splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        ts = entry.get("timestamp")
        if not ts:
            continue
        at = datetime.fromisoformat(ts.replace("Z", "+00:00")).timestamp()
        if at < killed_at_wall:
            continue
        if entry.get("event") == "dead_member_removed_from_group" and removed_at is None:
            removed_at = at
        if entry.get("event") == "partitions_revoked" and revoked_at is None:
            revoked_at = at
        if entry.get("event") == "partitions_assigned" and len(entry.get("partitions", [])) == (
            PARTITIONS
        ):
            assigned = entry
            break
    if revoked_at is None or assigned is None:
        return {"takeover_breakdown": "not found in the survivor's log"}
    detect = revoked_at - killed_at_wall
    join = float(assigned.get("join_s") or 0.0)
    acquire = float(assigned.get("acquire_s") or 0.0)
    return {
        # Kill until the survivor removed the dead member from the group (PostgreSQL showed its
        # lock connection gone), if it did before the session expired.
        "takeover_removed_s": None if removed_at is None else round(removed_at - killed_at_wall, 3),
        "takeover_detect_s": round(detect, 3),
        "takeover_join_s": round(join, 3),
        "takeover_acquire_s": round(acquire, 3),
        "takeover_observe_s": round(takeover_s - detect - join - acquire, 3),
    }


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
    """Cumulative ``signalman_event_age_seconds`` bucket counts per stage (bounds in ms),
    summed over replicas."""
    from pkg.clients.http import AsyncHttpClient

    buckets: dict[str, dict[float, float]] = {}
    for port in http_ports:
        base = f"http://127.0.0.1:{port}"
        async with AsyncHttpClient(base_url=base, token=OPERATOR_TOKEN) as http:
            text = (await http.get("/metrics")).text
        for line in text.splitlines():
            if not line.startswith("signalman_event_age_seconds_bucket"):
                continue
            labels, _, value = line.rpartition(" ")
            stage = labels.split('stage="', 1)[1].split('"', 1)[0]
            le = labels.split('le="', 1)[1].split('"', 1)[0]
            bound = float("inf") if le == "+Inf" else float(le) * 1000.0  # ms, as reported
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


async def owned(address: str, client: Any = None) -> set[int]:
    """Partitions the replica at ``address`` owns (through ``client`` when given)."""
    from pkg.clients.signalman import SignalmanClient

    own_client = client is None
    client = client or SignalmanClient(address, token="bench0")
    try:
        return {p.partition for p in (await client.stats(deadline_s=2.0)).partitions}
    except Exception:
        return set()
    finally:
        if own_client:
            await client.close()


async def wait_for(pred: Any, timeout: float, interval: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await pred():
            return
        await asyncio.sleep(interval)
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
        raw = await raw_kafka_latency(bootstrap, args.rate, args.seconds, args.warmup)
        result["kafka_e2e_p50_ms"] = round(_pct(raw, 0.50), 2)
        result["kafka_e2e_p99_ms"] = round(_pct(raw, 0.99), 2)
        backlog_topic = f"backlog-{uuid.uuid4().hex[:6]}"
        await preload(bootstrap, backlog_topic, args.backlog)
        fresh_join_s, kafka_takeover_s = await raw_takeover(bootstrap, backlog_topic)
        result["fresh_group_join_s"] = round(fresh_join_s, 2)
        result["kafka_takeover_s"] = round(kafka_takeover_s, 2)

        # 2. catch-up throughput: one replica, then two (fresh group + history namespace each).
        one = stack.replica("solo", "g-solo", backlog_topic, "sm-solo")
        rate1 = await catch_up_rate(stack.redis.url, "sm-solo", args.backlog)
        one.stop(timeout=5)
        # INFO: the survivor's rebalance lines (a handful) give the takeover breakdown.
        # Both start at once, so they join the group in one generation: a second member
        # joining later triggers a rebalance (~3 s on tansu) that would be measured as
        # throughput (the backlog takes about a second to catch up).
        a = stack.replica("a", "g-pair", backlog_topic, "sm-pair", log_level="INFO", wait=False)
        b = stack.replica("b", "g-pair", backlog_topic, "sm-pair", log_level="INFO", wait=False)
        a.wait_ready()
        b.wait_ready()
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
                    if measuring and not data.get("warmup"):
                        latencies.append((time.time() - data["sent"]) * 1000)

        drains = [asyncio.create_task(drain(t, s)) for t, s in zip(TENANTS, subs, strict=True)]
        seq = dict.fromkeys(TENANTS, 100_000)  # live seqs start above the backlog's

        async def produce(rate: int, seconds: float, warmup_s: float = 0.0) -> None:
            # The producer is its own process (like Foghorn), so measuring does not steal its
            # CPU; it reports the next seq per tenant when done.
            spec = {"bootstrap": bootstrap, "topic": backlog_topic, "rate": rate,
                    "seconds": seconds, "warmup_s": warmup_s, "seq": seq}  # fmt: skip
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
        cpu_before = [cpu_seconds(a.pid), cpu_seconds(b.pid)]
        await produce(args.rate, args.seconds, args.warmup)
        await asyncio.sleep(0.5)
        ages_after = await age_buckets(ports)
        cpu_used = sum(cpu_seconds(p.pid) for p in (a, b)) - sum(cpu_before)
        produced = int(args.rate * (args.seconds + args.warmup))
        # CPU is what the replicas cost whatever else runs on the machine (wall-clock latency
        # is not): both replicas' user + system time per event, decode to subscriber write.
        result["replica_cpu_us_per_event"] = round(cpu_used * 1e6 / produced, 1)
        # Where the time goes, from the replicas' own histograms (bucket upper bounds): the age
        # of (one in 8) events when fetched from Kafka, appended to the history, written to
        # their subscriber.
        for stage in ("fetched", "appended", "delivered"):
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
        # One open channel polled every 20 ms: the observation adds little to the takeover.
        probe = SignalmanClient(addr_b, token="bench0")
        await owned(addr_b, probe)
        killed_at, killed_at_wall = time.monotonic(), time.time()
        a.kill()

        async def survivor_owns_all() -> bool:
            return await owned(addr_b, probe) == set(range(PARTITIONS))

        try:
            await wait_for(survivor_owns_all, 30, interval=0.02)
        finally:
            await probe.close()
        result["takeover_s"] = round(time.monotonic() - killed_at, 2)
        result["takeover_overhead_s"] = round(result["takeover_s"] - result["kafka_takeover_s"], 2)
        result.update(takeover_breakdown(b.log_path, killed_at_wall, result["takeover_s"]))
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
            got = [s for s in received[t] if s >= 100_000]
            lost += len(set(range(100_000, seq[t])) - set(got))
            dup += len(got) - len(set(got))
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
    # A long-running producer (Foghorn) is connected before it emits: do not time this process's
    # start-up. The first ``warmup_s`` seconds of events are flagged and not measured.
    deadline = time.monotonic() + 10
    while not sink.connected and time.monotonic() < deadline:
        time.sleep(0.01)
    rate = spec["rate"]
    warmup = int(rate * spec.get("warmup_s", 0.0))
    total = warmup + int(rate * spec["seconds"])
    start = time.monotonic()
    for i in range(total):
        delay = start + i / rate - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        tenant = TENANTS[i % len(TENANTS)]
        data = {"seq": seq[tenant], "sent": time.time(), "warmup": i < warmup}
        sink.emit(Event("stream.started", tenant, data))
        seq[tenant] += 1
    sink.close(flush_timeout=10)
    print(json.dumps({"seq": seq, "dropped": sink.dropped}))
    return 0


def main(argv: list[str]) -> int:
    if argv[:1] == ["--produce"]:
        return produce_main(argv[1])
    if argv[:1] == ["--raw-member"]:
        return asyncio.run(raw_member_main(argv[1]))
    parser = argparse.ArgumentParser(prog="./dev bench signalman")
    parser.add_argument("--rate", type=int, default=2_000, help="events/s for latency phases")
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--warmup", type=float, default=0.5,
                        help="seconds at the rate before latencies are measured")  # fmt: skip
    parser.add_argument("--backlog", type=int, default=12_000)
    parser.add_argument("--kill-rate", type=int, default=400)
    parser.add_argument("--kill-seconds", type=float, default=12.0)
    args = parser.parse_args(argv)
    # A fresh directory per run: two runs at once (a shared machine) must not delete each
    # other's servers' data.
    root = Path(tempfile.mkdtemp(prefix="signalman-bench-"))
    from pkg.common.logging import configure_logging

    configure_logging("bench-signalman", level="WARNING")
    try:
        result = asyncio.run(run(args, root))
    finally:
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
        ("event age p99 (ms, bucket)",
         " / ".join(str(result[f"{s}_age_p99_ms_bucket"])
                    for s in ("fetched", "appended", "delivered")),
         "at fetch / append / subscriber write"),
        ("replica CPU per event (us)", result["replica_cpu_us_per_event"], "both replicas"),
        ("events/s 1 replica", result["events_per_s_1_replica"], ""),
        ("events/s 2 replicas", result["events_per_s_2_replicas"],
         f"scale_ratio {result['scale_ratio']}"),
        ("takeover (s)", result["takeover_s"],
         f"raw kafka {result['kafka_takeover_s']} (overhead {result['takeover_overhead_s']}); "
         f"session timeout {result['session_timeout_s']}"),
        ("  removed / detect / join / acquire / seen",
         " / ".join(str(result.get(f"takeover_{k}_s", "?"))
                    for k in ("removed", "detect", "join", "acquire", "observe")),
         f"fresh group join {result['fresh_group_join_s']} s on this broker"),
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
