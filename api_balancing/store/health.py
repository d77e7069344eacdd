"""Degraded-mode tracking: whether this replica is in sync with Redis, and if not, why.

Routing never consults this (it always answers from memory); ``/health`` reports it, and the
sync loop flips it back once it has re-converged.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import structlog
from redis.exceptions import RedisError

from pkg.common.clock import SYSTEM_CLOCK, Clock

log = structlog.get_logger("foghorn.ha")

# What "Redis is unreachable" looks like to the HA code: the store degrades, loops back off.
REDIS_ERRORS = (RedisError, OSError, asyncio.TimeoutError)


@dataclass(frozen=True)
class SyncStatus:
    ok: bool
    reason: str
    since: float  # wall-clock seconds of the last transition


class SyncHealth:
    """``ok`` or ``degraded`` with a reason; transitions are logged once each."""

    def __init__(self, clock: Clock = SYSTEM_CLOCK) -> None:
        self._clock = clock
        self._status = SyncStatus(False, "starting: not synced with Redis yet", clock.time())
        self.degradations = 0
        self.recoveries = 0

    @property
    def status(self) -> SyncStatus:
        return self._status

    @property
    def ok(self) -> bool:
        return self._status.ok

    def degrade(self, reason: str) -> None:
        if not self._status.ok and self._status.reason == reason:
            return
        if self._status.ok:
            self.degradations += 1
            log.warning("foghorn degraded", reason=reason)
        self._status = SyncStatus(False, reason, self._clock.time())

    def recover(self) -> None:
        if self._status.ok:
            return
        self.recoveries += 1
        log.info("foghorn in sync with Redis", after=self._status.reason)
        self._status = SyncStatus(True, "", self._clock.time())
