"""Store failover drills (``./dev up --ha-stores``): the Redis primary killed or paused under
traffic while Sentinel promotes a replica, the PostgreSQL primary killed and its standby
promoted. Every fencing token and lease epoch visible in Redis is recorded while they run
(``TokenWatch``): a token seen for two different owners (or an epoch for two holders) fails the
drill. Runbooks: docs/runbooks/redis-failover.md, redis-zombie-primary.md, postgres-failover.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

import structlog
from redis.exceptions import RedisError

from devtools import drills
from devtools.drills import Ctx, Drill, Result
from devtools.supervisor import Managed
from pkg.common import redisconn
from pkg.devstack.servers import PostgresStandby

log = structlog.get_logger("drills.stores")
CLUSTER = "dev"  # FOGHORN_CLUSTER of ./dev up


class TokenWatch:
    """Polls Foghorn's ownership records and leader lease every 100 ms and keeps every token
    seen with its owner: ``repeats`` lists tokens seen for two different owners."""

    def __init__(self, spec: str) -> None:
        self.client = redisconn.connect(spec, name="drill-watch", decode_responses=True,
                                        socket_timeout=1, socket_connect_timeout=1)  # fmt: skip
        self.fences: dict[int, str] = {}
        self.epochs: dict[int, str] = {}
        self.repeats: list[str] = []
        self.regressions = 0  # a node's visible fence went down (a promoted replica's older copy)
        self._last: dict[str, int] = {}
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    def _see(self, table: dict[int, str], kind: str, token: int, owner: str) -> None:
        known = table.setdefault(token, owner)
        if known != owner:
            self.repeats.append(f"{kind} {token}: {known} and {owner}")

    async def _poll(self) -> None:
        prefix = f"foghorn:{{{CLUSTER}}}"
        keys = [k async for k in self.client.scan_iter(f"{prefix}:owner:*", count=500)]
        values = await self.client.mget(keys) if keys else []
        for raw_key, raw in zip(keys, values, strict=True):
            if not raw:
                continue
            value, key = str(raw), str(raw_key)  # (decode_responses: always text)
            replica, _, fence = value.rsplit("|", 2)
            node = key.rsplit(":", 1)[1]
            self._see(self.fences, "fence", int(fence), f"{node}@{replica}")
            if int(fence) < self._last.get(node, 0):
                self.regressions += 1
            self._last[node] = int(fence)
        lease = await self.client.get(f"{prefix}:leader")
        if lease:
            holder, _, epoch = str(lease).rpartition("|")
            self._see(self.epochs, "lease epoch", int(epoch), holder)

    async def _run(self) -> None:
        while not self._stopping:
            with contextlib.suppress(Exception):  # Redis failing over: poll again
                await asyncio.wait_for(self._poll(), 2.0)
            await asyncio.sleep(0.1)

    _stopping = False

    async def close(self) -> None:
        # A flag first, a cancel only if the poll does not end by itself, and never wait
        # unbounded: a cancellation swallowed inside the Redis client kept the drill waiting
        # here forever (seen: redis-zombie-primary hung after the promotion). asyncio.wait
        # neither raises the task's cancellation nor swallows our own.
        self._stopping = True
        task, self._task = self._task, None
        if task is not None:
            _, pending = await asyncio.wait({task}, timeout=3.0)
            if pending:
                task.cancel()
                _, pending = await asyncio.wait({task}, timeout=3.0)
                if pending:
                    log.warning("token watch did not stop; left behind")
        try:
            await asyncio.wait_for(self.client.aclose(), 5.0)
        except (TimeoutError, OSError, RedisError) as exc:
            log.warning("token watch client did not close", error=repr(exc)[:200])

    def facts(self) -> dict[str, Any]:
        return {
            "fences_seen": len(self.fences),
            "lease_epochs_seen": sorted(self.epochs),
            "tokens_seen_twice": self.repeats[:10],
            "fence_regressions_seen": self.regressions,
        }


def _stores(ctx: Ctx) -> Any:
    stores = ctx.platform.stack.ha_stores
    if stores is None:
        raise RuntimeError("store drills need the platform started with --ha-stores")
    return stores


async def _foghorn_ok_after(ctx: Ctx, since: float, within_s: float = 30.0) -> float | None:
    """Seconds from ``since`` until both Foghorn replicas report ok (None: not within it)."""
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        if all(ctx.platform.health(n).get("status") == "ok" for n in ("foghorn-0", "foghorn-1")):
            return round(time.monotonic() - since, 2)
        await asyncio.sleep(0.1)
    return None


def _redis_item(ctx: Ctx, port: int) -> Any:
    stores = _stores(ctx)
    index = next(i for i, s in enumerate(stores.redis.servers) if s.port == port)
    return ctx.platform.item(f"redis-{index}")


async def _redis_fault(ctx: Ctx, pause: bool) -> None:
    stores = _stores(ctx)
    watch = TokenWatch(stores.redis.spec)
    watch.start()
    try:
        old = stores.redis.primary_port()
        ctx.facts["old_primary"] = old
        ctx.facts["epoch_before"] = stores.redis.failover_epoch()
        item = _redis_item(ctx, old)
        await ctx.platform.run_locked(item.proc.pause if pause else item.proc.kill)
        try:
            new = await asyncio.to_thread(stores.redis.wait_primary_change, old, 30.0)
            log.info("store drill: replica promoted", old=old, new=new)
        finally:
            if pause:
                promoted_at = time.monotonic()
                await asyncio.sleep(0.5)  # well past the promotion
                # A stale client writing to the woken zombie before Sentinel demotes it.
                await ctx.platform.run_locked(item.proc.resume)
                with contextlib.suppress(OSError):
                    reply = stores.redis.command(
                        old, "SET", "drill:zombie-probe", "written-by-zombie"
                    )
                    ctx.facts["zombie_write_reply"] = reply.strip()[:80]
                log.info(
                    "store drill: old primary resumed", reply=ctx.facts.get("zombie_write_reply")
                )
        promoted_at = time.monotonic()
        ctx.facts["new_primary"] = new
        ctx.facts["promoted_after_s"] = round(promoted_at - ctx.t_fault, 2)
        ctx.facts["epoch_after"] = stores.redis.failover_epoch()
        ctx.facts["foghorn_ok_after_promotion_s"] = await _foghorn_ok_after(ctx, promoted_at)
        # The old primary must come back as a replica of the new one.
        deadline = time.monotonic() + 30
        role = None
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError):
                info = stores.redis.info(old)
                role = info.get("role")
                if role == "slave" and info.get("master_link_status") == "up":
                    break
            await asyncio.sleep(0.25)
        ctx.facts["old_primary_role_after"] = role
        log.info("store drill: old primary back", role=role)
        if pause:
            with contextlib.suppress(OSError):
                ctx.facts["zombie_probe_on_new_primary"] = stores.redis.command(
                    new, "EXISTS", "drill:zombie-probe"
                ).strip()
                ctx.facts["zombie_probe_on_old_primary"] = stores.redis.command(
                    old, "EXISTS", "drill:zombie-probe"
                ).strip()
        await asyncio.sleep(1.0)  # tokens issued by the re-registrations after the failover
    finally:
        ctx.facts.update(watch.facts())
        await watch.close()


async def kill_redis_primary(ctx: Ctx) -> None:
    await _redis_fault(ctx, pause=False)


async def pause_redis_primary(ctx: Ctx) -> None:
    await _redis_fault(ctx, pause=True)


def _redis_check(ctx: Ctx, r: Result) -> list[str]:
    f = ctx.facts
    out = [*drills._no_failed_routing(r), *drills._no_event_loss(r), *drills._restored(r)]
    if f.get("tokens_seen_twice"):
        out.append(f"tokens seen twice: {f['tokens_seen_twice']}")
    ok_after = f.get("foghorn_ok_after_promotion_s")
    if ok_after is None or ok_after > 10:
        out.append(f"Foghorn healthy {ok_after} s after the promotion (target <= 10 s)")
    if f.get("old_primary_role_after") != "slave":
        out.append(f"the old primary came back as {f.get('old_primary_role_after')}, not a replica")
    if not f.get("epoch_after", 0) > f.get("epoch_before", 0):
        out.append("the Sentinels' failover epoch did not grow")
    return out


def _zombie_check(ctx: Ctx, r: Result) -> list[str]:
    f = ctx.facts
    out = _redis_check(ctx, r)
    for where in ("new", "old"):
        if f.get(f"zombie_probe_on_{where}_primary") not in (":0", None):
            out.append(f"the zombie's write is visible on the {where} primary")
    return out


async def kill_postgres_primary(ctx: Ctx) -> None:
    """kill -9 the PostgreSQL primary (left down, like a dead host), promote the standby, then
    rebuild a standby of the promoted one where the dead primary was (same port: the services'
    multi-host DSN names it), so the drills that follow have a standby again."""
    stores, platform = _stores(ctx), ctx.platform
    before = _signalman_fences(ctx)
    ctx.facts["fences_before"] = before
    # The primary now (after an earlier run of this drill, the promoted standby).
    item = next(i for i in platform.stack.sup.items if i.proc is stores.postgres)
    dead_port = stores.postgres.port

    def kill_for_good() -> None:
        item.supervise = False  # a dead host: it does not come back as a second primary
        item.proc.kill()
        platform.stack.sup.items.remove(item)

    await platform.run_locked(kill_for_good)
    await asyncio.sleep(1.0)  # an operator or a manager notices, then promotes
    await asyncio.to_thread(stores.standby.promote)
    promoted_at = time.monotonic()
    ctx.facts["promoted_after_s"] = round(promoted_at - ctx.t_fault, 2)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        after = _signalman_fences(ctx)
        if len(after) == len(before) and all(after.get(k, 0) > v for k, v in before.items()):
            break
        await asyncio.sleep(0.25)
    ctx.facts["fences_after"] = _signalman_fences(ctx)
    ctx.facts["signalman_resumed_after_promotion_s"] = round(time.monotonic() - promoted_at, 2)
    t_rebuild = time.monotonic()
    try:
        await _rebuild_standby(ctx, dead_port)
        ctx.facts["standby_rebuilt_s"] = round(time.monotonic() - t_rebuild, 2)
    except Exception as exc:
        ctx.facts["standby_rebuild_failed"] = f"{type(exc).__name__}: {exc}"[:300]


async def _rebuild_standby(ctx: Ctx, port: int) -> None:
    """A fresh standby of the promoted primary (``pg_basebackup -R``) on ``port``."""
    stores, platform = _stores(ctx), ctx.platform
    promoted = stores.standby
    n = sum(1 for i in platform.stack.sup.items if i.name.startswith("postgres"))
    fresh = PostgresStandby(
        promoted,
        run_dir=platform.stack.run_dir / f"postgres-{n}",
        port=port,
        **platform.stack.server_tls(f"postgres-{n}"),
    )
    await asyncio.to_thread(fresh.start, True)  # outside the lock: supervision goes on meanwhile
    fresh_item = Managed(f"postgres-standby-{n}", fresh, kind="server")
    fresh_item.state = "running"

    def adopt() -> None:
        platform.stack.sup.add(fresh_item, start=False)

    await platform.run_locked(adopt)
    stores.postgres, stores.standby = promoted, fresh


def _signalman_fences(ctx: Ctx) -> dict[str, int]:
    out = {}
    for name in ("signalman-0", "signalman-1"):
        for part in ctx.platform.health(name).get("partitions", []):
            out[f"{part[0]}/{part[1]}"] = int(part[2])
    return out


def _postgres_check(ctx: Ctx, r: Result) -> list[str]:
    f = ctx.facts
    out = [*drills._no_failed_routing(r), *drills._no_event_loss(r)]
    before, after = f.get("fences_before", {}), f.get("fences_after", {})
    lower = [k for k, v in before.items() if after.get(k, 0) <= v]
    if not before or lower:
        out.append(f"fences not strictly higher after the promotion for {lower or 'all'}")
    resumed = f.get("signalman_resumed_after_promotion_s")
    if resumed is None or resumed > 15:
        out.append(f"Signalman resumed {resumed} s after the promotion (target <= 15 s)")
    if "standby_rebuild_failed" in f:
        out.append(f"no standby after the drill: {f['standby_rebuild_failed']}")
    return out


STORE_DRILLS = [
    Drill(
        "redis-failover",
        "kill -9 the Redis primary under traffic, Sentinel promotes a replica: 0 failed viewer "
        "routings, Foghorn healthy <= 10 s after the promotion, 0 lost live events, no fencing "
        "token or lease epoch seen twice, the old primary comes back as a replica",
        kill_redis_primary,
        drills.foghorn_degraded,
        "foghorn /health degraded",
        _redis_check,
        needs_ha_stores=True,
        alerts=("StoreFailover",),
    ),
    Drill(
        "redis-zombie-primary",
        "SIGSTOP the Redis primary past Sentinel's down-after, a replica is promoted, SIGCONT: "
        "nothing the old primary accepts after the promotion is visible anywhere; same traffic "
        "expectations as redis-failover",
        pause_redis_primary,
        drills.foghorn_degraded,
        "foghorn /health degraded",
        _zombie_check,
        needs_ha_stores=True,
        alerts=("StoreFailover",),
    ),
    Drill(
        "postgres-failover",
        "kill -9 the PostgreSQL primary, promote the standby: Signalman resumes <= 15 s after "
        "the promotion, 0 lost and 0 duplicated events, every fence strictly higher after",
        kill_postgres_primary,
        drills.signalman_lock_lost,
        "signalman lock connection reconnecting",
        _postgres_check,
        needs_ha_stores=True,
        alerts=("StoreFailover",),
    ),
]

drills.DRILLS.extend(STORE_DRILLS)
drills.BY_NAME.update({d.name: d for d in STORE_DRILLS})
