"""Signalman's fan-out curve: ``./dev bench signalman-fanout`` -> ``.bench/signalman-fanout.json``.

Real servers (tansu, redis-server, PostgreSQL), two replica processes in one consumer group and
1,000, 5,000 and 10,000 concurrent gRPC subscribers over 100 tenants, **each subscriber a
Subscribe stream on its own connection** (its own grpc channel with a subchannel pool of its
own: grpc otherwise multiplexes every channel of a process to one address over one connection;
``--shared-connections`` measures that case, a Bridge replica's subscribers over one channel),
homed on the two replicas in turn and spread over subscriber processes that this benchmark drives
over their stdin. A subscriber measures and costs little: it reads the raw message bytes, finds
each event's test data (seq, send time) with one regular expression, and decodes the last event
message only when it reconnects (to resume from its offset and epoch, with the typed client's
backoff). Events go through Kafka from a producer process (``KafkaSink``, like Foghorn) at a
steady rate chosen so that about 5,000 deliveries/s go out whatever the size (events/s =
deliveries/s x tenants / subscribers).

The load does not share cores with the system under test (``--pin``, the default on 2 cores or
more): the replicas and their stores (this process starts them: tansu, Redis, PostgreSQL) run on
the first half of the cores, the subscriber processes and the producer on the others; the JSON
says which (``pinned``; ``--stores-with-load`` gives the replicas their cores alone and puts the
stores and this process with the load). Per size ``N`` (fresh replicas, group and history each):

* ``delivered_p50_ms_N`` / ``delivered_p99_ms_N``: produce (the event's own send time) to receipt
  by the subscriber process; ``deliveries_per_s_N``; ``drops_N`` (subscribers the replicas
  dropped as too slow) and ``missing_N`` (events a subscriber never got: seq gaps);
* ``replica_cpu_us_per_event_N``: both replicas' CPU per consumed event, measured with events at
  2,000/s (the rate of ``./dev bench signalman``) to tenants nobody subscribes to (consume,
  decode, fence, append; no fan-out), minus their background CPU
  (``replica_background_cpu_pct``: measured with no events at all); the same at the fan-out
  phase's own rate is ``replica_cpu_us_per_event_at_fanout_rate_N`` (at 50 events/s a fetch
  carries one event: the fixed cost of a fetch round, per event);
* ``replica_cpu_us_per_delivery_N``: both replicas' CPU in the fan-out phase, minus that
  per-event cost for its events and the background, per delivery (tail read, dispatch,
  per-session write); ``replica_cpu_us_total_per_delivery_N`` without the subtractions;
* ``rss_mb_N`` (both replicas) and ``bytes_per_subscriber_N`` (their RSS growth while the
  subscribers connected, per subscriber).

Where the fan-out phase's latency goes, per size: ``kafka_p50_ms``/``kafka_p99_ms`` (the same
events from produce to a plain aiokafka consumer of the topic: the floor), ``fetched_p99_ms`` and
``appended_p99_ms`` (the replicas' own age histograms: taken from Kafka, appended to the
history), ``delivered_p99_ms_by_second`` (a p99 that grows through the phase is a backlog);
``replica_cpu_pct``, ``subscriber_cpu_pct`` (the benchmark's own subscriber processes, which
share the cores) and ``machine_busy_pct`` (all cores, everyone's processes: at ~100% every hop
queues); ``replica_loop_run_pct`` / ``replica_loop_runqueue_pct``: each replica's event-loop
thread, the share of the phase it ran and the share it was ready but waited for a core;
``subscriber_loop_lag_ms`` (how late a subscriber process's 5 ms timer fired: a late receipt
stamp). ``--stages`` runs the replicas with per-event stage timestamps
(``benchmarks.signalman_stages``: fetched, processing, appended, dispatched, written, and their
loops' lag) into ``stages_ms``. ``--profile DIR`` adds py-spy samples of the phase.

Side by side, once per run: ``grpc_floor_us_per_write`` (and ``grpc_floor_system_us_per_write``,
the kernel's part): a bare grpc.aio server writing one message at a time to 1,000 streams on the
replicas' cores, read by a client process on the load's cores (own connections, or shared with
``--shared-connections``): what gRPC alone costs per delivery; ``delivery_vs_grpc_floor_ratio``
is the replicas' all-in CPU per delivery at the largest size over it.

At the largest size, the reconnect herd: kill -9 of one replica while events flow; its
subscribers (half) reconnect with their offsets to the other at once: ``herd_resume_s`` (kill
until every one of them is subscribed again) and ``herd_refused`` (re-subscribe attempts that
failed). 127.0.0.1 only; every process is stopped by pid; each size is bounded to 90 s.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import re
import shutil
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import grpc
import grpc.aio

from benchmarks.common import (
    Panel,
    cpu_seconds,
    load_average,
    machine_cpu,
    raise_open_files_limit,
    rss_bytes,
    write_curves_svg,
)
from pkg.clients.signalman import CHANNEL_OPTIONS

SIZES = (1_000, 5_000, 10_000)
TENANTS = [f"t{i:03d}" for i in range(100)]
IDLE_TENANTS = [f"idle{i:03d}" for i in range(100)]  # events nobody subscribes to
# One credential per tenant: a credential's open streams are capped (1,000 by default).
TOKENS = ",".join([*(f"k{t}=sub-{t}@{t}:tenant-user" for t in TENANTS), "bench-ops=ops:operator"])
PARTITIONS = 4
DELIVERIES_PER_S = 5_000
CONSUME_RATE = 2_000  # events/s of the consume-only phase (as in `./dev bench signalman`)
SIZE_BUDGET_S = 90.0
# A helper process answers with one JSON line, latency samples included: past asyncio's default
# 64 KiB line limit readline() failed with "Separator is found, but chunk is longer than limit"
# (seen once at 1,000 subscribers, load 17).
ANSWER_LINE_LIMIT = 1 << 26
TARGETS: dict[str, tuple[str, float]] = {
    "delivered_p99_ms_10000": ("<=", 100.0),
    "drops_10000": ("<=", 0.0),
    "replica_cpu_us_per_event": ("<=", 120.0),
    "replica_cpu_us_per_delivery": ("<=", 50.0),
    "herd_resume_s": ("<=", 10.0),
    "herd_refused": ("<=", 0.0),
}


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


# -- subscriber processes -------------------------------------------------------------------------


SUBSCRIBE_METHOD = "/signalman.v1.Signalman/Subscribe"
# The test data of every event, as the replicas encode it (``signalman.wire.encode_data``:
# compact JSON in the producer's key order), found in the raw message: an event is parsed no
# further than this, a batch holds several.
_SEQ_SENT = re.compile(rb'"seq":(\d+),"sent":([0-9.]+)')
# Channel options of every subscriber's two channels: no retries inside grpc (the subscriber
# reconnects itself), and a subchannel pool of the channel's own. By default grpc shares one
# connection among all channels of a process with the same target and arguments: the
# subscribers of one process were multiplexed over one HTTP/2 connection per replica (measured
# 01:50 UTC: 20 pkg.clients channels, 1 connection), not each on its own.
# ``--shared-connections`` keeps grpc's sharing: a process's subscribers multiplexed over one
# connection per replica, as the GraphQL subscriptions of one Bridge replica reach Signalman.
# Both with the typed client's own options (``pkg.clients.signalman.CHANNEL_OPTIONS``: no BDP
# probe, which cost the replica a ping to acknowledge per delivery).
_SHARED_CHANNEL_OPTIONS = (("grpc.enable_retries", 0), *CHANNEL_OPTIONS)
_CHANNEL_OPTIONS = (*_SHARED_CHANNEL_OPTIONS, ("grpc.use_local_subchannel_pool", 1))


class Subscriber:
    """One subscriber: a real Subscribe stream on its own connection to its home replica, then,
    after the stream ends, to the other with its last offset and epoch (as the typed client
    resumes, with its backoff). What it costs per event is a read and one regular expression
    over the message's bytes; the offset and epoch to resume from are decoded from the last
    event message only when it reconnects."""

    def __init__(self, index: int, targets: list[str], shared: bool = False) -> None:
        from pkg.proto.signalman.v1 import signalman_pb2 as pb

        self.pb = pb
        self.index = index
        self.tenant = TENANTS[index % len(TENANTS)]
        home = (index // len(TENANTS)) % 2  # a tenant's subscribers alternate between replicas
        self.home = targets[home]
        self.targets = [targets[home], targets[1 - home]]
        self.metadata = (("authorization", f"Bearer k{self.tenant}"),)
        # Both replicas' channels now, before anything is measured (no connection until used).
        options = _SHARED_CHANNEL_OPTIONS if shared else _CHANNEL_OPTIONS
        self.calls = [
            grpc.aio.insecure_channel(t, options=options).stream_stream(  # raw-client: adversary
                SUBSCRIBE_METHOD,
                None,
                None,  # bytes both ways
            )
            for t in self.targets
        ]
        self.epoch, self.offset, self.started = "", 0, False
        self.last_events: bytes | None = None  # the last event message (decoded to resume)
        self.subscribed = False
        self.connects = self.reconnects = 0
        self.herd_base = 0
        self.last_error = ""
        self.last_seq: int | None = None
        self.missing = self.duplicates = self.received = 0
        self.task: asyncio.Task[None] | None = None

    def start(self, sink: list[tuple[float, float]], recording: list[bool]) -> None:
        self.task = asyncio.create_task(self.run(sink, recording))

    def _request(self) -> bytes:
        pb = self.pb
        if self.last_events is not None:  # where the stream was: its last event
            msg = pb.ServerMessage.FromString(self.last_events)
            last = msg.event if msg.WhichOneof("kind") == "event" else msg.batch.events[-1]
            self.epoch, self.offset, self.last_events = last.epoch, last.offset, None
        channel = pb.ChannelSubscription(channel="streams", resume=self.started,
                                         after_offset=self.offset, epoch=self.epoch)  # fmt: skip
        request = pb.ClientMessage(request_id=1, subscribe=pb.SubscribeRequest(channels=[channel]))
        return bytes(request.SerializeToString())

    async def run(self, sink: list[tuple[float, float]], recording: list[bool]) -> None:
        from pkg.clients.backoff import Backoff

        # The typed client's reconnect backoff (pkg.clients.signalman.Subscription._run).
        backoff = Backoff(base=0.05, cap=2.0)
        turn = 0
        while True:
            call = self.calls[turn % 2](iter([self._request()]), metadata=self.metadata)
            turn += 1
            self.connects += 1
            try:
                while True:
                    raw = await call.read()
                    if not isinstance(raw, bytes):  # grpc.aio.EOF
                        self.last_error = "stream ended"
                        break
                    now = time.time()
                    if raw[:1] in _EVENT_TAGS:
                        self._events(raw, now, sink if recording[0] else None)
                    elif self._control(raw):
                        backoff.reset()
            except asyncio.CancelledError:
                call.cancel()
                raise
            except grpc.aio.AioRpcError as exc:
                self.last_error = f"{exc.code().name}: {exc.details()}"
            self.subscribed = False
            self.reconnects += 1
            await backoff.wait()

    def _events(self, raw: bytes, now: float, sink: list[tuple[float, float]] | None) -> None:
        self.last_events = raw
        for match in _SEQ_SENT.finditer(raw):
            seq = int(match[1])
            if self.last_seq is not None:
                if seq <= self.last_seq:
                    self.duplicates += 1
                    continue
                self.missing += seq - self.last_seq - 1
            self.last_seq = seq
            self.received += 1
            if sink is not None:
                sent = float(match[2])
                sink.append((sent, (now - sent) * 1000))

    def _control(self, raw: bytes) -> bool:
        """A message other than events; True when it confirms the subscription."""
        msg = self.pb.ServerMessage.FromString(raw)
        kind = msg.WhichOneof("kind")
        if kind == "subscribed":
            if not self.started:  # a fresh subscription starts at the head
                self.epoch, self.offset = msg.subscribed.epoch, msg.subscribed.head_offset
                self.started = True
            self.subscribed = True
            return True
        if kind == "gap":
            self.epoch, self.offset = msg.gap.epoch, max(0, msg.gap.resumed_from - 1)
            self.last_events = None
        elif kind == "error":
            self.last_error = f"error {msg.error.code}: {msg.error.message}"
        return False


def _event_tags() -> frozenset[bytes]:
    from pkg.proto.signalman.v1 import signalman_pb2 as pb

    fields = pb.ServerMessage.DESCRIPTOR.fields_by_name
    return frozenset(bytes([fields[f].number << 3 | 2]) for f in ("event", "batch"))


_EVENT_TAGS = _event_tags()


async def subscribers_main(spec_json: str) -> int:
    """``--subscribers SPEC``: subscribers ``lo..hi``; commands as JSON lines on stdin (``start``,
    ``status``, ``record``, ``collect``, ``herd_status``, ``quit``), one JSON answer each."""
    from pkg.common.logging import configure_logging

    # stdout carries the answers to the driving process: logs go to stderr, errors only.
    configure_logging("bench-subscribers", level="ERROR")
    spec = json.loads(spec_json)
    # The audience's own cores (--pin), before grpc starts its threads (they inherit them):
    # in production the subscribers are other machines; on one machine they must not take
    # the replicas' CPU, nor the replicas theirs (receipt is stamped by this process).
    if spec.get("cpus"):
        os.sched_setaffinity(0, spec["cpus"])
    os.nice(int(spec.get("nice", 0)))
    shared = bool(spec.get("shared"))
    subs = [Subscriber(i, spec["targets"], shared) for i in range(spec["lo"], spec["hi"])]
    latencies: list[tuple[float, float]] = []  # (sent, ms from sent to receipt)
    recording = [False]
    # How late a 5 ms sleep wakes up while recording: this process waiting for a core (or its
    # own loop busy) delays every receipt it stamps by as much.
    lags: list[float] = []

    async def loop_lag() -> None:
        while True:
            due = time.perf_counter() + 0.005
            await asyncio.sleep(0.005)
            if recording[0]:
                lags.append((time.perf_counter() - due) * 1000)

    lag_task = asyncio.create_task(loop_lag())  # noqa: F841 (runs until the process exits)
    herd: list[Subscriber] = []
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)

    def answer(doc: dict[str, Any]) -> None:
        sys.stdout.write(json.dumps(doc) + "\n")
        sys.stdout.flush()

    while True:
        line = await reader.readline()
        if not line:
            break
        cmd = json.loads(line)
        op = cmd["op"]
        if op == "start":
            for s in subs:
                s.start(latencies, recording)
            answer({"started": len(subs)})
        elif op == "status":
            answer({"subscribed": sum(s.subscribed for s in subs),
                    "reconnects": sum(s.reconnects for s in subs)})  # fmt: skip
        elif op == "record":
            latencies.clear()
            lags.clear()
            for s in subs:
                s.received = 0
            recording[0] = bool(cmd["on"])
            answer({"recording": recording[0]})
        elif op == "received":
            answer({"received": sum(s.received for s in subs)})
        elif op == "collect":
            answer({"latencies": [(round(t, 4), round(v, 2)) for t, v in latencies],
                    "loop_lag": _summary(lags),
                    "received": sum(s.received for s in subs),
                    "missing": sum(s.missing for s in subs),
                    "duplicates": sum(s.duplicates for s in subs)})  # fmt: skip
        elif op == "herd":
            # The subscribers homed on the replica about to be killed, and their reconnects
            # so far (each of them needs exactly one).
            herd = [s for s in subs if s.home == cmd["victim"]]
            for s in herd:
                s.herd_base = s.reconnects
            answer({"herd": len(herd)})
        elif op == "herd_status":
            resumed = sum(1 for s in herd if s.connects >= 2 and s.subscribed)
            extra = sum(max(0, s.reconnects - s.herd_base - 1) for s in herd)
            answer({"herd": len(herd), "resumed": resumed, "refused": extra,
                    "errors": [s.last_error for s in herd
                               if s.reconnects - s.herd_base > 1][:3]})  # fmt: skip
        elif op == "quit":
            break
    answer({"bye": True})
    # Thousands of channels: closing them one by one took longer than the size's time bound;
    # the process exits and the kernel closes the sockets (the replicas see the streams end).
    os._exit(0)


class Audience:
    """The subscriber processes of one size, driven over their stdin."""

    def __init__(
        self, size: int, targets: list[str], processes: int, nice: int = 0,
        cpus: list[int] | None = None, shared: bool = False,
    ) -> None:  # fmt: skip
        self.size = size
        self.shared = shared
        self.nice = nice
        self.cpus = cpus or []
        self.targets = targets
        self.processes = processes
        self.procs: list[asyncio.subprocess.Process] = []

    async def start(self) -> None:
        per = (self.size + self.processes - 1) // self.processes
        for lo in range(0, self.size, per):
            spec = {"targets": self.targets, "lo": lo, "hi": min(self.size, lo + per),
                    "nice": self.nice, "cpus": self.cpus, "shared": self.shared}  # fmt: skip
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "benchmarks.signalman_fanout", "--subscribers",
                json.dumps(spec), stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
                env={**os.environ, "LOG_LEVEL": "ERROR"}, limit=ANSWER_LINE_LIMIT,
            )  # fmt: skip
            self.procs.append(proc)

    async def command(self, **cmd: Any) -> list[dict[str, Any]]:
        line = (json.dumps(cmd) + "\n").encode()
        for proc in self.procs:
            assert proc.stdin is not None
            proc.stdin.write(line)
        answers = []
        for proc in self.procs:
            assert proc.stdout is not None
            raw = await asyncio.wait_for(proc.stdout.readline(), 60)
            if not raw:
                raise RuntimeError(f"subscriber process {proc.pid} ended")
            answers.append(json.loads(raw))
        return answers

    async def total(self, key: str, **cmd: Any) -> int:
        return sum(int(a[key]) for a in await self.command(**cmd))

    def cpu(self) -> float:
        """CPU seconds the subscriber processes have used so far, together."""
        return sum(cpu_seconds(p.pid) for p in self.procs)

    async def stop(self) -> None:
        for proc in self.procs:
            if proc.returncode is None and proc.stdin is not None:
                with contextlib.suppress(Exception):
                    proc.stdin.write(b'{"op": "quit"}\n')
        for proc in self.procs:
            try:
                await asyncio.wait_for(proc.wait(), 15)
            except TimeoutError:
                proc.kill()
                await proc.wait()


# -- producer process -----------------------------------------------------------------------------


def produce_main(bootstrap: str, cpus: str = "") -> int:
    """``--produce BOOTSTRAP``: one producer process for the whole run (its start-up and Kafka
    connection are not paid per phase). Each stdin line asks for events at a steady rate
    through KafkaSink to the given tenants of a topic, round robin, each with its tenant's next
    seq and its send time; it answers what it sent once they are all acknowledged."""
    from pkg.events import Event
    from pkg.events.kafka import KafkaSink

    if cpus:  # a load generator, like the subscribers (--pin)
        os.sched_setaffinity(0, [int(c) for c in cpus.split(",")])
    sinks: dict[str, KafkaSink] = {}
    for line in sys.stdin:
        spec = json.loads(line)
        if spec.get("op") == "quit":
            break
        tenants: list[str] = spec["tenants"]
        seq: dict[str, int] = {t: int(spec["seq"].get(t, 0)) for t in tenants}
        sink = sinks.get(spec["topic"])
        if sink is None:
            sink = sinks[spec["topic"]] = KafkaSink(
                bootstrap, topic=spec["topic"], source="bench", buffer_size=100_000
            )
            deadline = time.monotonic() + 10
            while not sink.connected and time.monotonic() < deadline:
                time.sleep(0.01)
        rate = float(spec["rate"])
        total = int(rate * spec["seconds"])
        start = time.monotonic()
        for i in range(total):
            delay = start + i / rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            tenant = tenants[i % len(tenants)]
            seq[tenant] += 1
            sink.emit(Event("stream.started", tenant, {"seq": seq[tenant], "sent": time.time()}))
        deadline = time.monotonic() + 10
        while sink.buffered and time.monotonic() < deadline:
            time.sleep(0.005)
        print(json.dumps({"seq": seq, "sent": total, "dropped": sink.dropped}), flush=True)
    for sink in sinks.values():
        sink.close(flush_timeout=5)
    return 0


class Producer:
    """The producer process, driven over its stdin."""

    def __init__(self, bootstrap: str, cpus: list[int] | None = None) -> None:
        self.bootstrap = bootstrap
        self.cpus = ",".join(str(c) for c in cpus or ())
        self.proc: asyncio.subprocess.Process | None = None
        self.lock = asyncio.Lock()

    async def __call__(self, spec: dict[str, Any]) -> dict[str, Any]:
        async with self.lock:
            if self.proc is None:
                self.proc = await asyncio.create_subprocess_exec(
                    sys.executable, "-m", "benchmarks.signalman_fanout", "--produce",
                    self.bootstrap, self.cpus, stdin=asyncio.subprocess.PIPE,
                    stdout=asyncio.subprocess.PIPE, limit=ANSWER_LINE_LIMIT,
                )  # fmt: skip
            assert self.proc.stdin is not None and self.proc.stdout is not None
            self.proc.stdin.write((json.dumps(spec) + "\n").encode())
            raw = await asyncio.wait_for(self.proc.stdout.readline(), spec["seconds"] + 60)
            if not raw:
                raise RuntimeError("the producer process ended")
            doc: dict[str, Any] = json.loads(raw)
            return doc

    async def stop(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            assert self.proc.stdin is not None
            self.proc.stdin.write(b'{"op": "quit"}\n')
            try:
                await asyncio.wait_for(self.proc.wait(), 15)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()


# -- the replicas ---------------------------------------------------------------------------------


def start_replicas(
    stack: Any, size: int, root: Path, stages: bool = False, cpus: list[int] | None = None
) -> tuple[list[Any], str]:
    """The two replicas of a size; with ``stages``, each notes per-event stage times
    (``benchmarks.signalman_stages``) into ``stages_file``."""
    from pkg.devstack.servers import CommandProcess, free_port

    suffix = f"{size}-{uuid.uuid4().hex[:6]}"
    topic = f"fanout-{suffix}"
    replicas = []
    for name in ("a", "b"):
        http_port = free_port()
        env = {
            "PLATFORM_TOKENS": TOKENS,
            "SIGNALMAN_KAFKA_BOOTSTRAP": stack.kafka.bootstrap,
            "SIGNALMAN_TOPIC": topic,
            "SIGNALMAN_GROUP_ID": f"g-{suffix}",
            "SIGNALMAN_PARTITIONS": str(PARTITIONS),
            "SIGNALMAN_REDIS_URL": stack.redis.url,
            "SIGNALMAN_REDIS_PREFIX": f"sm-{suffix}",
            "SIGNALMAN_POSTGRES_DSN": stack.postgres.dsn,
            "SIGNALMAN_SESSION_TIMEOUT_MS": "6000",
            "SIGNALMAN_HEARTBEAT_INTERVAL_MS": "200",
            "SIGNALMAN_LOCK_GRACE_S": "1.0",
            # Every tenant's subscribers fit on one replica (the herd moves them all there).
            "SIGNALMAN_MAX_CONNECTIONS_PER_TENANT": "1000",
            "SIGNALMAN_HTTP_PORT": str(http_port),
            "SIGNALMAN_REPLICA_ID": f"{name}-{suffix}",
            "LOG_LEVEL": "WARNING",
        }
        stages_file = root / f"stages-{name}-{size}.json"
        if stages:
            env["BENCH_STAGES_FILE"] = str(stages_file)
        module = "benchmarks.signalman_stages" if stages else "api_realtime"
        proc = CommandProcess(
            f"signalman-{name}-{size}",
            [sys.executable, "-m", module, "--grpc-port", "{port}"],
            run_dir=root / f"{name}-{size}",
            env=env,
            ready_timeout=60.0,
            # --pin: the replicas' own cores (util-linux's taskset: set before the interpreter
            # starts, so every thread of the replica inherits them).
            exec_prefix=["taskset", "-c", ",".join(map(str, cpus))] if cpus else (),
        )
        proc.http_port = http_port  # type: ignore[attr-defined]  # (/metrics: stage ages)
        proc.stages_file = stages_file  # type: ignore[attr-defined]
        stack.procs.append(proc)
        proc.start(wait=False)
        replicas.append(proc)
    for proc in replicas:
        proc.wait_ready()
    return replicas, topic


async def stats(address: str) -> Any:
    from pkg.clients.signalman import SignalmanClient

    client = SignalmanClient(address, token=f"k{TENANTS[0]}")
    try:
        return await client.stats(deadline_s=5.0)
    finally:
        await client.close()


async def dropped_total(addresses: list[str]) -> int:
    """Subscribers the replicas dropped as too slow, so far."""
    return sum([int((await stats(a)).subscribers_dropped) for a in addresses])


async def until(check: Any, limit_s: float, interval: float = 0.1) -> float:
    deadline = time.perf_counter() + limit_s
    while True:
        if await check():
            return time.perf_counter()
        if time.perf_counter() > deadline:
            raise TimeoutError("condition not met in time")
        await asyncio.sleep(interval)


class KafkaProbe:
    """A plain aiokafka consumer of the fan-out topic (no group, no processing): what the
    broker and the producer alone add to an event's latency, side by side with Signalman."""

    def __init__(self, consumer: Any) -> None:
        self.consumer = consumer
        self.latencies: list[float] = []
        self.task = asyncio.create_task(self._run())

    @classmethod
    async def start(cls, bootstrap: str, topic: str) -> KafkaProbe:
        from aiokafka import AIOKafkaConsumer, TopicPartition

        # Signalman's fetch wait (tansu holds a fetch for the max wait when it has nothing).
        consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, fetch_max_wait_ms=20)
        await consumer.start()
        consumer.assign([TopicPartition(topic, p) for p in range(PARTITIONS)])
        await consumer.seek_to_end()
        return cls(consumer)

    async def _run(self) -> None:
        while True:
            batch = await self.consumer.getmany(timeout_ms=200)
            now = time.time()
            for records in batch.values():
                for record in records:
                    data = json.loads(record.value).get("data", {})
                    if "sent" in data:
                        self.latencies.append((now - float(data["sent"])) * 1000)

    async def stop(self) -> list[float]:
        self.task.cancel()
        await asyncio.wait({self.task})
        await self.consumer.stop()
        return self.latencies


def start_profiles(
    where: str | None, label: str, pids: dict[str, int], seconds: float
) -> list[Any]:
    """``--profile DIR``: py-spy samples of the given processes for ``seconds`` (the fan-out
    phase: both replicas and one subscriber process; the herd: the survivor and one), as
    collapsed stacks (``py-spy record --format raw``) to read where the CPU goes. Sampling does
    not stop the processes (``--nonblocking``), but py-spy's own CPU shares the cores: the JSON
    says whether a run was profiled."""
    import subprocess

    if not where:
        return []
    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    Path(where).mkdir(parents=True, exist_ok=True)
    profilers = []
    for name, pid in pids.items():
        command = [spy, "record", "--pid", str(pid), "--duration", str(max(1, int(seconds))),
                   "--rate", "200", "--format", "raw", "--nonblocking",
                   "--output", f"{where}/{name}-{label}.txt"]  # fmt: skip
        profilers.append(
            subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        )
    return profilers


async def read_stages(replicas: list[Any]) -> list[dict[str, list[list[float]]]]:
    """What each replica noted since the last call (``--stages``: SIGUSR2 makes it write its
    samples to its ``stages_file`` and start again)."""
    import signal

    for proc in replicas:
        with contextlib.suppress(FileNotFoundError):
            proc.stages_file.unlink()
        os.kill(proc.pid, signal.SIGUSR2)
    docs = []
    for proc in replicas:
        deadline = time.perf_counter() + 10
        while not proc.stages_file.exists() and time.perf_counter() < deadline:
            await asyncio.sleep(0.05)
        docs.append(json.loads(proc.stages_file.read_text()) if proc.stages_file.exists() else {})
    return docs


def stage_figures(docs: list[dict[str, list[list[float]]]]) -> dict[str, Any]:
    """Per stage, the events' age when they passed it (ms from their producer's time): p50,
    p99, max and how many were noted, both replicas together; and each replica's loop lag."""
    from benchmarks.signalman_stages import STAGES

    out: dict[str, Any] = {}
    for stage in STAGES:
        ages = [(at - t) * 1000 for doc in docs for t, at in doc.get(stage, ())]
        out[stage] = _summary(ages)
    out["loop_lag"] = [_summary([lag for _, lag in doc.get("loop_lag", ())]) for doc in docs]
    out["gc_full_ms"] = [[round(ms, 1) for _, ms in doc.get("gc", ())] for doc in docs]
    out["gc_young_over_5ms"] = [[round(ms, 1) for _, ms in doc.get("gc_young", ())] for doc in docs]
    return out


def loop_schedstat(pid: int) -> tuple[float, float]:
    """(seconds on a core, seconds runnable but waiting for one) of a process's main thread,
    the one running its event loop, so far (Linux ``/proc/<pid>/schedstat``)."""
    try:
        run_ns, wait_ns, _ = Path(f"/proc/{pid}/schedstat").read_text().split()
    except (OSError, ValueError):
        return 0.0, 0.0
    return int(run_ns) / 1e9, int(wait_ns) / 1e9


def _summary(values: list[float]) -> dict[str, Any]:
    if not values:
        return {"n": 0}
    return {"p50": round(_pct(values, 0.5) or 0, 1), "p99": round(_pct(values, 0.99) or 0, 1),
            "max": round(max(values), 1), "n": len(values)}  # fmt: skip


# -- one size -------------------------------------------------------------------------------------


async def one_size(
    stack: Any,
    produce: Producer,
    size: int,
    args: argparse.Namespace,
    root: Path,
    herd: bool,
    out: dict[str, Any],
) -> None:
    """Figures go to ``out`` as they are measured (a size cut by the bound keeps them)."""
    from benchmarks.signalman import age_buckets, bucket_quantile

    replicas, topic = start_replicas(stack, size, root, args.stages, args.replica_cpus)
    addresses = [f"127.0.0.1:{p.port}" for p in replicas]
    audience = Audience(
        size, addresses, args.processes, args.nice, args.load_cpus, args.shared_connections
    )
    seq: dict[str, int] = {}
    try:

        async def settled() -> bool:
            try:
                owned = [{p.partition for p in (await stats(a)).partitions} for a in addresses]
            except Exception:
                return False
            return all(owned) and set().union(*owned) == set(range(PARTITIONS))

        # The subscriber processes start (interpreter, imports, thousands of clients built)
        # while the group settles: seconds of the size's bound that used to come after it.
        await audience.start()
        await until(settled, 40, 0.2)
        # Create the topic's tenants' histories: one event per tenant before anyone subscribes.
        spec = {"topic": topic}
        first = await produce({**spec, "tenants": TENANTS, "rate": 1000, "seconds": 0.1,
                               "seq": seq})  # fmt: skip
        seq.update(first["seq"])
        await audience.command(op="status")  # processes up, clients built, none connected
        rss0 = sum(rss_bytes(p.pid) for p in replicas)
        t0 = time.perf_counter()
        await audience.command(op="start")

        async def all_subscribed() -> bool:
            return await audience.total("subscribed", op="status") >= size

        out["subscribe_s"] = round(await until(all_subscribed, 60, 0.2) - t0, 2)
        await asyncio.sleep(0.5)
        rss1 = sum(rss_bytes(p.pid) for p in replicas)
        out["rss_mb"] = round(rss1 / 2**20, 1)
        out["bytes_per_subscriber"] = round((rss1 - rss0) / size)

        events_per_s = DELIVERIES_PER_S * len(TENANTS) / size
        out["events_per_s"] = round(events_per_s, 1)
        # Background: what the replicas spend with no event at all (consumer polls,
        # heartbeats, lock checks, the subscribers' keepalives). Subtracted from the phases
        # below, so that a low event rate does not charge it to each event.
        cpu0, t0 = sum(cpu_seconds(p.pid) for p in replicas), time.perf_counter()
        await asyncio.sleep(2.0)
        background = (sum(cpu_seconds(p.pid) for p in replicas) - cpu0) / (time.perf_counter() - t0)
        out["replica_background_cpu_pct"] = round(background * 100, 1)

        async def consume_only(rate: float) -> float:
            """Both replicas' CPU per event (background subtracted) for events at ``rate`` to
            tenants nobody subscribes to: consume, decode, fence, append; no fan-out."""
            cpu0, t0 = sum(cpu_seconds(p.pid) for p in replicas), time.perf_counter()
            idle = await produce({**spec, "tenants": IDLE_TENANTS, "rate": rate,
                                  "seconds": args.seconds, "seq": {}})  # fmt: skip
            await asyncio.sleep(0.5)
            used = sum(cpu_seconds(p.pid) for p in replicas) - cpu0
            used -= background * (time.perf_counter() - t0)
            return float(used / idle["sent"] * 1e6)

        # The cost of consuming an event, at the rate `./dev bench signalman` uses: at the
        # fan-out phase's own rate (50 events/s at 10,000 subscribers) a fetch carries one
        # event, so that figure is the fixed cost of a fetch round (Kafka fetch, fence, Redis
        # append, commit) more than of an event, and a few percent of background moving
        # between two CPU readings swings it by hundreds of microseconds.
        out["consume_rate_events_per_s"] = CONSUME_RATE
        out["replica_cpu_us_per_event"] = round(await consume_only(CONSUME_RATE), 1)
        # At the fan-out phase's rate: what its events' consumption costs, subtracted below.
        per_event_us = await consume_only(events_per_s)
        out["replica_cpu_us_per_event_at_fanout_rate"] = round(per_event_us, 1)

        # Fan-out: the subscribed tenants at the same rate.
        dropped0 = await dropped_total(addresses)
        await audience.command(op="record", on=True)
        ports = [p.http_port for p in replicas]
        ages0 = await age_buckets(ports)
        cpu0 = sum(cpu_seconds(p.pid) for p in replicas)
        sched0 = [loop_schedstat(p.pid) for p in replicas]
        audience_cpu0 = audience.cpu()
        machine0 = machine_cpu()
        pids = {f"replica-{n}": p.pid for n, p in zip("ab", replicas, strict=True)}
        pids["subscribers"] = audience.procs[0].pid
        profilers = start_profiles(args.profile, str(size), pids, args.seconds)
        kafka_probe = await KafkaProbe.start(stack.kafka.bootstrap, topic)
        if args.stages:
            await read_stages(replicas)  # (start from here)
        t0 = time.perf_counter()
        live = await produce({**spec, "tenants": TENANTS, "rate": events_per_s,
                              "seconds": args.seconds, "seq": seq})  # fmt: skip
        seq.update(live["seq"])
        expected = int(live["sent"]) * size // len(TENANTS)

        async def delivered() -> bool:
            return await audience.total("received", op="received") >= expected

        with contextlib.suppress(TimeoutError):
            await until(delivered, 10, 0.2)
        wall = time.perf_counter() - t0
        cpu = sum(cpu_seconds(p.pid) for p in replicas) - cpu0
        sched1 = [loop_schedstat(p.pid) for p in replicas]
        audience_cpu = audience.cpu() - audience_cpu0
        # Each replica's event-loop thread: the share of the phase it ran, and the share it was
        # ready to run but waited for a core (the CPU-starved part of every hop's latency).
        spans = list(zip(sched0, sched1, strict=True))
        out["replica_loop_run_pct"] = [round((b[0] - a[0]) / wall * 100, 1) for a, b in spans]
        out["replica_loop_runqueue_pct"] = [round((b[1] - a[1]) / wall * 100, 1) for a, b in spans]
        machine1 = machine_cpu()
        kafka_latencies = await kafka_probe.stop()
        if args.stages:
            out["stages_ms"] = stage_figures(await read_stages(replicas))
        stop_by = time.perf_counter() + 30
        while any(p.poll() is None for p in profilers) and time.perf_counter() < stop_by:
            await asyncio.sleep(0.1)
        ages1 = await age_buckets(ports)
        got = await audience.command(op="collect")
        await audience.command(op="record", on=False)
        samples = [(t, v) for a in got for t, v in a["latencies"]]
        out["subscriber_loop_lag_ms"] = [a.get("loop_lag") for a in got]
        latencies = [v for _, v in samples]
        # p99 per second of the phase (by send time): a latency that grows through the phase
        # is a backlog (something cannot keep up), a flat one with spikes is stalls.
        if samples:
            first = min(t for t, _ in samples)
            per_second: dict[int, list[float]] = {}
            for t, v in samples:
                per_second.setdefault(int(t - first), []).append(v)
            out["delivered_p99_ms_by_second"] = [
                _pct(per_second[k], 0.99) for k in sorted(per_second)
            ]
        received = sum(int(a["received"]) for a in got)
        out["deliveries"] = received
        out["deliveries_expected"] = expected
        out["deliveries_per_s"] = round(received / wall, 1)
        out["delivered_p50_ms"] = _pct(latencies, 0.50)
        out["delivered_p99_ms"] = _pct(latencies, 0.99)
        out["missing"] = sum(int(a["missing"]) for a in got)
        out["duplicates"] = sum(int(a.get("duplicates", 0)) for a in got)
        out["drops"] = await dropped_total(addresses) - dropped0
        fanout_cpu = cpu - live["sent"] * per_event_us / 1e6 - background * wall
        out["replica_cpu_us_per_delivery"] = round(fanout_cpu / max(1, received) * 1e6, 1)
        out["replica_cpu_us_total_per_delivery"] = round(cpu / max(1, received) * 1e6, 1)
        # Where the latency goes: the event's age when the owning replica took it from Kafka
        # and when it had appended it to the history (one event in 16 by Kafka offset; upper
        # bounds of histogram buckets), against the plain consumer below and the receipt.
        # (The replicas' "delivered" stage samples by tenant offset: at a few events per
        # tenant, a phase holds one sampled offset per tenant, all written at one moment.)
        for stage in ("fetched", "appended"):
            for q in (0.5, 0.99):
                value = bucket_quantile(ages0.get(stage, {}), ages1.get(stage, {}), q)
                out[f"{stage}_p{round(q * 100)}_ms"] = value if math.isfinite(value) else None
        # The floor: the same events from produce to a plain aiokafka consumer of the topic.
        for q in (0.50, 0.99):
            floor = _pct(kafka_latencies, q)
            out[f"kafka_p{round(q * 100)}_ms"] = round(floor, 2) if floor is not None else None
        # The subscriber processes must not be what the latency measures.
        out["subscriber_cpu_pct"] = round(audience_cpu / wall * 100, 1)
        out["replica_cpu_pct"] = round(cpu / wall * 100, 1)
        # Of the whole machine (all cores, everyone's processes): a saturated machine queues
        # every hop of an event's path behind other work.
        busy, total = machine1[0] - machine0[0], machine1[1] - machine0[1]
        out["machine_busy_pct"] = round(busy / total * 100, 1) if total else None
        out["subscriber_processes"] = len(audience.procs)
        if herd:
            await reconnect_herd(
                replicas, addresses, audience, produce, spec, seq, events_per_s, out, args.profile
            )
    finally:
        try:
            await audience.stop()
        finally:
            for proc in replicas:
                proc.stop(timeout=5)
                if proc in stack.procs:
                    stack.procs.remove(proc)


async def reconnect_herd(
    replicas: list[Any],
    addresses: list[str],
    audience: Audience,
    produce: Producer,
    spec: dict[str, Any],
    seq: dict[str, int],
    events_per_s: float,
    out: dict[str, Any],
    profile: str | None = None,
) -> None:
    """kill -9 replica A while events flow; its subscribers resume on B."""
    victim = addresses[0]
    herd = await audience.total("herd", op="herd", victim=victim)
    producing = asyncio.create_task(
        produce({**spec, "tenants": TENANTS, "rate": events_per_s, "seconds": 8.0, "seq": seq})
    )
    await asyncio.sleep(1.0)
    killed = time.perf_counter()
    replicas[0].kill()
    pids = {"survivor": replicas[1].pid, "subscribers": audience.procs[0].pid}
    start_profiles(profile, "herd", pids, 12.0)  # (py-spy ends by itself)

    async def resumed() -> bool:
        return await audience.total("resumed", op="herd_status") >= herd

    out["herd_subscribers"] = herd
    try:
        out["herd_resume_s"] = round(await until(resumed, 40, 0.1) - killed, 2)
    except TimeoutError:
        out["herd_resume_s"] = None
    status = await audience.command(op="herd_status")
    out["herd_refused"] = sum(int(a["refused"]) for a in status)
    out["herd_resumed"] = sum(int(a["resumed"]) for a in status)
    out["herd_errors"] = [e for a in status for e in a["errors"]][:3]
    await producing


# -- the gRPC floor -------------------------------------------------------------------------------

FLOOR_STREAMS = 1_000
FLOOR_WRITES_PER_S = 2_500  # one replica's share of the fan-out phase's deliveries
FLOOR_MESSAGE = b"\x12" + bytes(180)  # about the size of one event's ServerMessage here


async def floor_server_main(spec_json: str) -> int:
    """``--floor-server SPEC``: a bare grpc.aio server (no interceptor, no Signalman) whose one
    streaming method holds each call open with a writer task, as a Subscribe does. Once
    ``streams`` calls are open it writes one message to them in turn at ``rate`` per second for
    ``seconds``, then prints its CPU per write: what gRPC alone costs per delivery."""
    spec = json.loads(spec_json)
    if spec.get("cpus"):  # the replicas' cores
        os.sched_setaffinity(0, spec["cpus"])
    streams: list[asyncio.Queue[bytes]] = []
    ready = asyncio.Event()

    async def handler(_requests: Any, context: Any) -> None:
        queue: asyncio.Queue[bytes] = asyncio.Queue()
        streams.append(queue)
        if len(streams) >= spec["streams"]:
            ready.set()
        while True:
            await context.write(await queue.get())

    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    method = grpc.stream_stream_rpc_method_handler(handler)
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler("floor.F", {"S": method}),)
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(json.dumps({"port": port}), flush=True)
    await asyncio.wait_for(ready.wait(), 60)
    await asyncio.sleep(1.0)
    pid, rate = os.getpid(), float(spec["rate"])
    cpu0, sys0, t0 = cpu_seconds(pid), _system_seconds(pid), time.perf_counter()
    sent = 0
    while (elapsed := time.perf_counter() - t0) < spec["seconds"]:
        for _ in range(int(elapsed * rate) - sent):
            streams[sent % len(streams)].put_nowait(FLOOR_MESSAGE)
            sent += 1
        await asyncio.sleep(0.005)
    await asyncio.sleep(0.5)  # the last writes
    used, system = cpu_seconds(pid) - cpu0, _system_seconds(pid) - sys0
    doc = {"writes": sent, "us_per_write": round(used / sent * 1e6, 1),
           "system_us_per_write": round(system / sent * 1e6, 1)}  # fmt: skip
    print(json.dumps(doc), flush=True)
    os._exit(0)


def _system_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[12]) / os.sysconf("SC_CLK_TCK")


async def floor_client_main(spec_json: str) -> int:
    """``--floor-client SPEC``: ``streams`` calls to the floor server, each on its own
    connection (or shared), read as raw bytes until the process is stopped."""
    spec = json.loads(spec_json)
    if spec.get("cpus"):
        os.sched_setaffinity(0, spec["cpus"])
    options = _SHARED_CHANNEL_OPTIONS if spec.get("shared") else _CHANNEL_OPTIONS

    async def one() -> None:
        channel = grpc.aio.insecure_channel(spec["target"], options=options)  # raw-client: baseline
        call = channel.stream_stream("/floor.F/S", None, None)(iter([b""]))
        while isinstance(await call.read(), bytes):
            pass

    await asyncio.gather(*(one() for _ in range(spec["streams"])), return_exceptions=True)
    return 0


async def grpc_floor(args: argparse.Namespace) -> dict[str, Any]:
    """Server CPU per streamed message of a bare grpc.aio server, side by side with the
    replicas' per delivery: ``FLOOR_STREAMS`` streams from a client process on the load's
    cores, one message each in turn at ``FLOOR_WRITES_PER_S``, the server on this process's
    cores (the replicas')."""
    server = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "benchmarks.signalman_fanout", "--floor-server",
        json.dumps({"streams": FLOOR_STREAMS, "rate": FLOOR_WRITES_PER_S, "seconds": args.seconds,
                    "cpus": args.replica_cpus}),
        stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    client = None
    try:
        assert server.stdout is not None
        port = json.loads(await asyncio.wait_for(server.stdout.readline(), 30))["port"]
        spec = {"target": f"127.0.0.1:{port}", "streams": FLOOR_STREAMS,
                "cpus": args.load_cpus, "shared": args.shared_connections}  # fmt: skip
        client = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "benchmarks.signalman_fanout", "--floor-client", json.dumps(spec)
        )
        doc: dict[str, Any] = json.loads(await asyncio.wait_for(server.stdout.readline(), 90))
        return doc
    finally:
        for proc in (client, server):
            if proc is not None and proc.returncode is None:
                proc.kill()
                await proc.wait()


async def run(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    from benchmarks.signalman import Stack

    stack = Stack(root)
    result: dict[str, Any] = {"load_average_start": load_average()}
    produce: Producer | None = None
    try:
        stack.start()
        produce = Producer(stack.kafka.bootstrap, args.load_cpus)
        if args.floor:
            try:
                floor = await grpc_floor(args)
            except Exception as exc:  # the baseline failing must not cost the curve
                floor = {"error": repr(exc)[:200]}
            result.update({f"grpc_floor_{k}": v for k, v in floor.items()})
        largest = max(args.sizes)
        for size in args.sizes:
            started = time.perf_counter()
            got: dict[str, Any] = {}
            try:
                await asyncio.wait_for(
                    one_size(stack, produce, size, args, root, size == largest and args.herd, got),
                    SIZE_BUDGET_S,
                )
            except TimeoutError:
                got["timed_out"] = True
            got["wall_s"] = round(time.perf_counter() - started, 1)
            got["load_average"] = load_average()
            result[f"size_{size}"] = got
            for key in ("delivered_p50_ms", "delivered_p99_ms", "deliveries_per_s", "drops",
                        "missing", "replica_cpu_us_per_delivery", "replica_cpu_us_per_event",
                        "rss_mb", "bytes_per_subscriber", "subscribe_s",
                        "replica_background_cpu_pct",
                        "replica_cpu_us_per_event_at_fanout_rate",
                        "replica_cpu_us_total_per_delivery", "fetched_p99_ms",
                        "appended_p99_ms", "kafka_p99_ms", "subscriber_cpu_pct",
                        "replica_cpu_pct", "machine_busy_pct"):  # fmt: skip
                result[f"{key}_{size}"] = got.get(key)
            if size == largest:
                result["replica_cpu_us_per_event"] = got.get("replica_cpu_us_per_event")
                result["replica_cpu_us_per_delivery"] = got.get("replica_cpu_us_per_delivery")
                total = got.get("replica_cpu_us_total_per_delivery")
                floor_us = result.get("grpc_floor_us_per_write")
                if total and floor_us:  # the replicas' whole cost per delivery vs gRPC's alone
                    result["delivery_vs_grpc_floor_ratio"] = round(total / floor_us, 2)
                for key in ("herd_resume_s", "herd_refused", "herd_subscribers"):
                    result[key] = got.get(key)
    finally:
        if produce is not None:
            await produce.stop()
        stack.stop()
    return result


def pin_cores(args: argparse.Namespace) -> dict[str, Any] | None:
    """``--pin`` (the default, with 2 cores or more): this process, and so the stores and the
    replicas it starts, on the first half of the cores; the subscriber processes and the
    producer (the load, other machines in production) on the rest. Without it the audience and
    the replicas took CPU from each other: at 10,000 subscribers four subscriber processes used
    74% of a core beside the replicas' 53% (23:58 UTC), the machine 98% busy."""
    args.load_cpus = args.replica_cpus = None
    cores = sorted(os.sched_getaffinity(0))
    if not args.pin or len(cores) < 2:
        return None
    half = len(cores) // 2
    system, load = cores[:half], cores[half:]
    mine = load if args.stores_with_load else system
    for task in os.listdir("/proc/self/task"):  # every thread of this process, not only this one
        os.sched_setaffinity(int(task), mine)
    args.load_cpus = load
    if args.stores_with_load:
        args.replica_cpus = system
        return {"replicas": system, "stores_driver_subscribers_producer": load}
    return {"replicas_and_stores": system, "subscribers_and_producer": load}


def main(argv: list[str]) -> int:
    if argv[:1] == ["--subscribers"]:
        return asyncio.run(subscribers_main(argv[1]))
    if argv[:1] == ["--floor-server"]:
        return asyncio.run(floor_server_main(argv[1]))
    if argv[:1] == ["--floor-client"]:
        return asyncio.run(floor_client_main(argv[1]))
    if argv[:1] == ["--produce"]:
        return produce_main(argv[1], argv[2] if len(argv) > 2 else "")
    parser = argparse.ArgumentParser(prog="./dev bench signalman-fanout", description=__doc__)
    parser.add_argument("--sizes", type=int, nargs="+", default=list(SIZES))
    parser.add_argument("--processes", type=int, default=2, help="subscriber processes")
    parser.add_argument("--nice", type=int, default=0, help="subscriber processes' niceness")
    parser.add_argument(
        "--no-floor", dest="floor", action="store_false",
        help="skip the bare grpc.aio server measured side by side (grpc_floor_*)",
    )  # fmt: skip
    parser.add_argument(
        "--stores-with-load", action="store_true",
        help="with --pin: the replicas alone on the first half of the cores, the stores (tansu, "
        "Redis, PostgreSQL) and this process with the load on the others",
    )  # fmt: skip
    parser.add_argument(
        "--shared-connections", action="store_true",
        help="a subscriber process's subscribers share one connection per replica (as one "
        "Bridge replica's GraphQL subscribers do); default: each subscriber its own",
    )  # fmt: skip
    parser.add_argument(
        "--no-pin", dest="pin", action="store_false",
        help="let every process run on every core (default: the replicas and their stores on "
        "the first half of the cores, subscribers and producer on the others)",
    )  # fmt: skip
    parser.add_argument("--seconds", type=float, default=4.0, help="per measured phase")
    parser.add_argument("--no-herd", dest="herd", action="store_false")
    parser.add_argument("--profile", metavar="DIR", help="py-spy the fan-out phase into DIR")
    parser.add_argument(
        "--stages", action="store_true",
        help="replicas note each event's time at every stage (benchmarks.signalman_stages)",
    )  # fmt: skip
    parser.add_argument("--out", default=".bench/signalman-fanout.json")
    parser.add_argument("--svg", default="docs/rfcs/img/signalman-fanout.svg")
    args = parser.parse_args(argv)
    from pkg.common.logging import configure_logging

    configure_logging("bench-signalman-fanout", level="WARNING")
    pinned = pin_cores(args)
    # Every subscriber holds its own connection: 10,000 of them, all on the survivor after the herd.
    hard = raise_open_files_limit()
    root = Path(tempfile.mkdtemp(prefix="signalman-fanout-"))
    started = time.perf_counter()
    try:
        result = asyncio.run(run(args, root))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    result["wall_s"] = round(time.perf_counter() - started, 1)
    result["load_average_end"] = load_average()
    result["deliveries_per_s_target_rate"] = DELIVERIES_PER_S
    result["tenants"] = len(TENANTS)
    result["profiled"] = bool(args.profile)  # py-spy sampled the phases (a few % of CPU)
    result["stages_traced"] = bool(args.stages)  # replicas noted per-event stage times
    result["subscriber_nice"] = args.nice
    result["subscriber_processes"] = args.processes
    result["open_files_limit"] = hard
    result["pinned"] = pinned
    result["connection_per_subscriber"] = not args.shared_connections
    checks = {}
    for name, (op, target) in TARGETS.items():
        value = result.get(name)
        checks[name] = value is not None and (value <= target if op == "<=" else value >= target)
    result["targets"] = {k: f"{op} {t:g}" for k, (op, t) in TARGETS.items()}
    result["pass"] = checks
    result["within_target"] = all(checks.values())
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    sizes = list(args.sizes)
    keys = ("subscribe_s", "deliveries_per_s", "delivered_p50_ms", "delivered_p99_ms", "drops",
            "missing", "replica_cpu_us_per_event", "replica_cpu_us_per_delivery", "rss_mb",
            "bytes_per_subscriber", "kafka_p99_ms", "fetched_p99_ms", "appended_p99_ms",
            "replica_cpu_pct", "subscriber_cpu_pct", "machine_busy_pct")  # fmt: skip
    print(f"signalman-fanout ({result['wall_s']} s; load {result['load_average_start']} -> "
          f"{result['load_average_end']})")  # fmt: skip
    for key in keys:
        print(f"{key:30} " + " ".join(f"{result.get(f'{key}_{s}')!s:>12}" for s in sizes))
    print(f"grpc floor (bare grpc.aio server, {FLOOR_STREAMS} streams): "
          f"{result.get('grpc_floor_us_per_write')} us CPU per write "
          f"({result.get('grpc_floor_system_us_per_write')} in the kernel); replicas' all-in "
          f"per delivery / floor: {result.get('delivery_vs_grpc_floor_ratio')}")  # fmt: skip
    print(f"{'target':30} {'value':>12} {'want':>10}  ok")
    for name, (op, target) in TARGETS.items():
        print(f"{name:30} {result.get(name)!s:>12} {op + format(target, 'g'):>10}  "
              f"{'yes' if checks[name] else 'NO'}")  # fmt: skip
    if args.svg and len(sizes) > 1:
        panel_keys: list[tuple[str, str, str, float | None]] = [
            ("delivered_p99_ms", "delivered p99", "ms", 100.0),
            ("delivered_p50_ms", "delivered p50", "ms", None),
            ("deliveries_per_s", "deliveries/s (two replicas)", "/s", None),
            ("replica_cpu_us_per_delivery", "replica CPU per delivery", "us", 50.0),
            ("replica_cpu_us_per_event", "replica CPU per consumed event", "us", 120.0),
            ("bytes_per_subscriber", "replica RSS per subscriber", "KB", None),
        ]
        panels = []
        for key, title, unit, line in panel_keys:
            values = [result.get(f"{key}_{s}") for s in sizes]
            if key == "bytes_per_subscriber":
                values = [v / 1024 if v is not None else None for v in values]
            panels.append(Panel(title, values, unit, line))
        write_curves_svg(
            Path(args.svg), "Signalman: two replicas, 100 tenants, ~5,000 deliveries/s",
            sizes, panels,
            note=f"./dev bench signalman-fanout, load average {result['load_average_start']} "
                 f"(2 shared cores); herd of {result.get('herd_subscribers')}: resumed in "
                 f"{result.get('herd_resume_s')} s, {result.get('herd_refused')} refused",
        )  # fmt: skip
        print(f"wrote {out} and {args.svg}")
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
