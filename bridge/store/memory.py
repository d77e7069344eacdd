"""In-memory stores: the embedded default (one replica) and the degraded fallback."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

from bridge.token_bucket import BucketState, Decision, Limit, take
from pkg.common.clock import SYSTEM_CLOCK, Clock


class MemoryCacheStore:
    """A bounded LRU of entries with expiry, plus tag versions and locks, all process-local."""

    def __init__(self, clock: Clock = SYSTEM_CLOCK, max_entries: int = 10_000) -> None:
        self._clock = clock
        self._max = max_entries
        self._entries: OrderedDict[str, tuple[bytes, float]] = OrderedDict()
        self._tags: dict[str, int] = {}
        self._locks: dict[str, tuple[str, float]] = {}

    async def read(self, key: str, tags: Sequence[str]) -> tuple[bytes | None, list[int]]:
        now = self._clock.monotonic()
        found = self._entries.get(key)
        raw: bytes | None = None
        if found is not None:
            if found[1] > now:
                raw = found[0]
                self._entries.move_to_end(key)
            else:
                del self._entries[key]
        return raw, [self._tags.get(t, 0) for t in tags]

    async def tag_versions(self, tags: Sequence[str]) -> list[int]:
        return [self._tags.get(t, 0) for t in tags]

    async def write(self, key: str, raw: bytes, ttl_ms: int) -> None:
        self._entries[key] = (raw, self._clock.monotonic() + ttl_ms / 1000.0)
        self._entries.move_to_end(key)
        while len(self._entries) > self._max:
            self._entries.popitem(last=False)

    async def bump(self, tags: Sequence[str]) -> list[int]:
        out = []
        for tag in tags:
            self._tags[tag] = self._tags.get(tag, 0) + 1
            out.append(self._tags[tag])
        return out

    async def acquire(self, name: str, token: str, ttl_ms: int) -> bool:
        now = self._clock.monotonic()
        held = self._locks.get(name)
        if held is not None and held[1] > now:
            return False
        self._locks[name] = (token, now + ttl_ms / 1000.0)
        return True

    async def release(self, name: str, token: str) -> None:
        held = self._locks.get(name)
        if held is not None and held[0] == token:
            del self._locks[name]

    async def extend(self, name: str, token: str, ttl_ms: int) -> bool:
        now = self._clock.monotonic()
        held = self._locks.get(name)
        if held is None or held[0] != token or held[1] <= now:
            return False
        self._locks[name] = (token, now + ttl_ms / 1000.0)
        return True


class MemoryBucketStore:
    """Per-process token buckets (exact for one replica, approximate across several)."""

    def __init__(self, clock: Clock = SYSTEM_CLOCK, max_buckets: int = 100_000) -> None:
        self._clock = clock
        self._max = max_buckets
        self._buckets: OrderedDict[str, BucketState] = OrderedDict()

    async def take(self, key: str, limit: Limit, cost: int = 1) -> Decision:
        now_ms = int(self._clock.monotonic() * 1000)
        state, decision = take(self._buckets.get(key), now_ms, limit, cost)
        self._buckets[key] = state
        self._buckets.move_to_end(key)
        # A full bucket forgotten is the same as a full bucket kept: evicting the oldest is safe
        # for buckets idle long enough to have refilled, and bounds memory under an IP flood.
        while len(self._buckets) > self._max:
            self._buckets.popitem(last=False)
        return decision


class MemoryAnswerStore:
    """Answers in process (the embedded default): the buckets are the limiter's own, the tag
    versions those of the response cache's ``MemoryCacheStore``, so both paths agree."""

    def __init__(
        self,
        buckets: MemoryBucketStore,
        tags: MemoryCacheStore,
        clock: Clock = SYSTEM_CLOCK,
        max_entries: int = 10_000,
    ) -> None:
        self._buckets = buckets
        self._tags = tags
        self._clock = clock
        self._max = max_entries
        self._answers: OrderedDict[str, tuple[bytes, tuple[str, ...], list[int], float]] = (
            OrderedDict()
        )

    async def admit_and_read(
        self, bucket: str, limit: Limit, cost: int, key: str
    ) -> tuple[Decision, bytes | None]:
        decision = await self._buckets.take(bucket, limit, cost)
        found = self._answers.get(key) if decision.allowed else None
        if found is None:
            return decision, None
        raw, tags, versions, until = found
        if until <= self._clock.monotonic():
            del self._answers[key]
            return decision, None
        if await self._tags.tag_versions(tags) != versions:
            return decision, None
        self._answers.move_to_end(key)
        return decision, raw

    async def write_answer(
        self, key: str, raw: bytes, tags: Sequence[str], versions: Sequence[int], ttl_ms: int
    ) -> None:
        until = self._clock.monotonic() + ttl_ms / 1000.0
        self._answers[key] = (raw, tuple(tags), list(versions), until)
        self._answers.move_to_end(key)
        while len(self._answers) > self._max:
            self._answers.popitem(last=False)
