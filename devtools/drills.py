"""./dev drill [NAME|all] [--short]: failover drills that measure recovery and data loss.

Each drill starts from a healthy platform (the ``./dev up`` stack, started once and reused),
runs steady synthetic traffic (viewer routing through Bridge and straight to Foghorn, events
through Signalman: see ``devtools.drill_traffic``), injects one fault and measures:

- ``detect_s``: fault until health (or, for the broker, event delivery) shows it;
- ``recover_s``: fault until traffic is fully healthy again (after the last failed or slow
  request and the last late event; 0 when traffic never degraded);
- ``restored_s``: fault until every process is back and healthy (full redundancy again);
- ``failed_requests`` (viewer routings, both paths), ``lost_events``, ``duplicate_events``;
- ``ok``: whether the drill's stated expected outcome was met (``problems`` says what was not).

It prints a table, records the figures in ``.bench/drills.json`` and exits 1 when any drill is
not ok. That file holds one section per platform (``loopback``, ``hosts``, ``loopback+tls``,
``hosts+tls``); a run replaces the rows of the drills it ran in its platform's section and keeps
every other row, so ``./dev drill all`` and ``./dev drill all --hosts`` never overwrite each
other's figures. Each row says when it was measured and in which mode (``short``/``full``); a
partition drill's row carries ``facts.record``: cut and heal times, takeover times, failed
routings, lost and duplicated events and the history checker's verdict.
``--short`` shortens TTLs, session timeouts and phases so a drill takes seconds (the test suite
runs it); the full mode runs ``./dev up``'s defaults. ``--hosts`` runs the platform with every
process on a simulated host of its own (``devtools.hosts``) and adds the network partition drills
(``devtools.drill_partitions``), which need it. After every drill the history checker
(``devtools.checker``) judges what the replicas recorded. Runbooks: docs/runbooks/.
"""

from __future__ import annotations

import os

# A child Python has to fork rather than vfork (initdb switches to the postgres user in Python)
# runs gRPC's fork handlers, which can crash it before it execs while channels are busy in
# other threads (seen: postgres "exited with -11"; the server itself now switches user with
# setpriv after the exec). The drills only fork to exec, so they need no fork support.
# Must be set before grpc is imported (grpc reads it once).
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "0")

import argparse
import asyncio
import contextlib
import fcntl
import json
import signal
import subprocess
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import structlog

from devtools import hosts as simhosts
from devtools import up
from devtools.alerts import AlertWatch, wait_scraped
from devtools.devtls import http_verify
from devtools.drill_traffic import (
    BridgeViewers,
    EventFlow,
    FoghornViewers,
    Recorder,
    percentile,
)
from devtools.drill_zombie import ZombieProbe
from devtools.supervisor import Managed
from pkg.clients import BreakerPolicy, Policy
from pkg.clients.http import AsyncHttpClient
from pkg.common.logging import configure_logging

log = structlog.get_logger("drills")
ROOT = Path(__file__).resolve().parent.parent
BENCH_FILE = ROOT / ".bench" / "drills.json"
EVENT_TENANT = "demo"  # the tenant ./dev up's Signalman demo token subscribes as


@dataclass(frozen=True)
class Settings:
    """How long each phase lasts, and the platform settings the stack is started with."""

    nodes: int = 20
    warmup_s: float = 4.0
    quiet_s: float = 4.0  # traffic must stay healthy this long before a drill ends
    settle_max_s: float = 90.0
    healthy_timeout_s: float = 120.0
    drain_s: float = 20.0
    down_s: float = 5.0  # how long Redis / PostgreSQL stay stopped
    broker_pause_s: float = 10.0
    pause_margin_s: float = 3.0  # paused this long past the ownership TTL
    ownership_ttl_s: float = 15.0  # Foghorn's default
    foghorn_rate: float = 40.0
    bridge_rate: float = 15.0
    event_rate: float = 20.0
    slow_s: float = 1.0  # a routing answer slower than this is not healthy
    late_s: float = 2.0  # an event later than this is not healthy
    recover_target_s: float = 10.0
    # How long an expected alert may keep firing after traffic recovered (its rate windows and
    # hold times, on the local platform's clock, must pass).
    alerts_resolve_s: float = 60.0
    # How long after traffic recovered an expected alert not seen yet is still waited for.
    # ReplicaRestarted can only fire after the recovery: Prometheus sees the restarted process
    # at its first scrape once it serves and fires at the rule evaluation after that (1 s each
    # here, later on a loaded machine), while traffic through a killed Foghorn replica's peer
    # is clean again within seconds (a CI run on 2 busy cores stopped watching before it).
    # The alerts the drills expect hold `for:` 1 minute at most: 2-3 s on the drills' clock.
    alerts_fire_s: float = 15.0
    # Added to every documented port of the drills' platform (./dev up's --port-offset), so a
    # drill runs beside another platform on this host.
    port_offset: int = 0
    # --tls: drills on a platform of their own (rollout) run TLS and mTLS on every hop as well.
    tls: bool = False
    # The alert rules' clock on the drills' platform (./dev up's --rules-time-scale).
    rules_time_scale: float = 1 / 20
    # Signalman's consumer-group session timeout: tansu holds every JoinGroup while less than
    # half of it has passed, in 1 s steps (3 s: 2 s, 2 s or less: 1 s), and nothing is processed
    # during a join (eager rebalances), so 2 s is the shortest join tansu gives. Real Kafka
    # refuses a session below group.min.session.timeout.ms (6 s by default) and does not hold
    # joins: a dev-stack value only (./dev up uses the same one, docs/signalman.md).
    # The drills' direct viewers all come from 127.0.0.1: one address standing for the whole
    # audience. At 40 routings/s plus a 20 % retry budget it sits at Foghorn's per-address
    # anonymous limit (50/s, burst 100), so a replica down (every call on the other one) or a
    # catch-up burst of the load generator got RESOURCE_EXHAUSTED for what is many viewers.
    env: tuple[tuple[str, str], ...] = (
        ("SIGNALMAN_SESSION_TIMEOUT_MS", "2000"),
        ("SIGNALMAN_HEARTBEAT_INTERVAL_MS", "200"),
        ("FOGHORN_ANON_ROUTES_PER_S", "500"),
        ("FOGHORN_ANON_ROUTE_BURST", "1000"),
    )

    @classmethod
    def short(cls) -> Settings:
        return cls(
            nodes=8,
            warmup_s=1.5,
            quiet_s=1.5,
            settle_max_s=45.0,
            healthy_timeout_s=60.0,
            drain_s=15.0,
            down_s=2.0,
            # Long enough for the sink's no-acknowledgement alert on the short rules clock.
            broker_pause_s=8.0,
            pause_margin_s=1.5,
            ownership_ttl_s=3.0,
            foghorn_rate=30.0,
            bridge_rate=10.0,
            event_rate=15.0,
            # Short drills resolve their alerts sooner: ReplicaRestarted's 15 minutes are 30 s.
            rules_time_scale=1 / 30,
            env=(
                ("FOGHORN_OWNERSHIP_TTL_S", "3"),
                ("FOGHORN_LEASE_TTL_S", "3"),
                ("FOGHORN_LEASE_RENEW_S", "1"),
                ("SIGNALMAN_SESSION_TIMEOUT_MS", "2000"),
                ("SIGNALMAN_HEARTBEAT_INTERVAL_MS", "200"),
                ("SIGNALMAN_LOCK_GRACE_S", "1.0"),
                ("FOGHORN_ANON_ROUTES_PER_S", "500"),
                ("FOGHORN_ANON_ROUTE_BURST", "1000"),
            ),
        )


@dataclass
class Result:
    """One drill's figures (the JSON row) and verdict."""

    name: str
    expected: str
    ok: bool = False
    detect_s: float | None = None
    recover_s: float | None = None
    restored_s: float | None = None
    failed_requests: int = 0
    failed_foghorn: int = 0
    failed_bridge: int = 0
    requests: int = 0
    lost_events: int = 0
    duplicate_events: int = 0
    events_produced: int = 0
    history_gaps: int = 0
    route_p99_before_ms: float = 0.0
    route_p99_fault_ms: float = 0.0
    alerts_expected: list[str] = field(default_factory=list)
    alerts_fired: list[str] = field(default_factory=list)  # every alert seen firing, in order
    alerts_resolved: list[str] = field(default_factory=list)  # expected ones that then cleared
    problems: list[str] = field(default_factory=list)
    facts: dict[str, Any] = field(default_factory=dict)
    errors_sample: list[str] = field(default_factory=list)


class HealthMonitor:
    """Polls every service's /health (one attempt each, 0.25 s apart) and keeps the latest."""

    def __init__(self, items: list[Managed]) -> None:
        self.urls = {i.name: i.health_url for i in items if i.health_url}
        self.latest: dict[str, dict[str, Any]] = {n: {} for n in self.urls}
        policy = replace(Policy.no_retries(timeout=0.8), breaker=BreakerPolicy(enabled=False))
        # The operator's credential: the full /health documents (figures, HA, partitions).
        self.http = AsyncHttpClient(policy=policy, token=up.OPERATOR_TOKEN, verify=http_verify())
        self.detector: Callable[[dict[str, dict[str, Any]]], bool] | None = None
        self.detected_at: float | None = None
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def _fetch(self, name: str, url: str) -> None:
        try:
            reply = await self.http.get(url, timeout=0.8)
            doc = reply.json()
            self.latest[name] = doc if isinstance(doc, dict) else {"status": "bad document"}
        except Exception:  # refused, timed out (paused), garbage: not answering
            self.latest[name] = {"status": "unreachable"}

    async def _run(self) -> None:
        while True:
            await asyncio.gather(*(self._fetch(n, u) for n, u in self.urls.items()))
            if self.detector is not None and self.detected_at is None:
                with contextlib.suppress(Exception):
                    if self.detector(self.latest):
                        self.detected_at = time.monotonic()
            await asyncio.sleep(0.25)

    def arm(self, detector: Callable[[dict[str, dict[str, Any]]], bool] | None) -> None:
        self.detector, self.detected_at = detector, None

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self.http.aclose()


class Platform:
    """The running stack, a supervision thread, and health watching."""

    def __init__(
        self,
        settings: Settings,
        run_dir: Path | None = None,
        hosts: bool = False,
        ha_stores: bool = False,
        tls: bool = False,
    ) -> None:
        args = up.parser().parse_args(
            # The drills run their own measured traffic: no background viewers. Replicas record
            # their coordination history for the checker.
            [
                "--nodes",
                str(settings.nodes),
                "--viewers",
                "0",
                "--env=PLATFORM_HISTORY=1",
                f"--rules-time-scale={settings.rules_time_scale}",
                *[f"--env={k}={v}" for k, v in settings.env],
                *(["--hosts"] if hosts else []),
                *(["--ha-stores"] if ha_stores else []),
                f"--port-offset={settings.port_offset}",
                *(["--tls"] if tls else []),
            ]
        )
        args.run_dir = run_dir or ROOT / ".run" / f"drills-{time.strftime('%Y%m%d-%H%M%S')}"
        self.settings = settings
        self.started_at = time.time()  # history lines from here on belong to this platform
        self.stack = up.build_stack(args)
        # Partition faults (hosts only); every drill heals what it left at its end.
        self.faults = simhosts.Faults(self.stack.hosts) if self.stack.hosts else None
        self.lock = threading.Lock()  # supervision rounds and fault injection never interleave
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._supervise, name="drill-supervisor")
        self._thread.daemon = True
        self._thread.start()
        self.monitor = HealthMonitor(self.stack.sup.items)

    def _supervise(self) -> None:
        while not self._stop.wait(0.5):
            with self.lock:
                self.stack.sup.tick()

    def item(self, name: str) -> Managed:
        for item in self.stack.sup.items:
            if item.name == name:
                return item
        raise KeyError(name)

    def endpoint(self, key: str) -> list[str]:
        return self.stack.endpoints[key]

    def health(self, name: str) -> dict[str, Any]:
        return self.monitor.latest.get(name, {})

    def unhealthy(self) -> list[str]:
        """Why the platform is not (yet) fully healthy; [] when it is."""
        why = []
        for item in self.stack.sup.items:
            if item.state != "running" or not item.proc.running:
                why.append(f"{item.name} {item.state}")
        for name in self.monitor.urls:
            status = self.health(name).get("status")
            if status != "ok":
                why.append(f"{name} health {status}")
        for name in ("foghorn-0", "foghorn-1"):
            nodes = (self.health(name).get("figures") or {}).get("nodes")
            if nodes != self.settings.nodes:
                why.append(f"{name} sees {nodes} of {self.settings.nodes} nodes connected")
        owned = [
            p[1]
            for n in ("signalman-0", "signalman-1")
            for p in self.health(n).get("partitions", [])
        ]
        if sorted(owned) != list(range(up.EVENTS_PARTITIONS)):
            why.append(f"signalman partitions owned {sorted(owned)}")
        # Full redundancy is both replicas in the consumer group: a restarted replica answers ok
        # before its join completes while the other still owns every partition, and stopping
        # that other one then (a rolling restart's next step) left the group with a join in
        # flight and a departed leader, which tansu never replaces: the joining member recovers
        # by itself (signalman/consumer.py, 'group_join_stalled') but only after its join
        # timeout, too late for a rolling restart's 2 s.
        for name in ("signalman-0", "signalman-1"):
            if not self.health(name).get("partitions"):
                why.append(f"{name} owns no partition (not in the consumer group yet)")
        return why

    async def wait_healthy(self, timeout_s: float) -> float | None:
        """Wait (bounded) until the platform is fully healthy; the moment it was, or None."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not self.unhealthy():
                return time.monotonic()
            await asyncio.sleep(0.25)
        return None

    async def run_locked(self, fn: Callable[[], None]) -> None:
        """Run a blocking fault action between supervision rounds."""

        def locked() -> None:
            with self.lock:
                fn()

        await asyncio.to_thread(locked)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(10)
        up.stop_stack(self.stack)


@dataclass
class Ctx:
    """What a drill's fault and checks work with."""

    platform: Platform
    settings: Settings
    t_fault: float = 0.0
    facts: dict[str, Any] = field(default_factory=dict)
    events: EventFlow | None = None  # the drill's event traffic (for the history checker)
    recorders: tuple[Recorder, ...] = ()  # the drill's routing traffic (direct, through Bridge)


Detector = Callable[[dict[str, dict[str, Any]]], bool]


@dataclass(frozen=True)
class Drill:
    name: str
    expected: str
    inject: Callable[[Ctx], Awaitable[None]]
    detect: Detector | None
    detect_what: str
    check: Callable[[Ctx, Result], list[str]]
    needs_hosts: bool = False  # partition drills: only with --hosts
    needs_ha_stores: bool = False  # store failover drills: on a platform of their own
    # The alerts (deploy/prometheus/alerts.yml) this fault must fire, read from the platform's
    # Prometheus during the fault, and that must resolve once the platform recovered.
    alerts: tuple[str, ...] = ()
    # A drill that builds its own platform (the rollout starts from the embedded default):
    # run as alone(settings, run_dir) instead of on the shared one.
    alone: Callable[[Settings, Path], Coroutine[Any, Any, Result]] | None = None


# Called after every drill's own check (more problems, more facts): the history checker.
AFTER_DRILL: list[Callable[[Ctx, Result], None]] = []


# -- faults -------------------------------------------------------------------------------------
def kill(*names: str) -> Callable[[Ctx], Awaitable[None]]:
    async def inject(ctx: Ctx) -> None:
        for name in names:
            await ctx.platform.run_locked(ctx.platform.item(name).proc.kill)

    return inject


def kill_and_hold(*names: str, alert_for_s: float) -> Callable[[Ctx], Awaitable[None]]:
    """kill -9 ``names`` and keep them down ``down_s`` plus ``alert_for_s`` (the production
    ``for:`` of the alert the outage must fire) on the drills' rules clock, then hand them back
    to the supervisor. Restarted at once, both Foghorn replicas were back 3.3 s after the kill:
    the alert's 3 s just met or just missed, so whether ServiceDown fired was chance."""

    async def inject(ctx: Ctx) -> None:
        items = [ctx.platform.item(name) for name in names]

        def down() -> None:
            for item in items:
                item.supervise = False
                item.proc.kill()

        def back() -> None:
            for item in items:
                item.supervise = True  # the supervisor's next round starts it

        await _outage(ctx, down, back, alert_for_s)

    return inject


async def _outage(
    ctx: Ctx, down: Callable[[], None], back: Callable[[], None], alert_for_s: float
) -> None:
    """``down()``, wait ``down_s`` plus ``alert_for_s`` (an alert's production ``for:``) on the
    drills' rules clock, then ``back()``, also when the wait is interrupted."""
    try:
        await ctx.platform.run_locked(down)
        s = ctx.settings
        await asyncio.sleep(s.down_s + alert_for_s * s.rules_time_scale)
    finally:
        await ctx.platform.run_locked(back)


def stop_and_start(name: str, alert_for_s: float = 0.0) -> Callable[[Ctx], Awaitable[None]]:
    """Stop a server the way an operator restarts it, keep it down ``down_s``, start it again.

    ``alert_for_s``: the production ``for:`` of the alert the outage must fire; the server stays
    down that much longer on the drills' rules clock, so the alert's condition holds well past
    its ``for:`` (PostgreSQL: the singleton leader notices the lost lock ~4 s into a 5 s outage,
    which left LeaderMissing's 3 s just met or just missed).

    PostgreSQL gets a *fast* shutdown (SIGINT: sessions are terminated, like
    ``pg_ctl restart -m fast``); a smart shutdown (SIGTERM) would wait for every client to
    leave. While the server is down on purpose the supervisor leaves it alone; if it does not
    come back, supervision is restored anyway and the supervisor restarts it with backoff.
    """

    async def inject(ctx: Ctx) -> None:
        item = ctx.platform.item(name)

        def stop() -> None:
            item.supervise = False
            popen = item.proc.proc
            if name == "postgres" and popen is not None:
                popen.send_signal(signal.SIGINT)
                try:
                    popen.wait(timeout=15)
                    item.proc.proc = None
                    return
                except subprocess.TimeoutExpired:
                    pass
            item.proc.stop(timeout=10)

        def start() -> None:
            try:
                item.proc.start(wait=True)
                item.proc.restarts += 1
            except Exception as exc:
                # Seen: the forked child dies (SIGSEGV) before exec when other threads are inside
                # gRPC. The server is then down like after a crash: the supervisor restarts it
                # with backoff, which is what the drill measures from here on.
                item.proc.proc = None
                ctx.facts["restart_failed"] = str(exc).splitlines()[0][:200]
            finally:
                item.supervise = True

        await _outage(ctx, stop, start, alert_for_s)

    return inject


async def pause_broker(ctx: Ctx) -> None:
    broker = ctx.platform.item("tansu")
    await ctx.platform.run_locked(broker.proc.pause)
    try:
        await asyncio.sleep(ctx.settings.broker_pause_s)
    finally:
        await ctx.platform.run_locked(broker.proc.resume)


async def pause_foghorn(ctx: Ctx) -> None:
    """SIGSTOP foghorn-0 past its ownership TTL while a probe node moves to foghorn-1."""
    platform, s = ctx.platform, ctx.settings
    victim, survivor = platform.item("foghorn-0"), platform.item("foghorn-1")
    targets = platform.endpoint("foghorn grpc")
    probe = ZombieProbe(
        targets[0], targets[1], up.OPERATOR_TOKEN, up.NODE_TOKEN, run_id=f"{int(time.time())}"
    )
    before = platform.health(victim.name).get("ha", {})
    ctx.facts["victim_fenced_before"] = before.get("takeovers", 0) + before.get(
        "writes_rejected", 0
    )
    try:
        await probe.before_pause(victim.name)
        ctx.t_fault = time.monotonic()  # the fault is the pause itself
        await platform.run_locked(victim.proc.pause)
        try:
            await asyncio.sleep(s.ownership_ttl_s + s.pause_margin_s)
            await probe.during_pause()
        finally:
            await platform.run_locked(victim.proc.resume)
        await probe.after_resume(survivor.name, wait_s=max(15.0, s.ownership_ttl_s))

        async def fenced_count() -> int:
            ha = platform.health(victim.name).get("ha", {})
            return int(ha.get("takeovers", 0)) + int(ha.get("writes_rejected", 0))

        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if await fenced_count() > ctx.facts["victim_fenced_before"]:
                break
            await asyncio.sleep(0.25)
        after = platform.health(victim.name).get("ha", {})
        ctx.facts["victim_fenced_after"] = after.get("takeovers", 0) + after.get(
            "writes_rejected", 0
        )
        ctx.facts["victim_takeovers"] = after.get("takeovers")
        ctx.facts["victim_writes_rejected"] = after.get("writes_rejected")
    finally:
        ctx.facts.update(probe.facts)
        await probe.close()


# -- detectors ----------------------------------------------------------------------------------
def unreachable(*names: str) -> Detector:
    return lambda docs: any(docs.get(n, {}).get("status") == "unreachable" for n in names)


def foghorn_degraded(docs: dict[str, dict[str, Any]]) -> bool:
    return any(docs.get(n, {}).get("status") == "degraded" for n in ("foghorn-0", "foghorn-1"))


def signalman_lock_lost(docs: dict[str, dict[str, Any]]) -> bool:
    return any(
        docs.get(n, {}).get("postgres_lock_connection") == "reconnecting"
        or docs.get(n, {}).get("status") not in ("ok", None)
        for n in ("signalman-0", "signalman-1")
    )


# -- expected outcomes --------------------------------------------------------------------------
def _no_failed_routing(r: Result) -> list[str]:
    return [] if r.failed_requests == 0 else [f"{r.failed_requests} viewer routings failed"]


def _no_event_loss(r: Result) -> list[str]:
    out = []
    if r.lost_events:
        out.append(f"{r.lost_events} events lost")
    if r.duplicate_events:
        out.append(f"{r.duplicate_events} events duplicated")
    return out


def _restored(r: Result) -> list[str]:
    return [] if r.restored_s is not None else ["the platform did not become healthy again"]


def _recovered_within(target: float) -> Callable[[Result], list[str]]:
    def check(r: Result) -> list[str]:
        if r.recover_s is None or r.recover_s > target:
            return [f"traffic recovered after {r.recover_s} s (target <= {target:g} s)"]
        return []

    return check


def single_kill_check(ctx: Ctx, r: Result) -> list[str]:
    return [
        *_no_failed_routing(r),
        *_no_event_loss(r),
        *_restored(r),
        *_recovered_within(ctx.settings.recover_target_s)(r),
    ]


def both_foghorn_check(ctx: Ctx, r: Result) -> list[str]:
    out = [*_restored(r), *_no_event_loss(r)]
    if r.failed_foghorn == 0:
        out.append("routing did not fail with both Foghorn replicas down (expected it to)")
    if r.recover_s is None:
        out.append("routing did not recover")
    for name in ("foghorn-0", "foghorn-1"):
        if not ctx.platform.health(name).get("ha", {}).get("rehydrations"):
            out.append(f"{name} did not rehydrate its state from Redis")
    return out


def redis_check(ctx: Ctx, r: Result) -> list[str]:
    # Live events must keep flowing: only history from before the restart may be gone (the
    # subscribers are told with an explicit gap), not events published around it.
    out = [*_no_failed_routing(r), *_no_event_loss(r), *_restored(r)]
    if r.detect_s is None:
        out.append("Foghorn never reported degraded while Redis was down")
    return out


def postgres_check(ctx: Ctx, r: Result) -> list[str]:
    out = [*_no_failed_routing(r), *_no_event_loss(r), *_restored(r)]
    if r.detect_s is None:
        out.append("Signalman never reported its lock connection lost")
    return out


def pause_check(ctx: Ctx, r: Result) -> list[str]:
    f = ctx.facts
    out = [*_restored(r)]
    if not f.get("owned_by_victim_before"):
        out.append("the probe node was never owned by foghorn-0")
    if not f.get("survivor_took_over"):
        out.append("foghorn-1 did not take the probe node over during the pause")
    if f.get("zombie_stream_status") != "ABORTED":
        out.append(f"the zombie's stream ended {f.get('zombie_stream_status')}, not ABORTED")
    if not f.get("victim_fenced_after", 0) > f.get("victim_fenced_before", 0):
        out.append("foghorn-0 reports no fenced write or takeover after waking up")
    if not (f.get("survivor_data_kept_on_survivor") and f.get("survivor_data_kept_on_victim")):
        out.append("the zombie's late write overwrote the new owner's data")
    # Viewer routings that fail while the replica hangs are counted and shown, not judged: a
    # hung replica keeps its TCP connections, so clients keep sending it requests until their
    # attempt timeouts fire (see docs/runbooks/foghorn-paused-replica.md).
    return out


def broker_check(ctx: Ctx, r: Result) -> list[str]:
    # Duplicates are counted but expected here: the producer (pkg.events.kafka) is at least once
    # and sends again what Kafka did not acknowledge within its request timeout, and Signalman
    # de-duplicates by partition offset, not by event id (see docs/runbooks/kafka-outage.md).
    out = [*_no_failed_routing(r), *_restored(r)]
    if r.lost_events:
        out.append(f"{r.lost_events} events lost")
    limit = max(3 * r.route_p99_before_ms, r.route_p99_before_ms + 100.0)
    if r.route_p99_fault_ms > limit:
        out.append(
            f"routing p99 {r.route_p99_fault_ms:.1f} ms while the broker was away "
            f"(normal {r.route_p99_before_ms:.1f} ms, limit {limit:.1f} ms)"
        )
    return out


DRILLS: list[Drill] = [
    Drill(
        "foghorn-kill",
        "kill -9 one Foghorn replica: 0 failed viewer routings, recover <= 10 s, no event loss; "
        "the supervisor restarts it and it rehydrates",
        kill("foghorn-0"),
        unreachable("foghorn-0"),
        "foghorn-0 /health unreachable",
        single_kill_check,
        alerts=("ReplicaRestarted",),
    ),
    Drill(
        "bridge-kill",
        "kill -9 one Bridge replica: 0 failed viewer routings through the load balancer, "
        "recover <= 10 s; the supervisor restarts it",
        kill("bridge-0"),
        unreachable("bridge-0"),
        "bridge-0 /health unreachable",
        single_kill_check,
        alerts=("ReplicaRestarted",),
    ),
    Drill(
        "signalman-kill",
        "kill -9 one Signalman replica: subscribers resume on the other, 0 lost and 0 "
        "duplicated events, recover <= 10 s",
        kill("signalman-0"),
        unreachable("signalman-0"),
        "signalman-0 /health unreachable",
        single_kill_check,
        alerts=("ReplicaRestarted",),
    ),
    Drill(
        "foghorn-both",
        "kill -9 both Foghorn replicas: direct routing fails while both are down and recovers "
        "by itself once the supervisor restarted them; state rehydrates from Redis",
        kill_and_hold("foghorn-0", "foghorn-1", alert_for_s=60.0),  # ServiceDown: for 1m
        unreachable("foghorn-0", "foghorn-1"),
        "foghorn /health unreachable",
        both_foghorn_check,
        alerts=("ReplicaRestarted", "ServiceDown"),
    ),
    Drill(
        "redis-restart",
        "Redis stopped and restarted (empty): 0 failed viewer routings; Foghorn reports "
        "degraded meanwhile and re-converges by itself; subscribers get an explicit gap for the "
        "lost history and lose no live event",
        stop_and_start("redis"),
        foghorn_degraded,
        "foghorn /health degraded",
        redis_check,
        alerts=("HAStoreUnreachable",),
    ),
    Drill(
        "postgres-restart",
        "PostgreSQL stopped and restarted: Signalman stops processing while fenced, resumes, "
        "0 lost and 0 duplicated events",
        stop_and_start("postgres", alert_for_s=60.0),  # LeaderMissing: for 1m
        signalman_lock_lost,
        "signalman lock connection reconnecting",
        postgres_check,
        alerts=("LeaderMissing",),
    ),
    Drill(
        "pause",
        "SIGSTOP a Foghorn replica past its ownership TTL, then SIGCONT: its late writes are "
        "rejected (stream ABORTED, fenced), the new owner's data stands everywhere, traffic "
        "recovers once it is back (routings failed while it hung are reported)",
        pause_foghorn,
        unreachable("foghorn-0"),
        "foghorn-0 /health unreachable",
        pause_check,
        alerts=("ReplicaDown", "FencingRejections"),
    ),
    Drill(
        "kafka-outage",
        "the broker unreachable (SIGSTOP) for a while: 0 failed routings, routing latency "
        "stays normal, events arrive late but none is lost (at-least-once: events the broker "
        "did not acknowledge in time are sent again; duplicates are counted, not judged)",
        pause_broker,
        None,
        "event delivery overdue",
        broker_check,
        alerts=("EventSinkBuffering",),
    ),
]
BY_NAME = {d.name: d for d in DRILLS}


# -- one drill ----------------------------------------------------------------------------------
async def run_drill(platform: Platform, drill: Drill) -> Result:
    """Run one drill on a running platform (waits for it to be healthy first)."""
    s = platform.settings
    result = Result(drill.name, drill.expected)
    # A light trickle of viewer queries while waiting: a caller's circuit breaker leaves "open"
    # only through a probe call, so an idle Bridge keeps reporting the open Foghorn breaker of the
    # previous drill (degraded) until some request arrives. Production always has that traffic.
    trickle = BridgeViewers(platform.endpoint("bridge graphql"), _bridge_jwt(), 2.0)
    trickle.start()
    waited = time.monotonic()
    try:
        healthy = await platform.wait_healthy(s.healthy_timeout_s)
    finally:
        await trickle.stop()
        await trickle.close()
    result.facts["waited_for_healthy_s"] = round(time.monotonic() - waited, 2)
    if healthy is None:
        result.problems = [
            "platform not healthy before the drill: " + "; ".join(platform.unhealthy())
        ]
        return result
    if drill.alerts and platform.stack.prometheus_url:
        # Alerts compare what Prometheus saw before the fault with what it sees after (e.g.
        # ReplicaRestarted: a start time newer than the oldest in its window). A platform that
        # just started (the first drill of a run) may not have been scraped yet: then the killed
        # process was never seen and its restart cannot fire anything.
        waited = time.monotonic()
        seen = await wait_scraped(platform.stack.prometheus_url, s.healthy_timeout_s)
        result.facts["waited_for_scrapes_s"] = round(time.monotonic() - waited, 2)
        if not seen:
            result.problems = ["Prometheus never scraped every target: alerts cannot be judged"]
            return result
    foghorn = FoghornViewers(platform.endpoint("foghorn grpc"), s.foghorn_rate)
    jwt = _bridge_jwt()
    bridge = BridgeViewers(platform.endpoint("bridge graphql"), jwt, s.bridge_rate)
    events = EventFlow(
        platform.stack.backends.kafka_bootstrap or "",
        up.EVENTS_TOPIC,
        EVENT_TENANT,
        platform.endpoint("signalman grpc"),
        up.SIGNALMAN_DEMO_TOKEN,
        s.event_rate,
    )
    ctx = Ctx(platform, s, events=events, recorders=(foghorn.recorder, bridge.recorder))
    result.alerts_expected = list(drill.alerts)
    watch = AlertWatch(platform.stack.prometheus_url) if platform.stack.prometheus_url else None
    try:
        await events.start()
        foghorn.start()
        bridge.start()
        await asyncio.sleep(s.warmup_s)
        t_warm = time.monotonic() - s.warmup_s
        platform.monitor.arm(drill.detect)
        ctx.t_fault = time.monotonic()
        log.info("drill fault", drill=drill.name)
        if watch is not None:
            watch.start()
        await drill.inject(ctx)
        t0 = ctx.t_fault
        restored_at, settled = await _settle(
            platform, (foghorn.recorder, bridge.recorder), events, t0
        )
        ctx.facts["traffic_clean_at_end"] = settled
        await events.stop_producing()
        await foghorn.stop()
        await bridge.stop()
        # Requests the generators dropped because this process was starved (a busy machine):
        # not failures of the platform, but fewer requests than the rate says.
        ctx.facts["traffic_skipped"] = {"foghorn": foghorn.skipped, "bridge": bridge.skipped}
        await events.drain(s.drain_s)
        if watch is not None:
            await _alerts_after(watch, drill, result, s)
        _measure(
            result, ctx, drill, (foghorn.recorder, bridge.recorder), events, t_warm, restored_at
        )
    except Exception as exc:  # the drill machinery itself failed: a failed drill, not a crash
        log.exception("drill failed to run", drill=drill.name)
        result.problems.append(f"drill did not run to the end: {type(exc).__name__}: {exc}")
    finally:
        if watch is not None:
            await watch.stop()
        await foghorn.stop()
        await bridge.stop()
        await foghorn.close()
        await bridge.close()
        await events.close()
        platform.monitor.arm(None)
        if platform.faults is not None and platform.faults.active:
            await platform.run_locked(platform.faults.heal_all)  # a drill that failed half-way
    if not result.problems:
        result.problems = drill.check(ctx, result) + _alert_problems(platform, drill, result)
        if not ctx.facts.get("traffic_clean_at_end"):
            result.problems.append(
                f"traffic not clean for {s.quiet_s:g} s within {s.settle_max_s:g} s of the fault"
            )
    for hook in AFTER_DRILL:
        try:
            hook(ctx, result)
        except Exception as exc:
            log.exception("after-drill check failed", drill=drill.name)
            result.problems.append(f"after-drill check failed: {type(exc).__name__}: {exc}")
    result.facts.update({k: v for k, v in ctx.facts.items() if _jsonable(v)})
    result.ok = not result.problems
    return result


async def _alerts_after(watch: AlertWatch, drill: Drill, result: Result, s: Settings) -> None:
    """Once traffic recovered: every expected alert must fire, then resolve (bounded waits)."""
    t_wait = time.monotonic()
    await watch.wait_fired(drill.alerts, s.alerts_fire_s)
    result.facts["alerts_fire_wait_s"] = round(time.monotonic() - t_wait, 2)
    await watch.stop()
    fired = [name for name, _ in sorted(watch.fired.items(), key=lambda kv: kv[1])]
    expected_fired = [a for a in drill.alerts if a in watch.fired]
    resolved = await watch.wait_resolved(expected_fired, s.alerts_resolve_s)
    result.alerts_fired = [name for name, _ in sorted(watch.fired.items(), key=lambda kv: kv[1])]
    result.alerts_resolved = [a for a in expected_fired if a in resolved]
    result.facts["alerts_fired_during_fault"] = fired
    result.facts["alert_polls"] = watch.polls
    result.facts["alert_polls_failed"] = watch.failed_polls


def _alert_problems(platform: Platform, drill: Drill, result: Result) -> list[str]:
    if not drill.alerts:
        return []
    if not platform.stack.prometheus_url:
        return ["no Prometheus on this platform: expected alerts cannot be checked"]
    problems = []
    missing = [a for a in drill.alerts if a not in result.alerts_fired]
    if missing:
        problems.append(f"expected alerts did not fire: {', '.join(missing)}")
    stuck = [
        a for a in drill.alerts if a in result.alerts_fired and a not in result.alerts_resolved
    ]
    if stuck:
        problems.append(f"alerts still firing after recovery: {', '.join(stuck)}")
    return problems


async def _settle(
    platform: Platform, recorders: tuple[Recorder, ...], events: EventFlow, t0: float
) -> tuple[float | None, bool]:
    """After the fault: wait until the platform is healthy and traffic has been clean for
    ``quiet_s``. Returns when the platform was first fully healthy again (None: never) and
    whether traffic ended clean within ``settle_max_s`` of the fault's end (a partition drill
    holds its fault for tens of seconds before it heals)."""
    s = platform.settings
    deadline = max(t0, time.monotonic()) + s.settle_max_s
    restored_at: float | None = None
    while time.monotonic() < deadline:
        now = time.monotonic()
        if restored_at is None and not platform.unhealthy():
            restored_at = now
        bad = [r.last_bad(t0, s.slow_s) for r in recorders]
        bad.append(events.last_late(t0, s.late_s))
        last_bad = max([b for b in bad if b is not None], default=t0)
        if restored_at is not None and now - max(last_bad, restored_at) >= s.quiet_s:
            return restored_at, True
        await asyncio.sleep(0.25)
    return restored_at, False


def _measure(
    result: Result,
    ctx: Ctx,
    drill: Drill,
    recorders: tuple[Recorder, Recorder],
    events: EventFlow,
    t_warm: float,
    restored_at: float | None,
) -> None:
    s, t0 = ctx.settings, ctx.t_fault
    foghorn, bridge = recorders
    result.failed_foghorn = len(foghorn.failures(t_warm))
    result.failed_bridge = len(bridge.failures(t_warm))
    result.failed_requests = result.failed_foghorn + result.failed_bridge
    result.requests = len(foghorn.samples) + len(bridge.samples)
    result.errors_sample = sorted({x.error for r in recorders for x in r.failures(t_warm)})[:5]
    # When each failed request started, relative to the fault (first 60): which phase failed.
    ctx.facts["failed_at_s"] = sorted(
        round(x.start - ctx.t_fault, 2) for r in recorders for x in r.failures(t_warm)
    )[:60]
    result.events_produced = len(events.produced)
    result.lost_events = events.missing()
    result.duplicate_events = events.duplicates()
    result.history_gaps = sum(sub.gaps for sub in events.subscribers)
    for sub in events.subscribers:
        stats = sub.sub.stats if sub.sub is not None else None
        ctx.facts[sub.name] = {
            "received": len(sub.received),
            "missing": sum(1 for eid in events.produced if eid not in sub.received),
            "gaps": sub.gaps,
            "ended_with": sub.error,
            "reconnects": stats.reconnects if stats else None,
            "repeats_dropped": stats.duplicates_skipped if stats else None,
            "last_error": stats.last_error if stats else None,
        }
    before = [x.latency for x in foghorn.between(t_warm, t0) if x.ok]
    fault_window = max(s.broker_pause_s, 1.0) if drill.name == "kafka-outage" else s.quiet_s
    during = [x.latency for x in foghorn.between(t0, t0 + fault_window)]
    result.route_p99_before_ms = round(percentile(before, 0.99) * 1000, 2)
    result.route_p99_fault_ms = round(percentile(during, 0.99) * 1000, 2)
    if drill.detect is not None:
        detected = ctx.platform.monitor.detected_at
    else:
        detected = events.stalled_since(t0, 1.0)
    result.detect_s = None if detected is None else round(max(0.0, detected - t0), 2)
    bad = [r.last_bad(t0, s.slow_s) for r in recorders]
    bad.append(events.last_late(t0, s.late_s))
    known = [b for b in bad if b is not None]
    result.recover_s = round(max(known) - t0, 2) if known else 0.0
    # Which traffic set recover_s, and how much of it was bad: a slow routing (> slow_s), a
    # failed one or a late event read differently (a starved harness makes the first).
    ctx.facts["last_bad_s"] = {
        name: None if b is None else round(b - t0, 2)
        for name, b in zip(("foghorn", "bridge", "events"), bad, strict=True)
    }
    ctx.facts["slow_after_fault"] = {
        name: sum(1 for x in r.between(t0) if x.ok and x.latency > s.slow_s)
        for name, r in zip(("foghorn", "bridge"), recorders, strict=True)
    } | {"late_events": len(events.late(t0, s.late_s))}
    # The slow queries' paths through the Bridge upstreams (first 20): which one was slow.
    ctx.facts["slow_bridge"] = [
        f"+{x.start - t0:.2f}s {x.latency:.2f}s {x.path}"
        for x in bridge.between(t0)
        if x.ok and x.latency > s.slow_s
    ][:20]
    if result.lost_events:
        result.recover_s = None  # traffic never became whole again
    result.restored_s = None if restored_at is None else round(restored_at - t0, 2)
    if restored_at is not None:
        ctx.facts["failures_after_restored"] = len(foghorn.failures(restored_at)) + len(
            bridge.failures(restored_at)
        )


def _bridge_jwt() -> str:
    from api_gateway.devtoken import mint

    return mint(up.BRIDGE_JWT_SECRET, "drill", ["viewer"], "platform", "bridge", 3600)


def _jsonable(value: Any) -> bool:
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return False
    return True


# -- the suite ----------------------------------------------------------------------------------
def render(results: list[Result]) -> str:
    head = (
        f"{'drill':28} {'ok':4} {'detect_s':>8} {'recover_s':>9} {'restored_s':>10} "
        f"{'failed':>6} {'requests':>8} {'lost':>5} {'dup':>4} {'events':>6} {'alerts':>6}  "
        "problems"
    )
    lines = [head, "-" * len(head)]

    def num(v: float | None) -> str:
        return "-" if v is None else f"{v:.2f}"

    for r in results:
        lines.append(
            f"{r.name:28} {'yes' if r.ok else 'NO':4} {num(r.detect_s):>8} {num(r.recover_s):>9} "
            f"{num(r.restored_s):>10} {r.failed_requests:>6} {r.requests:>8} "
            f"{r.lost_events:>5} {r.duplicate_events:>4} {r.events_produced:>6} "
            f"{_alerts_cell(r):>6}  " + ("; ".join(r.problems) or "-")
        )
    return "\n".join(lines)


def _alerts_cell(r: Result) -> str:
    """Expected alerts fired / resolved out of expected, e.g. "2/2/2" ("-": none expected)."""
    if not r.alerts_expected:
        return "-"
    fired = sum(1 for a in r.alerts_expected if a in r.alerts_fired)
    return f"{fired}/{len(r.alerts_resolved)}/{len(r.alerts_expected)}"


async def run_suite(names: list[str], platform: Platform) -> list[Result]:
    """Run drills one after the other on ``platform`` (health watched from this event loop)."""
    results = []
    platform.monitor = HealthMonitor(platform.stack.sup.items)
    platform.monitor.start()
    try:
        for name in names:
            print(f"drill {name}: {BY_NAME[name].expected}", flush=True)
            result = await run_drill(platform, BY_NAME[name])
            print(render([result]).splitlines()[-1], flush=True)
            results.append(result)
    finally:
        await platform.monitor.close()
    return results


def platform_key(hosts: bool, tls: bool) -> str:
    """The section of the drills file a run's rows go to: the platforms' figures differ."""
    return ("hosts" if hosts else "loopback") + ("+tls" if tls else "")


def write_json(
    results: list[Result], settings: Settings, path: Path = BENCH_FILE, platform: str = "loopback"
) -> dict[str, Any]:
    """Merge ``results`` into ``path``: they replace the rows of the same drills in the
    ``platform`` section; other rows and other platforms' sections stay. Returns the document.

    A file in an older layout (one run's rows at the top level) or unreadable is started afresh:
    its rows have no platform to be filed under."""
    path.parent.mkdir(parents=True, exist_ok=True)
    when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    mode = "short" if settings.warmup_s < Settings().warmup_s else "full"
    # Read, merge and write under a lock on the file itself: two runs ending together (a
    # loopback and a --hosts run side by side) must not drop each other's rows.
    with path.open("a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        handle.seek(0)
        doc = _merge(handle.read(), results, settings, when, mode, platform)
        handle.seek(0)
        handle.truncate()
        handle.write(json.dumps(doc, indent=2) + "\n")
    return doc


def _merge(
    text: str, results: list[Result], settings: Settings, when: str, mode: str, platform: str
) -> dict[str, Any]:
    try:
        doc = json.loads(text)
    except ValueError:
        doc = {}
    if not isinstance(doc, dict) or not isinstance(doc.get("platforms"), dict):
        doc = {"platforms": {}}
    section = doc["platforms"].setdefault(platform, {})
    rows = section.setdefault("drills", {})
    for r in results:
        rows[r.name] = {"when": when, "mode": mode, **asdict(r)}
    section["when"] = when
    section.setdefault("settings", {})[mode] = {
        k: v for k, v in asdict(settings).items() if k != "env"
    } | {"env": dict(settings.env)}
    section["ok"] = all(row.get("ok") for row in rows.values())
    section["modes"] = sorted({row.get("mode", "?") for row in rows.values()})
    doc["platforms"] = dict(sorted(doc["platforms"].items()))
    doc["when"] = when
    doc["ok"] = all(sec.get("ok") for sec in doc["platforms"].values())
    return doc


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="./dev drill", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "name",
        nargs="?",
        default="all",
        help="one of: " + ", ".join(BY_NAME) + ", all (or several, comma-separated)",
    )
    p.add_argument("--short", action="store_true", help="short TTLs and phases (seconds/drill)")
    p.add_argument("--nodes", type=int, default=None, help="simulated edge nodes")
    p.add_argument(
        "--port-offset",
        type=int,
        default=0,
        help="added to every documented port, to run beside another platform (./dev up's)",
    )
    p.add_argument(
        "--json",
        type=Path,
        default=None,
        help="the drills file the figures are merged into (default .bench/drills.json; rows go "
        "to the run's platform section: loopback, hosts, loopback+tls, hosts+tls)",
    )
    p.add_argument(
        "--hosts",
        action="store_true",
        help="every process on its own simulated host (network namespaces, needs root); "
        "adds the partition drills",
    )
    p.add_argument(
        "--tls",
        action="store_true",
        help="the platform with TLS on every hop and mTLS between services (./dev up --tls), "
        "the store failover drills' Sentinels, replicas and standby included",
    )
    return p


def main(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    if args.name == "all":
        # --hosts: the partition drills join; the store failover drills stay out (their
        # Sentinels and standby run on loopback only so far).
        names = [
            d.name
            for d in DRILLS
            if (args.hosts or not d.needs_hosts)
            and not (args.hosts and d.needs_ha_stores)
            and not (args.hosts and d.alone is not None)  # loopback only
        ]
    else:
        names = [n for n in args.name.split(",") if n]
    unknown = [n for n in names if n not in BY_NAME]
    if unknown:
        print(f"unknown drill {unknown[0]!r}; drills: {', '.join(BY_NAME)}, all")
        return 2
    if not args.hosts and any(BY_NAME[n].needs_hosts for n in names):
        print(f"drill {names[0]!r} partitions the network: run it with --hosts (as root)")
        return 2
    if args.hosts and any(BY_NAME[n].needs_ha_stores for n in names):
        print(up.HOSTS_HA_STORES)
        return 2
    if args.hosts and not simhosts.inside():
        return simhosts.run_harness(["drill", *argv])
    settings = Settings.short() if args.short else Settings()
    if not 0 <= args.port_offset <= 20000:
        print("--port-offset must be within 0..20000")
        return 2
    settings = replace(settings, port_offset=args.port_offset, tls=args.tls)
    if args.nodes is not None:
        if args.nodes < 1:
            print("--nodes must be >= 1")
            return 2
        settings = replace(settings, nodes=args.nodes)
    run_dir = ROOT / ".run" / f"drills-{time.strftime('%Y%m%d-%H%M%S')}"
    run_dir.mkdir(parents=True, exist_ok=True)
    log_file = (run_dir / "drills.log").open("a", buffering=1)
    configure_logging("drills", json=True, stream=log_file)
    results: list[Result] = []
    try:
        for name in [n for n in names if BY_NAME[n].alone is not None]:
            alone = BY_NAME[name].alone
            assert alone is not None
            print(f"drill {name} (a platform of its own): {BY_NAME[name].expected}", flush=True)
            results.append(asyncio.run(alone(settings, run_dir / name)))
            print(render([results[-1]]).splitlines()[-1], flush=True)
        names = [n for n in names if BY_NAME[n].alone is None]
        # Store failover drills run on a platform of their own (--ha-stores), after the others.
        for ha in (False, True):
            group = [n for n in names if BY_NAME[n].needs_ha_stores == ha]
            if not group:
                continue
            print(f"starting the platform ({run_dir}{' --ha-stores' if ha else ''}) ...")
            platform = Platform(
                settings, run_dir / ("ha-stores" if ha else ""), args.hosts, ha, args.tls
            )
            try:
                results += asyncio.run(run_suite(group, platform))
            finally:
                print("stopping the platform ...", flush=True)
                platform.close()
    finally:
        log_file.close()
    print()
    print(render(results))
    json_path = args.json or BENCH_FILE
    section = platform_key(args.hosts, args.tls)
    write_json(results, settings, json_path, section)
    print(f"\nwrote {json_path} (section {section!r}); logs under {run_dir}")
    return 0 if all(r.ok for r in results) else 1


# Drills of their own modules: each registers into DRILLS, BY_NAME and AFTER_DRILL on import.
from devtools import drill_day2, drill_partitions, drill_rollout, drill_stores  # noqa: E402,F401
