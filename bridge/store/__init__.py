"""State backends for Bridge: one small interface, an in-memory and a Redis implementation.

``CacheStore`` keeps cache entries (opaque bytes), tag version counters and short locks;
``BucketStore`` keeps token buckets; ``AnswerStore`` keeps whole answers and charges a bucket in
the same step (``bridge.answers``). The cache and limiter logic cannot tell which backend it
has. A backend that cannot answer raises ``StoreUnavailable``; callers then degrade (bypass the
cache, limit locally) instead of failing the request.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from bridge.token_bucket import Decision, Limit


class StoreUnavailable(Exception):
    """The shared backend cannot be reached right now (callers degrade, never fail)."""


class CacheStore(Protocol):
    """Entries, tag versions and locks for the response cache."""

    async def read(self, key: str, tags: Sequence[str]) -> tuple[bytes | None, list[int]]:
        """The raw entry under ``key`` (or None) and the current version of each tag, at once."""
        ...

    async def tag_versions(self, tags: Sequence[str]) -> list[int]:
        """The current version of each tag (0 for a tag never bumped)."""
        ...

    async def write(self, key: str, raw: bytes, ttl_ms: int) -> None:
        """Store ``raw`` under ``key``; the backend drops it after ``ttl_ms``."""
        ...

    async def bump(self, tags: Sequence[str]) -> list[int]:
        """Increment each tag's version: every entry written under an older version is invalid."""
        ...

    async def acquire(self, name: str, token: str, ttl_ms: int) -> bool:
        """Take the lock ``name`` for ``ttl_ms`` unless someone holds it."""
        ...

    async def release(self, name: str, token: str) -> None:
        """Release ``name`` only if ``token`` still holds it."""
        ...

    async def extend(self, name: str, token: str, ttl_ms: int) -> bool:
        """Hold ``name`` for ``ttl_ms`` from now, only if ``token`` still holds it."""
        ...


class BucketStore(Protocol):
    """Token buckets, one per key, updated atomically."""

    async def take(self, key: str, limit: Limit, cost: int = 1) -> Decision:
        """Refill and take ``cost`` tokens from the bucket ``key`` in one atomic step."""
        ...


class AnswerStore(Protocol):
    """Whole answers, read in the same atomic step that charges a rate-limit bucket."""

    async def admit_and_read(
        self, bucket: str, limit: Limit, cost: int, key: str
    ) -> tuple[Decision, bytes | None]:
        """Take ``cost`` tokens from ``bucket`` (the ``BucketStore`` bucket of that name) and,
        when they were granted, return the answer under ``key`` if every tag it was written
        with still has the version it was written with (else None)."""
        ...

    async def write_answer(
        self, key: str, raw: bytes, tags: Sequence[str], versions: Sequence[int], ttl_ms: int
    ) -> None:
        """Store ``raw`` under ``key`` with the tag versions it was made from, for ``ttl_ms``."""
        ...


__all__ = ["AnswerStore", "BucketStore", "CacheStore", "StoreUnavailable"]
