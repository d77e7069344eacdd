"""Steady synthetic traffic for the failover drills, and what it observed.

Three kinds of load run side by side while a drill injects its fault:

- ``FoghornViewers``: viewer routing straight to Foghorn through the typed client
  ``pkg.clients.foghorn`` given both replica addresses (failover is the client's job);
- ``BridgeViewers``: the GraphQL ``route`` query through Bridge. Bridge replicas sit behind a
  load balancer in production; ``BridgeViewers`` models one that tries the next upstream when
  one does not answer (nginx ``proxy_next_upstream``): the query is read-only, so that is safe;
- ``EventFlow``: numbered events produced to Kafka (the same ``KafkaSink`` Foghorn uses) and
  counted by subscribers through ``pkg.clients.signalman`` (reconnect + resume), so lost and
  duplicated events are counted by event id.

Every request and every delivery is recorded with monotonic timestamps; the drill computes
failures, latency and the moment traffic was healthy again from these records. Loads are
bounded (fixed rate, bounded concurrency) and stop when told.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import httpx
import structlog

from devtools.devtls import grpc_credentials, http_verify
from pkg.clients import BreakerPolicy, Policy, RetryPolicy
from pkg.clients.foghorn import FoghornClient
from pkg.clients.http import AsyncHttpClient
from pkg.clients.signalman import Gap, SignalmanClient
from pkg.events import Event
from pkg.events.kafka import KafkaSink
from pkg.events.sink import ManagedSink
from pkg.proto.signalman.v1 import signalman_pb2 as spb

log = structlog.get_logger("drills.traffic")

# Viewer routing: one overall deadline, short capped attempts so a dead or paused replica costs
# one attempt and the retry lands on the other replica.
VIEWER_POLICY = Policy(
    timeout=3.0, retry=RetryPolicy(max_attempts=4, attempt_timeout=0.6, base_backoff=0.02)
)
MAX_IN_FLIGHT = 64
# Connections the Bridge load balancer keeps per upstream (see BridgeViewers), idle ones kept
# 60 s (below the services' 75 s keep-alive, so the server never closes one being reused).
UPSTREAM_POOL = httpx.Limits(max_connections=4, max_keepalive_connections=4, keepalive_expiry=60.0)
# A paced generator further behind its schedule than this drops the slots it missed.
MAX_BEHIND_S = 0.25
# Cities viewers ask from (latitude, longitude): routing depends on them.
VIEWER_SPOTS = [(52.5, 13.4), (40.7, -74.0), (35.7, 139.7), (-23.5, -46.6), (51.5, -0.1)]

ROUTE_QUERY = (
    "query($c: String!, $lat: Float, $lon: Float) "
    "{ route(contentId: $c, latitude: $lat, longitude: $lon) { best { nodeId } } }"
)


@dataclass(frozen=True, slots=True)
class Sample:
    """One request: when it started and ended (monotonic seconds), and how it went."""

    start: float
    end: float
    ok: bool
    error: str = ""
    # A slow success: the upstream attempts it made (where, when, how long), as for a failure.
    path: str = ""

    @property
    def latency(self) -> float:
        return self.end - self.start


@dataclass
class Recorder:
    """Samples of one traffic source."""

    name: str
    samples: list[Sample] = field(default_factory=list)

    def add(self, start: float, ok: bool, error: str = "", path: str = "") -> None:
        self.samples.append(Sample(start, time.monotonic(), ok, error, path))

    def between(self, since: float, until: float = float("inf")) -> list[Sample]:
        return [s for s in self.samples if since <= s.start < until]

    def failures(self, since: float = 0.0, until: float = float("inf")) -> list[Sample]:
        return [s for s in self.between(since, until) if not s.ok]

    def last_bad(self, since: float, slow_s: float) -> float | None:
        """End time of the last failed or slow (> ``slow_s``) request started after ``since``."""
        bad = [s.end for s in self.between(since) if not s.ok or s.latency > slow_s]
        return max(bad) if bad else None


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q`` quantile (0..1) by nearest rank; 0.0 for no values."""
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


class _Paced:
    """Runs ``one()`` at a fixed rate with bounded concurrency until stopped."""

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._inflight: set[asyncio.Task[None]] = set()
        self.seq = 0
        self.skipped = 0  # slots dropped because the generator itself fell behind

    async def one(self, seq: int) -> None:
        raise NotImplementedError

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        interval = 1.0 / self.rate
        next_at = loop.time()
        while not self._stop.is_set():
            behind = loop.time() - next_at
            if behind > MAX_BEHIND_S:
                # This process was starved (a busy machine), not the platform: firing every
                # missed slot at once would be a burst no crowd of viewers makes, and it trips
                # the per-address limit this one address is charged for. Drop the missed slots.
                missed = int(behind * self.rate)
                self.skipped += missed
                next_at += missed * interval
                log.warning("traffic generator fell behind", behind_s=round(behind, 2),
                            skipped=missed, kind=type(self).__name__)  # fmt: skip
            if len(self._inflight) < MAX_IN_FLIGHT:
                task = asyncio.create_task(self.one(self.seq))
                self.seq += 1
                self._inflight.add(task)
                task.add_done_callback(self._inflight.discard)
            next_at += interval
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), max(0.0, next_at - loop.time()))

    async def stop(self) -> None:
        self._stop.set()
        if self._task is not None:
            await self._task
        if self._inflight:
            await asyncio.wait(list(self._inflight), timeout=10)


class FoghornViewers(_Paced):
    """Viewer routing straight to Foghorn (both replicas given to the client)."""

    def __init__(self, targets: Sequence[str], rate: float) -> None:
        super().__init__(rate)
        self.client = FoghornClient(
            list(targets), policy=VIEWER_POLICY, credentials=grpc_credentials()
        )
        self.recorder = Recorder("foghorn")

    async def one(self, seq: int) -> None:
        lat, lon = VIEWER_SPOTS[seq % len(VIEWER_SPOTS)]
        start = time.monotonic()
        try:
            reply = await self.client.route_viewer(f"drill-{seq % 97}", lat=lat, lon=lon)
        except Exception as exc:  # every failure counts, whatever its kind
            self.recorder.add(start, False, _describe(exc))
            return
        if reply.best.node_id:
            self.recorder.add(start, True)
        else:
            self.recorder.add(start, False, "no best node in the answer")

    async def close(self) -> None:
        await self.client.close()


class BridgeViewers(_Paced):
    """The GraphQL ``route`` query through Bridge, behind a health-checked load balancer.

    What the scaling RFC asks for in front of Bridge (and Foghorn's ``/play``): every upstream's
    ``/health`` is polled every ``HEALTH_EVERY_S``; requests go to the upstreams that answered
    200 (round robin), and to the next upstream when one does not answer (next-upstream). An
    upstream that stops (503 from the first moment of a SIGTERM) leaves the rotation at the next
    poll; one that comes back rejoins at the next poll, as with nginx's or Envoy's active checks.
    """

    HEALTH_EVERY_S = 0.25

    def __init__(self, urls: Sequence[str], jwt: str, rate: float) -> None:
        super().__init__(rate)
        self.urls = list(urls)
        # One attempt per upstream: the load balancer moves to the next one; no breaker (the
        # health checks decide the rotation, and a refused connection costs nothing).
        policy = replace(Policy.no_retries(timeout=2.0), breaker=BreakerPolicy(enabled=False))
        # A warm pool of connections per upstream, as a balancer keeps (nginx's upstream
        # keepalive, Envoy's per-host pools): a burst queues for a pooled connection instead
        # of opening one per request. With HTTPS each new connection is a TLS handshake on
        # this process's and the Bridge's event loops (Python TLS on both), slower than the
        # queue when the machine is loaded: when one Bridge stopped, the survivor's pool grew
        # by ~30 connections in 6 s, each handshake 0.2-1.1 s, and requests timed out.
        self.http = {
            url: AsyncHttpClient(policy=policy, verify=http_verify(), limits=UPSTREAM_POOL)
            for url in self.urls
        }
        # Health checks on connections of their own: never queued behind the traffic.
        self.probe_http = AsyncHttpClient(
            policy=policy, verify=http_verify(), limits=httpx.Limits(keepalive_expiry=60.0)
        )
        self.headers = {"authorization": f"Bearer {jwt}"}
        self.recorder = Recorder("bridge")
        self.healthy = {url: True for url in self.urls}  # until the first poll says otherwise
        self._checker: asyncio.Task[None] | None = None

    def start(self) -> None:
        super().start()
        self._checker = asyncio.create_task(self._check_health())

    async def _check_one(self, url: str) -> None:
        try:
            reply = await self.probe_http.get(url.removesuffix("/graphql") + "/health", timeout=1.0)
            self.healthy[url] = reply.status_code == 200
        except Exception:
            self.healthy[url] = False

    async def _check_health(self) -> None:
        while True:
            await asyncio.gather(*(self._check_one(u) for u in self.urls))
            await asyncio.sleep(self.HEALTH_EVERY_S)

    def _order(self, seq: int) -> list[str]:
        turn = [self.urls[(seq + i) % len(self.urls)] for i in range(len(self.urls))]
        # Healthy upstreams first; the others only when none is (a balancer's panic mode).
        return [u for u in turn if self.healthy[u]] + [u for u in turn if not self.healthy[u]]

    async def one(self, seq: int) -> None:
        lat, lon = VIEWER_SPOTS[seq % len(VIEWER_SPOTS)]
        body = {
            "query": ROUTE_QUERY,
            "variables": {"c": f"drill-{seq % 97}", "lat": lat, "lon": lon},
        }
        start = time.monotonic()
        errors = []
        for url in self._order(seq):
            # Which upstream, when and how long: a failure names each attempt it made.
            at = time.monotonic()
            try:
                reply = await self.http[url].post(url, json=body, headers=self.headers, timeout=2.0)
            except Exception as exc:  # this upstream did not answer: try the next one
                errors.append(_attempt(url, at, start, _describe(exc)))
                continue
            if reply.status_code >= 500:
                errors.append(_attempt(url, at, start, f"HTTP {reply.status_code}"))
                continue
            try:
                doc = reply.json()
                node = doc["data"]["route"]["best"]["nodeId"]
            except (ValueError, KeyError, TypeError):
                detail = reply.text[:160].replace("\n", " ")
                self.recorder.add(start, False, f"HTTP {reply.status_code}: {detail}")
                return
            if node:
                path = "; ".join([*errors, _attempt(url, at, start, "ok")])
                self.recorder.add(start, True, path=path[:300])
            else:
                self.recorder.add(start, False, "no best node in the answer")
            return
        self.recorder.add(start, False, "; ".join(errors)[:300])

    async def stop(self) -> None:
        if self._checker is not None:
            self._checker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._checker
            self._checker = None
        await super().stop()

    async def close(self) -> None:
        for client in (*self.http.values(), self.probe_http):
            await client.aclose()


@dataclass
class Subscriber:
    """One subscription's view of the drill's events."""

    name: str
    received: dict[str, list[float]] = field(default_factory=dict)  # event id -> arrival times
    # (event id, offset, epoch) in delivery order: the history checker's view of the stream.
    deliveries: list[tuple[str, int, str]] = field(default_factory=list)
    gaps: int = 0
    error: str = ""  # why the subscription ended, if it did
    task: asyncio.Task[None] | None = None
    sub: Any = None


class EventFlow:
    """Numbered events to Kafka and subscribers that count them by id."""

    CHANNEL = "streams"
    TYPE = "stream.drill_probe"

    def __init__(
        self,
        bootstrap: str,
        topic: str,
        tenant: str,
        signalman_targets: Sequence[str],
        token: str,
        rate: float,
        *,
        sink: ManagedSink | None = None,
        subscribers: int = 0,
    ) -> None:
        """``sink``: where the events go instead of Kafka at ``bootstrap`` (e.g. Signalman's
        Publish RPC, the embedded platform); ``subscribers``: how many, when not one per replica
        order (a ``file:`` or ``dns:///`` target is one changing list, not a replica)."""
        self.run_id = uuid.uuid4().hex[:10]
        self.tenant = tenant
        self.rate = rate
        self.sink: ManagedSink = sink or KafkaSink(bootstrap, topic=topic, source="drill")
        self.produced: dict[str, float] = {}  # event id -> emit time
        targets = list(signalman_targets)
        # One subscriber per replica order, so whichever replica dies some subscriber was on it.
        orders = [targets[i:] + targets[:i] for i in range(len(targets))]
        names = [f"sub-{order[0]}" for order in orders]
        if subscribers:
            orders = [orders[i % len(orders)] for i in range(subscribers)]
            names = [f"sub-{i}" for i in range(subscribers)]
        self.clients = [
            SignalmanClient(order, token=token, credentials=grpc_credentials()) for order in orders
        ]
        self.subscribers = [Subscriber(name) for name in names]
        self._stop = asyncio.Event()
        self._producer: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Subscribe (and wait until confirmed), then start producing."""
        for client, subscriber in zip(self.clients, self.subscribers, strict=True):
            subscriber.sub = client.subscribe([self.CHANNEL])
            subscriber.sub.start()
            await subscriber.sub.wait_subscribed(30)
            subscriber.task = asyncio.create_task(self._consume(subscriber))
        self._producer = asyncio.create_task(self._produce())

    async def _produce(self) -> None:
        loop = asyncio.get_running_loop()
        seq = 0
        next_at = loop.time()
        while not self._stop.is_set():
            event = Event(self.TYPE, self.tenant, {"run": self.run_id, "seq": seq})
            self.produced[event.id] = time.monotonic()
            self.sink.emit(event)  # never blocks: the sink buffers while Kafka is away
            seq += 1
            next_at += 1.0 / self.rate
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), max(0.0, next_at - loop.time()))

    async def _consume(self, subscriber: Subscriber) -> None:
        try:
            await self._consume_items(subscriber)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the subscription gave up (e.g. refused resume): record why
            subscriber.error = f"{type(exc).__name__}: {exc}"[:300]
            log.warning("drill subscription ended", subscriber=subscriber.name, error=str(exc))

    async def _consume_items(self, subscriber: Subscriber) -> None:
        async for item in subscriber.sub:
            if isinstance(item, Gap):
                subscriber.gaps += 1
                log.warning("drill subscriber saw a history gap", gap=str(item))
                continue
            if not isinstance(item, spb.Event) or item.type != self.TYPE:
                continue
            try:
                if json.loads(item.data_json).get("run") != self.run_id:
                    continue
            except ValueError:
                continue
            subscriber.received.setdefault(item.id, []).append(time.monotonic())
            subscriber.deliveries.append((item.id, item.offset, item.epoch))

    async def switch_sink(self, sink: ManagedSink) -> None:
        """Send the next events to ``sink`` (a producer moved to another path, as a rollout
        step does); the events the old sink still holds are sent before it closes."""
        old, self.sink = self.sink, sink
        await self._close_sink(old)

    @staticmethod
    async def _close_sink(sink: ManagedSink) -> None:
        if isinstance(sink, KafkaSink):
            await asyncio.to_thread(sink.close)  # the full flush time, not aclose's 2 s
        else:
            await sink.aclose()

    async def stop_producing(self) -> None:
        self._stop.set()
        if self._producer is not None:
            await self._producer

    def missing(self) -> int:
        """Events some subscriber has not received (summed over subscribers)."""
        return sum(
            sum(1 for eid in self.produced if eid not in s.received) for s in self.subscribers
        )

    def duplicates(self) -> int:
        """Extra deliveries of an event id (summed over subscribers)."""
        return sum(sum(len(times) - 1 for times in s.received.values()) for s in self.subscribers)

    async def drain(self, wait_s: float) -> None:
        """Wait (bounded) until every subscriber received every produced event."""
        deadline = time.monotonic() + wait_s
        while self.missing() and time.monotonic() < deadline:  # noqa: ASYNC110 (bounded poll)
            await asyncio.sleep(0.1)

    def late(self, since: float, late_s: float) -> list[tuple[float, float]]:
        """(produced, arrival) of every event produced after ``since`` that took longer than
        ``late_s`` to reach a subscriber (arrival = now when it never did)."""
        now = time.monotonic()
        late = []
        for s in self.subscribers:
            for eid, produced in self.produced.items():
                if produced < since:
                    continue
                times = s.received.get(eid)
                arrival = times[0] if times else now
                if arrival - produced > late_s:
                    late.append((produced, arrival))
        return late

    def last_late(self, since: float, late_s: float) -> float | None:
        """Arrival time of the last event produced after ``since`` that took longer than
        ``late_s`` to reach a subscriber (or never did: then now)."""
        return max((arrival for _, arrival in self.late(since, late_s)), default=None)

    def stalled_since(self, since: float, late_s: float) -> float | None:
        """The first moment after ``since`` at which some event was ``late_s`` overdue."""
        return min((produced + late_s for produced, _ in self.late(since, late_s)), default=None)

    async def close(self) -> None:
        await self.stop_producing()
        for subscriber in self.subscribers:
            if subscriber.task is not None:
                subscriber.task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await subscriber.task
            if subscriber.sub is not None:
                await subscriber.sub.close()
        for client in self.clients:
            await client.close()
        await self._close_sink(self.sink)


def _describe(exc: BaseException) -> str:
    # gRPC errors (sync grpc.Call and grpc.aio.AioRpcError alike) carry code() and details().
    code = getattr(exc, "code", None)
    details = getattr(exc, "details", None)
    if callable(code) and callable(details):
        with contextlib.suppress(Exception):
            return f"{code().name}: {details()}"[:200]
    return f"{type(exc).__name__}: {exc}"[:200]


def _attempt(url: str, at: float, start: float, what: str) -> str:
    """One upstream attempt of a query: where it went, when (seconds into the query)
    and how long it took, so a failure tells a slow survivor from a dead upstream."""
    host = url.split("://", 1)[-1].split("/", 1)[0]
    return f"{host} +{at - start:.2f}s {time.monotonic() - at:.2f}s {what}"
