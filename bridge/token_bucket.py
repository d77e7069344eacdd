"""Token-bucket arithmetic, shared by the in-memory limiter and mirrored by the Redis Lua script.

Pure functions over an explicit state and an explicit "now" (milliseconds), so the same maths is
unit-tested once and the Lua script in ``bridge/store/redis_store.py`` follows it line by line.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Limit:
    """A bucket of ``capacity`` tokens refilled at ``rate`` tokens per second (burst = capacity)."""

    capacity: int
    rate: float

    def __post_init__(self) -> None:
        if self.capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {self.capacity}")
        if not self.rate > 0:
            raise ValueError(f"rate must be > 0, got {self.rate}")


@dataclass(frozen=True)
class BucketState:
    tokens: float
    updated_ms: int


@dataclass(frozen=True)
class Decision:
    """The outcome of one take: what the ``X-RateLimit-*`` and ``Retry-After`` headers report."""

    allowed: bool
    limit: int
    remaining: int
    reset_s: int
    """Seconds until the bucket is full again."""
    retry_after_s: int
    """Seconds until a rejected request may succeed (0 when allowed)."""
    exact: bool = True
    """False when decided by a per-replica local bucket (Redis unreachable): approximate."""


def take(
    state: BucketState | None, now_ms: int, limit: Limit, cost: int = 1
) -> tuple[BucketState, Decision]:
    """Refill ``state`` up to ``now_ms`` and try to take ``cost`` tokens."""
    if state is None:
        tokens, updated = float(limit.capacity), now_ms
    else:
        tokens, updated = state.tokens, state.updated_ms
    if now_ms > updated:
        tokens = min(float(limit.capacity), tokens + (now_ms - updated) * limit.rate / 1000.0)
        updated = now_ms
    allowed = tokens >= cost
    retry_ms = 0
    if allowed:
        tokens -= cost
    else:
        retry_ms = math.ceil((cost - tokens) * 1000.0 / limit.rate)
    full_ms = math.ceil((limit.capacity - tokens) * 1000.0 / limit.rate)
    decision = Decision(
        allowed=allowed,
        limit=limit.capacity,
        remaining=max(0, math.floor(tokens)),
        reset_s=math.ceil(full_ms / 1000.0),
        retry_after_s=math.ceil(retry_ms / 1000.0) if not allowed else 0,
    )
    return BucketState(tokens, updated), decision
