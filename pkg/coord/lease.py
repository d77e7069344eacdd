"""A leader lease with a fencing epoch, for singleton duties run by one replica at a time.

Key ``<key>`` holds ``holder|epoch`` with a TTL (default 15 s, renewed every 5 s, like the
upstream Go Foghorn). Epochs come from ``<key>:epoch`` (INCR), so two terms never share one.
Epochs also survive a Sentinel failover to a replica that lacked the last increments (they
start above the new primary's failover-epoch floor, ``pkg.coord.era``). Acquire is
SET-if-absent, renewal and release are compare-and-set on the exact value, so only
the holder can extend or drop its term.

A store that lost the lease (a Redis restarted empty, a promoted replica that lacked the
last writes) cannot tell who still believes it holds it: the old holder keeps its term until its
next renewal fails or its local term runs out. So when a contender finds the epoch counter below
an epoch it has seen, the store lost data: the acquisition is refused and ``<key>:hold`` is set
for one TTL (the longest any holder can still believe in a term renewed before the loss), and
nobody acquires until it expires (the "delayed restart" of the Redlock analysis, per lease).

Locally the holder counts its term as valid until ``sent + ttl - safety`` where ``sent`` is the
moment the last successful renewal was *sent* (the key's TTL started no earlier than that). A
renewal that fails, is refused or comes back late makes the holder step down at once, before
Redis' TTL could let another replica in; work it does as leader should also be fenced by the
epoch (see ``guard``), because a paused process cannot notice it stepped down.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
import structlog
from redis.exceptions import RedisError

from pkg.common import history
from pkg.common.clock import SYSTEM_CLOCK, Clock
from pkg.coord.era import ERA_KEY, ERA_LUA
from pkg.coord.scripts import DELETE_IF_EQUALS, EXPIRE_IF_EQUALS

log = structlog.get_logger("pkg.coord.lease")

# KEYS: lease, epoch counter, failover-epoch record, hold. ARGV: holder, ttl ms, the highest
# epoch the caller has seen. A promoted replica may lack the last INCR of the epoch counter:
# epochs start above its failover-epoch floor (pkg.coord.era); a Redis restarted empty (no
# persistence) lost the counter and the era record too: epochs start above what the contenders
# saw. A counter below what the caller saw means the store lost data, the lease with it, while
# its holder may still lead: hold the lease for one TTL first (returns {2, hold ms left}).
_ACQUIRE = (
    ERA_LUA
    + """
local cur = redis.call('GET', KEYS[1])
if cur then return {0, cur} end
local held = redis.call('PTTL', KEYS[4])
if held > 0 then return {2, held} end
local seen = tonumber(ARGV[3]) or 0
local counter = tonumber(redis.call('GET', KEYS[2]) or '0') or 0
if counter < seen then
  redis.call('SET', KEYS[2], seen)
  redis.call('SET', KEYS[4], seen, 'PX', ARGV[2])
  return {2, tonumber(ARGV[2])}
end
local epoch = redis.call('INCR', KEYS[2])
local floor = era_floor(KEYS[3])
if seen > floor then floor = seen end
if epoch <= floor then
  epoch = floor + 1
  redis.call('SET', KEYS[2], epoch)
end
local value = ARGV[1] .. '|' .. epoch
redis.call('SET', KEYS[1], value, 'PX', ARGV[2])
return {1, value}
"""
)


@dataclass(frozen=True)
class LeaseState:
    """A term: who holds the lease and its epoch."""

    holder: str
    epoch: int

    def encode(self) -> str:
        return f"{self.holder}|{self.epoch}"

    @classmethod
    def decode(cls, raw: str | bytes) -> LeaseState:
        text = raw.decode() if isinstance(raw, bytes) else raw
        holder, epoch = text.rsplit("|", 1)
        return cls(holder=holder, epoch=int(epoch))


Listener = Callable[[LeaseState | None], Awaitable[None] | None]


class LeaderLease:
    """One replica's view of a leader lease; ``run()`` keeps it acquired/renewed."""

    def __init__(
        self,
        redis: aioredis.Redis,
        key: str,
        holder: str,
        *,
        ttl_s: float = 15.0,
        renew_every_s: float = 5.0,
        safety_s: float | None = None,
        clock: Clock = SYSTEM_CLOCK,
        on_change: Listener | None = None,
    ) -> None:
        if "|" in holder or not holder:
            raise ValueError("holder must be non-empty and must not contain '|'")
        if renew_every_s >= ttl_s:
            raise ValueError("renew_every_s must be shorter than ttl_s")
        self._redis = redis
        self.key = key
        self.epoch_key = f"{key}:epoch"
        self.hold_key = f"{key}:hold"
        self.holder = holder
        self.ttl_s = ttl_s
        self.renew_every_s = renew_every_s
        # Clock drift and the renewal round trip eat into the term: stop trusting it early.
        self.safety_s = ttl_s * 0.1 if safety_s is None else safety_s
        self._clock = clock
        self._on_change = on_change
        self._state: LeaseState | None = None
        # The highest epoch seen (ours, or another holder's in a refused acquire): a Redis that
        # lost its counter must not hand out an epoch again (found by the history checker in
        # the redis-restart drill: epoch 2 issued twice, epoch 1 after 2).
        self._seen_epoch = 0
        self._valid_until = 0.0
        self._acquire = redis.register_script(_ACQUIRE)
        self._renew = redis.register_script(EXPIRE_IF_EQUALS)
        self._release = redis.register_script(DELETE_IF_EQUALS)

    # -- queries ----------------------------------------------------------------------------
    @property
    def state(self) -> LeaseState | None:
        """Our term if we believe we hold it and it has not run out locally."""
        if self._state is not None and self._clock.monotonic() < self._valid_until:
            return self._state
        return None

    def is_leader(self) -> bool:
        return self.state is not None

    @property
    def epoch(self) -> int | None:
        state = self.state
        return state.epoch if state else None

    def guard(self) -> tuple[str, str] | None:
        """``(key, value)`` a fenced write can check in Lua: valid only during our term."""
        state = self.state
        return (self.key, state.encode()) if state else None

    async def current(self) -> LeaseState | None:
        """Who holds the lease according to Redis right now."""
        raw = await self._redis.get(self.key)
        state = LeaseState.decode(raw) if raw is not None else None
        if state is not None:
            self._seen_epoch = max(self._seen_epoch, state.epoch)
        return state

    # -- transitions ------------------------------------------------------------------------
    async def try_acquire(self) -> LeaseState | None:
        """Acquire the lease if nobody holds it; returns our new term or None."""
        sent = self._clock.monotonic()
        raw: Any = await self._acquire(
            keys=[self.key, self.epoch_key, ERA_KEY, self.hold_key],
            args=[self.holder, str(int(self.ttl_s * 1000)), str(self._seen_epoch)],
        )
        if int(raw[0]) == 2:
            log.warning(
                "lease held after a store data loss",
                key=self.key,
                seen_epoch=self._seen_epoch,
                hold_ms_left=int(raw[1]),
            )
            return None
        if int(raw[0]) != 1:
            with contextlib.suppress(ValueError):  # someone else's term: remember its epoch
                self._seen_epoch = max(self._seen_epoch, LeaseState.decode(raw[1]).epoch)
            return None
        state = LeaseState.decode(raw[1])
        self._seen_epoch = max(self._seen_epoch, state.epoch)
        await self._become(state, sent)
        return self._state

    async def renew(self) -> bool:
        """Extend our term by compare-and-set; steps down if it is no longer ours or too late."""
        state = self._state
        if state is None:
            return False
        sent = self._clock.monotonic()
        if sent >= self._valid_until:
            await self._step_down("renewal late: term already ran out locally")
            return False
        try:
            ok = int(
                await self._renew(
                    keys=[self.key], args=[state.encode(), str(int(self.ttl_s * 1000))]
                )
            )
        except (RedisError, OSError) as exc:
            if self._clock.monotonic() >= self._valid_until:
                await self._step_down(f"renewal failed past the term: {exc}")
            return False
        if not ok:
            await self._step_down("lease taken over or expired in Redis")
            return False
        if self._clock.monotonic() >= self._valid_until:
            # The answer came back after our local term ended: someone else may hold it now.
            await self._step_down("renewal answered too late")
            return False
        self._valid_until = sent + self.ttl_s - self.safety_s
        self._record("renew", state.epoch)
        return True

    async def release(self) -> bool:
        """Give the lease up (holder only), so a successor need not wait for the TTL."""
        state = self._state
        if state is None:
            return False
        self._state = None
        self._record("release", state.epoch)
        try:
            released = int(await self._release(keys=[self.key], args=[state.encode()])) == 1
        finally:
            await self._notify(None)
        log.info("lease released", key=self.key, epoch=state.epoch, released=released)
        return released

    async def _become(self, state: LeaseState, sent: float) -> None:
        self._state = state
        self._valid_until = sent + self.ttl_s - self.safety_s
        self._record("acquire", state.epoch, t_sent=history.wall_of(sent, self._clock.monotonic()))
        log.info("lease acquired", key=self.key, holder=self.holder, epoch=state.epoch)
        await self._notify(state)

    async def _step_down(self, reason: str) -> None:
        state = self._state
        self._state = None
        if state is not None:
            self._record("lost", state.epoch)
            log.warning("lease lost", key=self.key, epoch=state.epoch, reason=reason)
            await self._notify(None)

    def _record(self, op: str, epoch: int, **extra: float) -> None:
        # The term as this holder sees it ends at valid_until even if nothing is logged then
        # (is_leader() just turns false): the checker reads the end from here.
        valid_until = history.wall_of(self._valid_until, self._clock.monotonic())
        history.record("lease", self.key, op, epoch, self.holder, valid_until=valid_until, **extra)

    async def _notify(self, state: LeaseState | None) -> None:
        if self._on_change is None:
            return
        result = self._on_change(state)
        if asyncio.iscoroutine(result):
            await result

    # -- the loop ---------------------------------------------------------------------------
    async def run_once(self) -> None:
        """One iteration: renew if holding, else try to acquire. Never raises on Redis errors."""
        if self._state is not None and await self.renew():
            return
        if self._state is None:
            try:
                await self.try_acquire()
            except (RedisError, OSError) as exc:
                log.debug("lease acquire failed", key=self.key, error=str(exc))

    async def run(self) -> None:
        """Keep the lease: renew every ``renew_every_s`` while held, otherwise try to take it."""
        try:
            while True:
                await self.run_once()
                await self._clock.asleep(self.renew_every_s)
        finally:
            if self._state is not None:
                # Shielded so a cancelled run() still hands the lease back, and bounded so an
                # orphaned release (run() cancelled again meanwhile, or its client closed) can
                # never outlive the term it releases and hang the event loop's shutdown.
                with contextlib.suppress(RedisError, OSError, asyncio.CancelledError, TimeoutError):
                    await asyncio.shield(asyncio.wait_for(self.release(), timeout=self.ttl_s))
