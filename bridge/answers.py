"""Whole answers of repeated queries, found in the rate limiter's round trip.

A cached ``route`` query used to cost a GraphQL parse/validate/execute plus two Redis round
trips (the rate-limit script, then the entry with its tag versions): ~18 times the CPU of a
trivial request. ``AnswerCache`` keeps the finished response body of a query whose every field
came from the response cache (``bridge.cache``), keyed by what the answer depends on (the
caller's identity, the document's hash, the operation name, the variables; built by the HTTP
view), together with the tags and tag versions of the cache entries it was made from. A repeat
is then one step: the caller's rate-limit bucket is charged and the answer read, its tag
versions compared, in one atomic store call (one Lua script on Redis), before any GraphQL
machinery runs.

What the response cache guarantees still holds, because an answer is only a copy of fresh cache
entries that carries their versions:

- invalidation by tag or tenant, on every replica: a bumped tag makes the stored versions stale,
  so the next request runs the query again (the versions are compared in the same step);
- TTL, stale-while-revalidate and early refresh: an answer lives until its earliest entry stops
  being fresh, and a request that the early-refresh draw picks runs the query, so the response
  cache serves stale and refreshes in the background as before;
- negative caching: a ``null`` from a cached "does not exist" is an answer like any other, for
  the negative entry's shorter life;
- rate limits: every request is charged to the same bucket as before, refused requests read
  nothing; while the store is unreachable the limiter's local fallback decides and the query
  runs (the response cache is bypassed as before).

Answers with errors, from a stale or bypassed entry, or of an operation the HTTP view does not
declare cacheable are never kept. No I/O here beyond the ``AnswerStore`` it is given.
"""

from __future__ import annotations

import contextvars
import random
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

from bridge.ratelimit import RateLimiter
from bridge.store import AnswerStore, StoreUnavailable
from bridge.token_bucket import Decision, Limit
from bridge.xfetch import should_refresh_early
from pkg.common.clock import SYSTEM_CLOCK, Clock


@dataclass(frozen=True)
class Read:
    """One response-cache read an answer was made from: its tags, their versions, its life."""

    tags: tuple[str, ...]
    versions: tuple[int, ...]
    fresh_until: float  # 0.0: not fresh (stale, bypassed, failed): the answer is not kept
    delta: float  # how long the entry took to load (the early-refresh weight)


@dataclass
class Recorder:
    """The cache reads of one request; ``cacheable`` False when anything else decided it."""

    reads: list[Read] = field(default_factory=list)
    cacheable: bool = True

    def add(self, read: Read) -> None:
        self.reads.append(read)
        if read.fresh_until <= 0.0:
            self.cacheable = False

    def forbid(self) -> None:
        """Something this answer depends on did not come from the response cache."""
        self.cacheable = False


_recorder: contextvars.ContextVar[Recorder | None] = contextvars.ContextVar(
    "bridge_answer_recorder", default=None
)


@contextmanager
def recording() -> Iterator[Recorder]:
    """Collect the cache reads made while the block runs (resolvers run in its context)."""
    rec = Recorder()
    token = _recorder.set(rec)
    try:
        yield rec
    finally:
        _recorder.reset(token)


def current_recorder() -> Recorder | None:
    """The recorder of the request being handled, None outside ``recording()``."""
    return _recorder.get()


def encode(body: bytes, fresh_until: float, delta: float) -> bytes:
    """An answer as stored: a header line with its freshness and load time, then the body."""
    return f"{fresh_until:.3f} {delta:.4f}\n".encode() + body


def decode(raw: bytes) -> tuple[bytes, float, float] | None:
    """(body, fresh_until, delta), or None for a corrupt or foreign entry (a miss)."""
    head, sep, body = raw.partition(b"\n")
    parts = head.split(b" ")
    if not sep or len(parts) != 2:
        return None
    try:
        return body, float(parts[0]), float(parts[1])
    except ValueError:
        return None


class AnswerCache:
    """Charge the caller's bucket and read a stored answer in one store call."""

    def __init__(
        self,
        store: AnswerStore,
        limiter: RateLimiter,
        *,
        clock: Clock = SYSTEM_CLOCK,
        rand: Callable[[], float] = random.random,
        xfetch_beta: float = 1.0,
    ) -> None:
        self.store = store
        self.limiter = limiter
        self._clock = clock
        self._rand = rand
        self._beta = xfetch_beta
        self.hits = 0
        self.misses = 0
        self.stored = 0
        # result -> count, read at scrape time (api_gateway.metrics): no instrument call per hit.
        self.results: Counter[str] = Counter()

    async def admit(self, bucket: str, limit: Limit, key: str) -> tuple[Decision, bytes | None]:
        """The rate-limit decision for ``bucket`` and, when allowed, the body stored under
        ``key`` if it is still fresh and none of its tags was bumped since it was made."""
        try:
            decision, raw = await self.store.admit_and_read(bucket, limit, 1, key)
        except StoreUnavailable:
            # Nothing was read; the limiter decides as it does for every request meanwhile.
            return await self.limiter.check(bucket, limit), None
        self.limiter.count(decision, "shared" if self.limiter.shared else "local")
        if raw is None:
            if decision.allowed:
                self._count("miss")
            return decision, None
        found = decode(raw)
        now = self._clock.time()
        if found is None or now >= found[1]:
            self._count("miss")
            return decision, None
        body, fresh_until, delta = found
        if should_refresh_early(now, fresh_until, delta, self._beta, self._rand()):
            # Run the query: the response cache draws again and may refresh in the background.
            self._count("early")
            return decision, None
        self._count("hit")
        return decision, body

    async def remember(self, key: str, body: bytes, reads: Sequence[Read]) -> bool:
        """Keep ``body`` under ``key`` until the earliest of ``reads`` stops being fresh, with
        every tag version it was made from. False when there is nothing worth keeping."""
        if not reads:
            return False
        fresh_until = min(r.fresh_until for r in reads)
        life_ms = int((fresh_until - self._clock.time()) * 1000)
        if life_ms <= 0:
            return False
        versions: dict[str, int] = {}
        for read in reads:
            for tag, version in zip(read.tags, read.versions, strict=True):
                # Two reads disagreeing on a tag: one of them is already outdated.
                if versions.setdefault(tag, version) != version:
                    return False
        delta = max(r.delta for r in reads)
        try:
            await self.store.write_answer(
                key,
                encode(body, fresh_until, delta),
                list(versions),
                list(versions.values()),
                life_ms,
            )
        except StoreUnavailable:
            return False
        self._count("stored")
        return True

    def _count(self, result: str) -> None:
        if result == "hit":
            self.hits += 1
        elif result in ("miss", "early"):
            self.misses += 1
        else:
            self.stored += 1
        self.results[result] += 1


__all__ = ["AnswerCache", "Read", "Recorder", "current_recorder", "decode", "encode", "recording"]
