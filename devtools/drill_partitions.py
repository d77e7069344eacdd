"""Network partition drills (``./dev drill NAME --hosts``) and the history check after every drill.

Each drill runs under the drills' normal traffic on the ``--hosts`` platform (every process on a
simulated host of its own, ``devtools.hosts``), cuts links with nftables inside the namespaces
(silently: DROP, no FIN, no RST), keeps the partition long enough for the takeover it is about,
heals it, and waits until the platform is whole again. What each one expects is in its
``expected`` text and its check; the runbooks (docs/runbooks/partition-*.md) say what an operator
sees. Every fault and heal is recorded with its time (``facts.partition``), and so is the time
another replica took over what the cut-off replica held (``facts.takeover``, from the replicas'
history lines).

``history_check`` runs after every drill (partition or not): it reads the ``history`` lines of
every replica's log since the platform started, plus the drill's subscriptions, and adds the
findings of ``devtools.checker`` as problems (each finding once per platform; lost and
duplicated events stay facts, since every drill judges those by its own stated policy).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any
from weakref import WeakKeyDictionary

import structlog

from devtools import checker
from devtools import drills as suite
from devtools.drills import (
    Ctx,
    Detector,
    Drill,
    Platform,
    Result,
)
from devtools.hosts import FaultEvent, Faults

log = structlog.get_logger("drills.partitions")

_SEEN: WeakKeyDictionary[Platform, set[str]] = WeakKeyDictionary()


# -- settings read from the platform --------------------------------------------------------------
def _env(ctx: Ctx, name: str, default: float) -> float:
    return float(dict(ctx.settings.env).get(name, default))


def _lease_ttl(ctx: Ctx) -> float:
    return _env(ctx, "FOGHORN_LEASE_TTL_S", 15.0)


def _ownership_ttl(ctx: Ctx) -> float:
    return _env(ctx, "FOGHORN_OWNERSHIP_TTL_S", ctx.settings.ownership_ttl_s)


def signalman_takeover_bound(ctx: Ctx) -> float:
    """How long partitions of a replica cut from PostgreSQL may stay unprocessed, by design:
    the replica drops them as soon as a lock query times out (``query_timeout_s`` 3 s, queries
    about every second), decides to leave the group once its lock connection has been down
    ``SIGNALMAN_LOCK_REJOIN_AFTER_S`` (checked between reconnect attempts, each bounded by
    ``connect_timeout_s`` 5 s, so up to 5 s late); the group rebalances (session timeout +
    tansu's join hold, half of it); the new owner finds the old session's locks still held
    (PostgreSQL never saw a FIN, and with default TCP keepalives would not for hours) and
    terminates that backend after ``SIGNALMAN_LOCK_GRACE_S``. Plus 2 s of scheduling."""
    rejoin = _env(ctx, "SIGNALMAN_LOCK_REJOIN_AFTER_S", 30.0)
    session = _env(ctx, "SIGNALMAN_SESSION_TIMEOUT_MS", 10_000) / 1000
    grace = _env(ctx, "SIGNALMAN_LOCK_GRACE_S", 2.0)
    return 1.0 + 3.0 + rejoin + 5.0 + 1.5 * session + grace + 2.0


def _faults(ctx: Ctx) -> Faults:
    faults = ctx.platform.faults
    if faults is None:
        raise RuntimeError("partition drills need the --hosts platform")
    return faults


# -- the fault ------------------------------------------------------------------------------------
Cuts = Callable[[Faults, list[str]], list[FaultEvent]]


def leading_foghorn(ctx: Ctx) -> list[str]:
    """The Foghorn replica that holds the leader lease now (foghorn-0 if none says so), so the
    cut tests leadership as well as ownership."""
    for name in ("foghorn-0", "foghorn-1"):
        if (ctx.platform.health(name).get("ha") or {}).get("leader"):
            return [name]
    return ["foghorn-0"]


def busiest_foghorn(ctx: Ctx) -> str:
    """The Foghorn replica holding the most node streams now (earlier drills move nodes)."""
    owned = {
        name: int((ctx.platform.health(name).get("ha") or {}).get("owned_nodes") or 0)
        for name in ("foghorn-0", "foghorn-1")
    }
    return max(owned, key=lambda name: (owned[name], name == "foghorn-0"))


def fixed(*names: str) -> Callable[[Ctx], list[str]]:
    return lambda _ctx: list(names)


def partition(
    victims: Callable[[Ctx], list[str]], apply: Cuts, hold_s: Callable[[Ctx], float]
) -> Callable[[Ctx], Awaitable[None]]:
    """Apply the cuts to the victims, hold them ``hold_s(ctx)``, heal; the fault time is the
    first cut's."""

    async def inject(ctx: Ctx) -> None:
        faults = _faults(ctx)
        events: list[FaultEvent] = []
        chosen = victims(ctx)

        def cut() -> None:
            events.extend(apply(faults, chosen))

        ctx.facts["victims"] = chosen
        ctx.facts["hold_s"] = round(hold_s(ctx), 1)
        try:
            await ctx.platform.run_locked(cut)
            ctx.t_fault = events[0].mono
            ctx.facts["fault_at"] = events[0].at
            await asyncio.sleep(hold_s(ctx))
            ctx.facts["during"] = _snapshot(ctx)
        finally:
            await ctx.platform.run_locked(faults.heal_all)
            ctx.facts["partition"] = faults.timeline(ctx.t_fault)[-2 * len(events) :]
            ctx.facts["healed_at_s"] = round(time.monotonic() - ctx.t_fault, 2)

    return inject


def _snapshot(ctx: Ctx) -> dict[str, Any]:
    """What each victim's and survivor's /health said at the end of the partition."""
    out: dict[str, Any] = {}
    for name in ("foghorn-0", "foghorn-1", "signalman-0", "signalman-1", "bridge-0", "bridge-1"):
        doc = ctx.platform.health(name)
        ha = doc.get("ha") or {}
        out[name] = {
            "status": doc.get("status"),
            "nodes": (doc.get("figures") or {}).get("nodes"),
            "leader": ha.get("leader"),
            "owned_nodes": ha.get("owned_nodes"),
            "writes_rejected": ha.get("writes_rejected"),
            "takeovers": ha.get("takeovers"),
            "partitions": [p[1] for p in doc.get("partitions", []) if isinstance(p, list)],
        }
    return out


def redis_cut_node_bound(ctx: Ctx) -> float:
    """How long the node streams of a Foghorn replica cut from Redis may stay there
    (``api_balancing.ha.partition``): its store notices (a changelog read blocks
    ``FOGHORN_SYNC_BLOCK_MS``, then an operation times out after ``FOGHORN_REDIS_TIMEOUT_S``),
    half the ownership TTL passes, the next one-second check asks the peers (2 s at most),
    and the nodes reconnect and register on the peer (3 s allowed)."""
    noticed = _env(ctx, "FOGHORN_SYNC_BLOCK_MS", 1000) / 1000 + _env(
        ctx, "FOGHORN_REDIS_TIMEOUT_S", 2.0
    )
    return noticed + _ownership_ttl(ctx) / 2 + 1.0 + 2.0 + 3.0


def _hold_foghorn(ctx: Ctx) -> float:
    # Past the leader lease, the ownership TTL and the nodes' move, so all can have happened.
    longest = max(_lease_ttl(ctx), _ownership_ttl(ctx), redis_cut_node_bound(ctx))
    return longest + ctx.settings.pause_margin_s + 2.0


def node_takeover_bound(_ctx: Ctx | None = None) -> float:
    """How long nodes whose replica went silent (no FIN, no RST) keep their stream to it: until
    their client's keepalive gives up (the Foghorn client pings every 20 s and waits 10 s for
    the answer), plus the reconnect to the other replica and its registration (fresh fence)."""
    from pkg.clients.foghorn import default_policy

    keepalive = default_policy().keepalive
    return keepalive.time + keepalive.timeout + 5


def _hold_nodes(ctx: Ctx) -> float:
    return node_takeover_bound(ctx) + 3.0


def _hold_signalman_kafka(ctx: Ctx) -> float:
    session = _env(ctx, "SIGNALMAN_SESSION_TIMEOUT_MS", 10_000) / 1000
    return 1.5 * session + _env(ctx, "SIGNALMAN_LOCK_GRACE_S", 2.0) + 6.0


def _hold_bridge(ctx: Ctx) -> float:
    return max(6.0, 2 * ctx.settings.quiet_s)


# -- detectors ------------------------------------------------------------------------------------
def status_not_ok(*names: str) -> Detector:
    return lambda docs: any(docs.get(n, {}).get("status") not in ("ok", None) for n in names)


# -- checks ---------------------------------------------------------------------------------------
def _common(ctx: Ctx, r: Result, *, events_may_be_late: bool = True) -> list[str]:
    out = []
    if r.failed_requests:
        out.append(f"{r.failed_requests} viewer routings failed")
    if r.lost_events:
        out.append(f"{r.lost_events} events lost")
    if r.duplicate_events:
        out.append(f"{r.duplicate_events} events duplicated")
    if r.restored_s is None:
        out.append("the platform did not become healthy again after the heal")
    if r.requests < 10:
        out.append(f"only {r.requests} viewer requests ran: traffic did not flow")
    return out


def _takeover(ctx: Ctx, kind: str) -> dict[str, Any]:
    """The takeover figures of ``kind`` (computed once per drill from the history lines)."""
    if "takeover" not in ctx.facts:
        victims, fault_at = ctx.facts.get("victims"), ctx.facts.get("fault_at")
        records = checker.read_logs(_log_paths(ctx.platform), since=ctx.platform.started_at - 1)
        ctx.facts["takeover"] = (
            takeovers(records, list(victims), float(fault_at)) if victims and fault_at else {}
        )
    return dict(ctx.facts["takeover"].get(kind) or {})


def foghorn_redis_check(ctx: Ctx, r: Result) -> list[str]:
    out = _common(ctx, r)
    [victim] = ctx.facts.get("victims") or ["foghorn-0"]
    if r.detect_s is None:
        out.append(f"{victim} never reported degraded while cut from Redis")
    lease = _takeover(ctx, "lease")
    if not lease.get("victim_held"):
        out.append(f"{victim} did not lead when it was cut: leadership was not tested")
    elif not lease.get("moved"):
        out.append(f"{victim} led before the cut and the other replica never took the lease over")
    during = (ctx.facts.get("during") or {}).get(victim) or {}
    if during.get("leader"):
        out.append(f"{victim} still claimed leadership at the end of the partition")
    if during.get("owned_nodes"):
        out.append(
            f"{victim} still owned {during['owned_nodes']} nodes at the end of the partition"
        )
    own = _takeover(ctx, "ownership")
    bound = round(redis_cut_node_bound(ctx), 1)
    ctx.facts["node_takeover_bound_s"] = bound
    if not own.get("victim_held"):
        out.append(f"{victim} owned no node stream before the cut: the hand-over was not tested")
    elif own.get("moved", 0) < own["victim_held"]:
        out.append(f"only {own.get('moved', 0)} of {own['victim_held']} nodes moved off {victim}")
    elif own.get("max_s") is not None and own["max_s"] > bound:
        out.append(f"nodes moved off {victim} after {own['max_s']} s (bound {bound:g} s)")
    return out


def _nodes_moved(ctx: Ctx, victim: str) -> list[str]:
    own = _takeover(ctx, "ownership")
    bound = node_takeover_bound(ctx)
    ctx.facts["node_takeover_bound_s"] = bound
    if not own.get("victim_held"):
        return [f"{victim} owned no node stream before the cut: nothing was tested"]
    if own.get("moved", 0) < own.get("victim_held", 0):
        return [f"only {own.get('moved', 0)} of {own['victim_held']} nodes moved off {victim}"]
    if own.get("max_s") is not None and own["max_s"] > bound:
        return [f"nodes moved off {victim} after {own['max_s']} s (bound {bound:g} s)"]
    return []


def foghorn_nodes_check(ctx: Ctx, r: Result) -> list[str]:
    return [*_common(ctx, r), *_nodes_moved(ctx, (ctx.facts.get("victims") or ["foghorn"])[0])]


def signalman_postgres_check(ctx: Ctx, r: Result) -> list[str]:
    out = _common(ctx, r)
    bound = signalman_takeover_bound(ctx)
    ctx.facts["takeover_bound_s"] = round(bound, 1)
    part = _takeover(ctx, "partition")
    if not part.get("victim_held"):
        out.append("signalman-0 owned no partition before the cut: nothing was tested")
    elif part.get("moved", 0) < part.get("victim_held", 0):
        out.append(f"only {part.get('moved', 0)} of {part.get('victim_held')} partitions moved")
    elif part.get("max_s") is not None and part["max_s"] > bound:
        out.append(f"partitions moved after {part['max_s']} s (bound {bound:.1f} s)")
    return out


def signalman_kafka_check(ctx: Ctx, r: Result) -> list[str]:
    out = _common(ctx, r)
    part = _takeover(ctx, "partition")
    if not part.get("victim_held"):
        out.append("signalman-0 owned no partition before the cut: nothing was tested")
    elif part.get("moved", 0) < part.get("victim_held", 0):
        out.append(f"only {part.get('moved', 0)} of {part.get('victim_held')} partitions moved")
    return out


def bridge_redis_check(ctx: Ctx, r: Result) -> list[str]:
    out = _common(ctx, r)
    if r.detect_s is None:
        out.append("bridge-0 never reported degraded while cut from Redis")
    return out


def isolate_check(ctx: Ctx, r: Result) -> list[str]:
    out = _common(ctx, r)
    if r.detect_s is None:
        out.append("the isolated replicas' health never showed unreachable")
    out.extend(_nodes_moved(ctx, (ctx.facts.get("victims") or ["foghorn"])[0]))
    part = _takeover(ctx, "partition")
    if part.get("victim_held") and part.get("moved", 0) < part["victim_held"]:
        out.append(f"only {part.get('moved', 0)} of {part['victim_held']} partitions moved")
    return out


DRILLS: list[Drill] = [
    Drill(
        "partition-foghorn-redis",
        "the leading Foghorn replica cut from Redis only (both directions): routing keeps "
        "answering from memory (degraded), it gives up the leader lease within its term and "
        "the other replica leads; its peers still reach Redis, so it hands its node streams "
        "to them within the stated bound and owns nothing; after the heal it converges; 0 "
        "failed routings, history checker clean",
        partition(leading_foghorn, lambda f, v: [f.cut(v[0], "redis")], _hold_foghorn),
        status_not_ok("foghorn-0", "foghorn-1"),
        "the cut replica's /health degraded",
        foghorn_redis_check,
        needs_hosts=True,
    ),
    Drill(
        "partition-foghorn-nodes",
        "the Foghorn replica with the most node streams cut from the edge nodes only: the nodes "
        "move to the other replica within the keepalive bound and ownership follows (higher "
        "fences), no node owned by two replicas at once as judged by the fences Redis "
        "accepted; 0 failed routings",
        partition(
            lambda ctx: [busiest_foghorn(ctx)], lambda f, v: [f.cut(v[0], "nodes")], _hold_nodes
        ),
        None,
        "(no health shows it: the nodes notice by keepalive)",
        foghorn_nodes_check,
        needs_hosts=True,
    ),
    Drill(
        "partition-signalman-postgres",
        "signalman-0 cut from PostgreSQL only: it stops processing the partitions whose locks "
        "it cannot prove, signalman-1 takes them over within the stated bound (the old "
        "session's locks end when the new owner terminates it); 0 lost, 0 duplicated events",
        partition(
            fixed("signalman-0"),
            lambda f, v: [f.cut(v[0], "postgres")],
            lambda ctx: signalman_takeover_bound(ctx) + 2.0,
        ),
        status_not_ok("signalman-0"),
        "signalman-0 lock connection lost",
        signalman_postgres_check,
        needs_hosts=True,
    ),
    Drill(
        "partition-signalman-kafka",
        "signalman-0 cut from the broker only: its partitions move to signalman-1 (which "
        "evicts the old lock holder), 0 lost, 0 duplicated events",
        partition(fixed("signalman-0"), lambda f, v: [f.cut(v[0], "tansu")], _hold_signalman_kafka),
        None,
        "event delivery overdue",
        signalman_kafka_check,
        needs_hosts=True,
    ),
    Drill(
        "partition-bridge-redis",
        "bridge-0 cut from Redis only: 0 failed queries; its caches and rate limits fall back "
        "to local state (degraded) and recover after the heal",
        partition(fixed("bridge-0"), lambda f, v: [f.cut(v[0], "redis")], _hold_bridge),
        status_not_ok("bridge-0"),
        "bridge-0 /health degraded",
        bridge_redis_check,
        needs_hosts=True,
    ),
    Drill(
        "isolate-replica",
        "one replica of each service (the Foghorn replica with the most nodes, signalman-0, "
        "bridge-0) cut from everything, "
        "then healed: callers eject them and route around, nodes and partitions move; after "
        "the heal they serve nothing stale; 0 failed routings, 0 lost events",
        partition(
            lambda ctx: [busiest_foghorn(ctx), "signalman-0", "bridge-0"],
            lambda f, v: [f.isolate(name) for name in v],
            lambda ctx: max(_hold_nodes(ctx), _hold_foghorn(ctx), _hold_signalman_kafka(ctx)),
        ),
        status_not_ok("foghorn-0", "signalman-0", "bridge-0"),
        "isolated replicas /health unreachable",
        isolate_check,
        needs_hosts=True,
    ),
    Drill(
        "asymmetric",
        "the leading Foghorn replica sends to Redis but receives nothing back: the same "
        "guarantees as partition-foghorn-redis (degraded, steps down, hands its nodes over, "
        "converges, 0 failed routings)",
        partition(leading_foghorn, lambda f, v: [f.cut_one_way("redis", v[0])], _hold_foghorn),
        status_not_ok("foghorn-0", "foghorn-1"),
        "the cut replica's /health degraded",
        foghorn_redis_check,
        needs_hosts=True,
    ),
]


# -- the history check after every drill ----------------------------------------------------------
def _log_paths(platform: Platform) -> list[Any]:
    return [item.proc.log_path for item in platform.stack.sup.items if item.kind == "service"]


def _subscriptions(ctx: Ctx) -> list[checker.Subscription]:
    flow = ctx.events
    if flow is None:
        return []
    expected = list(flow.produced)
    return [
        checker.Subscription(
            s.name, expected, [checker.Delivery(e, o, ep) for e, o, ep in s.deliveries]
        )
        for s in flow.subscribers
    ]


def takeovers(
    records: list[checker.Rec], victims: list[str], fault_at: float
) -> dict[str, dict[str, Any]]:
    """Per kind: how many resources the victims held at ``fault_at``, how many another holder
    acquired after it, and when the first and the last of those acquisitions came (seconds
    after the fault)."""
    out: dict[str, dict[str, Any]] = {}
    by_res: dict[tuple[str, str], list[checker.Rec]] = {}
    for rec in sorted(records, key=lambda r: r.t):
        by_res.setdefault((rec.kind, rec.resource), []).append(rec)
    for (kind, _resource), recs in by_res.items():
        holder: str | None = None
        for rec in recs:
            if rec.t > fault_at:
                break
            if rec.op == "acquire":
                holder = rec.holder
            elif rec.op in ("release", "lost") and rec.holder == holder:
                holder = None
        if holder not in victims:
            continue
        row = out.setdefault(kind, {"victim_held": 0, "moved": 0, "first_s": None, "max_s": None})
        row["victim_held"] += 1
        moved = next(
            (r for r in recs if r.t > fault_at and r.op == "acquire" and r.holder not in victims),
            None,
        )
        if moved is not None:
            row["moved"] += 1
            took = round(moved.t - fault_at, 2)
            row["first_s"] = took if row["first_s"] is None else min(row["first_s"], took)
            row["max_s"] = took if row["max_s"] is None else max(row["max_s"], took)
    return out


def history_check(ctx: Ctx, result: Result) -> None:
    platform = ctx.platform
    records = checker.read_logs(_log_paths(platform), since=platform.started_at - 1)
    report = checker.check(records, _subscriptions(ctx))
    seen = _SEEN.setdefault(platform, set())
    new = [f for f in report.findings if str(f) not in seen]
    seen.update(str(f) for f in report.findings)
    summary = report.summary()
    summary["new_findings"] = [str(f) for f in new]
    del summary["findings"]
    result.facts["checker"] = summary
    # Lost and duplicated events are judged by each drill's own check (kafka-outage counts
    # duplicates without judging them: at-least-once producer); the checker's are facts there.
    judged_by_drill = ("lost-event", "duplicate-event")
    result.problems.extend(f"history: {f}" for f in new if f.check not in judged_by_drill)


def partition_record(ctx: Ctx, result: Result) -> None:
    """A partition drill's record in one place (``facts.record``, after the history check): when
    each cut started and the last heal ended (wall clock, and seconds after the first cut), how
    long after the cut another replica held what the cut-off one had (per kind, first and last;
    ``{}``: the victims held no lease, node or partition, as Bridge never does), the failed
    routings (direct and through Bridge's GraphQL queries), lost and duplicated events and the
    checker's verdict."""
    timeline = ctx.facts.get("partition")
    if not timeline:
        return  # not a partition drill (or its cut never happened: its problems say so)
    cuts = [e for e in timeline if e["action"] != "heal"]
    heals = [e for e in timeline if e["action"] == "heal"]
    _takeover(ctx, "")  # computed by the checks that judge it; here for every partition drill
    checker_facts = result.facts.get("checker") or {}
    result.facts["record"] = {
        "cuts": [{"what": e["what"], "at": e["at"], "t_s": e["t_s"]} for e in cuts],
        "healed_at": heals[-1]["at"] if heals else None,
        "healed_t_s": heals[-1]["t_s"] if heals else None,
        "takeover_s": {
            kind: {
                "first": row.get("first_s"),
                "last": row.get("max_s"),
                "moved": row.get("moved"),
                "held": row.get("victim_held"),
            }
            for kind, row in (ctx.facts.get("takeover") or {}).items()
        },
        "failed_routings": result.failed_foghorn,
        "failed_queries": result.failed_bridge,
        "requests": result.requests,
        "lost_events": result.lost_events,
        "duplicate_events": result.duplicate_events,
        "events": result.events_produced,
        "checker_clean": checker_facts.get("clean"),
        "checker_findings": checker_facts.get("new_findings", []),
    }


def register(
    drills: list[Drill], by_name: dict[str, Drill], after: list[Callable[[Ctx, Result], None]]
) -> None:
    """Add the partition drills, the history check and the partition record (once)."""
    for hook in (history_check, partition_record):
        if hook not in after:
            after.append(hook)
    for drill in DRILLS:
        if drill.name not in by_name:
            drills.append(drill)
            by_name[drill.name] = drill


register(suite.DRILLS, suite.BY_NAME, suite.AFTER_DRILL)


__all__ = [
    "DRILLS",
    "history_check",
    "partition_record",
    "register",
    "signalman_takeover_bound",
    "takeovers",
]
