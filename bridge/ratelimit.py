"""Rate limiting: token buckets per tenant and per anonymous IP.

The shared ``BucketStore`` (Redis) decides exactly across replicas. When it is unavailable the
limiter falls back to a per-replica in-memory bucket: the service keeps limiting, approximately
(each replica admits up to the full limit, so N replicas admit up to N times it), and decisions
say ``exact=False``.
"""

from __future__ import annotations

from collections import Counter

from bridge.store import BucketStore, StoreUnavailable
from bridge.store.memory import MemoryBucketStore
from bridge.token_bucket import Decision, Limit


class RateLimiter:
    """Take tokens from the shared store, or from local buckets while it is unavailable."""

    def __init__(self, shared: BucketStore | None, local: MemoryBucketStore | None = None) -> None:
        self._shared = shared
        self._local = local or MemoryBucketStore()
        # (decision, mode) -> count: read at scrape time (api_gateway.metrics), a plain integer
        # per request on the hot path instead of an instrument call.
        self.decisions: Counter[tuple[str, str]] = Counter()

    @property
    def shared(self) -> bool:
        """True when decisions are taken in the shared store (HA mode)."""
        return self._shared is not None

    @property
    def local(self) -> MemoryBucketStore:
        """The in-process buckets: the embedded default and the fallback while Redis is down."""
        return self._local

    def count(self, decision: Decision, mode: str) -> None:
        """Count a decision taken elsewhere on one of this limiter's buckets (``bridge.answers``
        charges them in the same step as its read)."""
        self.decisions["allowed" if decision.allowed else "rejected", mode] += 1

    async def check(self, key: str, limit: Limit, cost: int = 1) -> Decision:
        """Decide one request of ``cost`` tokens against bucket ``key``."""
        mode = "shared"
        decision: Decision
        if self._shared is None:
            decision = await self._local.take(key, limit, cost)
            mode = "local"
        else:
            try:
                decision = await self._shared.take(key, limit, cost)
            except StoreUnavailable:
                local = await self._local.take(key, limit, cost)
                decision = Decision(
                    allowed=local.allowed,
                    limit=local.limit,
                    remaining=local.remaining,
                    reset_s=local.reset_s,
                    retry_after_s=local.retry_after_s,
                    exact=False,
                )
                mode = "fallback"
        self.count(decision, mode)
        return decision
