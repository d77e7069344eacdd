"""Day-2 drills: the operations a platform engineer performs every week, under traffic.

- ``rolling-restart``: SIGTERM each replica of each service in turn (Foghorn, Signalman,
  Bridge), the next one as soon as the platform is fully healthy again. A SIGTERM is a hand-over:
  Foghorn moves its nodes to the other replica (``Reconnect``), Signalman commits, leaves the
  group and releases its locks, Bridge drains. Expected: 0 failed routings (direct and through
  Bridge), 0 lost, 0 duplicated events, no event later than 2 s, and the nodes split evenly
  between the Foghorn replicas at the end (rebalancing fills a restarted replica).
- ``crash-then-restart``: kill -9 one replica of each service and, as soon as it reports healthy
  again, SIGTERM the other one. Expected: 0 failed routings, 0 lost events. The restarted
  replica must be taken back by callers at once: that part depends on ``pkg.clients``
  re-admitting a recovered replica actively (its circuit breaker and outlier ejection), which
  is measured here, not assumed.

Every step is recorded in ``facts.steps`` with what it did, how long it took until the platform
was healthy again and its own counts: requests and failed routings (direct, through Bridge)
started during the step, and events produced during it that arrived late.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import structlog

from devtools import drills
from devtools.drills import Ctx, Drill, Result

log = structlog.get_logger("drills.day2")

SERVICES = ("foghorn", "signalman", "bridge")
REPLICAS = (0, 1)
EVEN_SPLIT_WAIT_S = 30.0


def _step(ctx: Ctx, what: str, started: float, healthy_at: float | None, **extra: Any) -> None:
    ctx.facts.setdefault("steps", []).append(
        {
            "step": what,
            "t_s": round(started - ctx.t_fault, 2),
            "healthy_after_s": None if healthy_at is None else round(healthy_at - started, 2),
            "_window": (started, healthy_at or time.monotonic()),
            **extra,
        }
    )


async def _graceful_restart(ctx: Ctx, name: str) -> float:
    """SIGTERM ``name`` (a hand-over), start it again at once; how long the stop took."""
    item = ctx.platform.item(name)
    took = 0.0

    def stop() -> None:
        nonlocal took
        item.supervise = False
        started = time.monotonic()
        item.proc.stop(timeout=30)  # SIGTERM; SIGKILL only past 30 s
        took = time.monotonic() - started

    def start() -> None:
        try:
            item.proc.start(wait=True)
            item.proc.restarts += 1
        except Exception as exc:  # the supervisor restarts it with backoff from here
            item.proc.proc = None
            ctx.facts.setdefault("restart_failed", []).append(f"{name}: {exc}"[:200])
        finally:
            item.supervise = True

    try:
        await ctx.platform.run_locked(stop)
    finally:
        await ctx.platform.run_locked(start)
    return took


async def _healthy(ctx: Ctx) -> float | None:
    return await ctx.platform.wait_healthy(ctx.settings.healthy_timeout_s)


def _owned_nodes(ctx: Ctx) -> list[int]:
    return [
        int((ctx.platform.health(f"foghorn-{i}").get("ha") or {}).get("owned_nodes", -1))
        for i in REPLICAS
    ]


async def _even_split(ctx: Ctx) -> None:
    """Wait (bounded) for the Foghorn replicas to own the fleet evenly; record the split."""
    started = time.monotonic()
    deadline = started + EVEN_SPLIT_WAIT_S
    owned = _owned_nodes(ctx)
    while time.monotonic() < deadline:
        owned = _owned_nodes(ctx)
        if min(owned) >= 0 and sum(owned) == ctx.settings.nodes and max(owned) - min(owned) <= 1:
            break
        await asyncio.sleep(0.25)
    ctx.facts["nodes_owned_at_end"] = owned
    ctx.facts["even_split_after_s"] = round(time.monotonic() - started, 2)


async def rolling_restart(ctx: Ctx) -> None:
    for service in SERVICES:
        for i in REPLICAS:
            name = f"{service}-{i}"
            started = time.monotonic()
            log.info("rolling restart", replica=name)
            stop_s = await _graceful_restart(ctx, name)
            healthy = await _healthy(ctx)
            _step(ctx, f"SIGTERM {name}, start it again", started, healthy,
                  stop_s=round(stop_s, 2), nodes_owned=_owned_nodes(ctx))  # fmt: skip
            if healthy is None:
                raise RuntimeError(f"platform not healthy after restarting {name}")
    await _even_split(ctx)


async def crash_then_restart(ctx: Ctx) -> None:
    for service in SERVICES:
        crashed, other = f"{service}-0", f"{service}-1"
        started = time.monotonic()
        await ctx.platform.run_locked(ctx.platform.item(crashed).proc.kill)
        healthy = await _healthy(ctx)  # the supervisor restarts it
        _step(ctx, f"kill -9 {crashed}, supervisor restarts it", started, healthy)
        if healthy is None:
            raise RuntimeError(f"platform not healthy after the crash of {crashed}")
        started = time.monotonic()
        stop_s = await _graceful_restart(ctx, other)
        healthy = await _healthy(ctx)
        _step(ctx, f"SIGTERM {other} as soon as {crashed} is healthy, start it again", started,
              healthy, stop_s=round(stop_s, 2))  # fmt: skip
        if healthy is None:
            raise RuntimeError(f"platform not healthy after restarting {other}")


def _count_steps(ctx: Ctx) -> None:
    """Per-step counts, now that every request of the drill has ended."""
    foghorn, bridge = ctx.recorders
    late_s = ctx.settings.late_s
    for step in ctx.facts.get("steps", []):
        since, until = step.pop("_window")
        f_all, b_all = foghorn.between(since, until), bridge.between(since, until)
        step["requests"] = len(f_all) + len(b_all)
        step["failed_foghorn"] = sum(1 for s in f_all if not s.ok)
        step["failed_bridge"] = sum(1 for s in b_all if not s.ok)
        late, slowest = 0, 0.0
        if ctx.events is not None:
            # Every delivery of the step (late_s 0), so the margin under late_s shows too.
            delays = [arrival - produced for produced, arrival in ctx.events.late(since, 0.0)
                      if produced < until]  # fmt: skip
            late = sum(1 for d in delays if d > late_s)
            slowest = max(delays, default=0.0)
        step["late_events"] = late
        step["max_event_delay_s"] = round(slowest, 2)


def _late_events(ctx: Ctx) -> int:
    if ctx.events is None:
        return 0
    return len(ctx.events.late(ctx.t_fault, ctx.settings.late_s))


def rolling_check(ctx: Ctx, r: Result) -> list[str]:
    _count_steps(ctx)
    problems = []
    if r.failed_requests:
        problems.append(f"{r.failed_requests} failed routings (expected 0)")
    if r.lost_events or r.duplicate_events:
        problems.append(f"{r.lost_events} lost, {r.duplicate_events} duplicated events")
    late = _late_events(ctx)
    ctx.facts["late_events"] = late
    if late:
        problems.append(f"{late} events later than {ctx.settings.late_s:g} s")
    owned = ctx.facts.get("nodes_owned_at_end", [])
    if not owned or sum(owned) != ctx.settings.nodes or max(owned) - min(owned) > 1:
        problems.append(f"nodes not split evenly at the end: {owned}")
    return problems


def crash_check(ctx: Ctx, r: Result) -> list[str]:
    _count_steps(ctx)
    ctx.facts["late_events"] = _late_events(ctx)
    problems = []
    if r.failed_requests:
        problems.append(f"{r.failed_requests} failed routings (expected 0)")
    if r.lost_events:
        problems.append(f"{r.lost_events} lost events")
    return problems


def _register(drill: Drill) -> None:
    drills.DRILLS.append(drill)
    drills.BY_NAME[drill.name] = drill


def _always(_docs: dict[str, dict[str, Any]]) -> bool:
    return True


_register(
    Drill(
        "rolling-restart",
        "SIGTERM each replica of Foghorn, Signalman and Bridge in turn, the next one once the "
        "platform is healthy: 0 failed routings (direct and through Bridge), 0 lost, 0 "
        "duplicated events, no event later than 2 s, nodes split evenly at the end",
        rolling_restart,
        _always,
        "the first SIGTERM",
        rolling_check,
        # Each restart is a new process start time: the info alert a deploy also fires.
        alerts=("ReplicaRestarted",),
    )
)
_register(
    Drill(
        "crash-then-restart",
        "kill -9 one replica of each service and, as soon as it is healthy again, SIGTERM the "
        "other: 0 failed routings, 0 lost events (callers must take the recovered replica back "
        "at once)",
        crash_then_restart,
        drills.unreachable("foghorn-0"),
        "foghorn-0 /health unreachable",
        crash_check,
        alerts=("ReplicaRestarted",),
    )
)
