"""The response cache shared by Bridge replicas.

``ResponseCache.get(key, loader, tags=...)`` answers from the cache or calls ``loader`` once:

- **TTL + stale-while-revalidate**: an entry is fresh for ``ttl``, then served stale for
  ``stale`` more seconds while ONE background refresh runs (deduplicated in process and across
  replicas by a short lock).
- **Early refresh (XFetch)**: a fresh entry close to expiry is refreshed in the background by
  one probabilistically chosen reader, weighted by how long the value took to compute.
- **Negative caching**: a loader that raises ``NotFound`` (an authoritative "does not exist")
  is cached for ``negative_ttl``; transient errors are never cached.
- **Stampede protection**: concurrent misses share one in-process flight; across replicas the
  flight leader takes a short Redis lock, and the other replicas poll for the entry it writes,
  so N concurrent misses anywhere cost one backend call.
- **Invalidation by tag**: each entry records the version of its tags (e.g. ``tenant:acme``,
  ``nodes``) at load time; ``invalidate(tags)`` increments the versions, and every replica's
  next read sees the mismatch at once (the versions are read with the entry, in one round trip).
  No key scans.
- **In-process tier** (optional): entries kept locally are revalidated on every read against
  the tag versions (a small MGET), so they are never served after an invalidation.
- **stale-if-error**: an expired entry is kept ``error_grace`` longer and served if the backend
  fails.
- **Redis down**: the store raises ``StoreUnavailable``; the cache is bypassed (the loader is
  called directly, still through the in-process singleflight).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import secrets
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import structlog
from opentelemetry import metrics

from bridge.singleflight import SingleFlight
from bridge.store import CacheStore, StoreUnavailable
from bridge.xfetch import should_refresh_early
from pkg.common.clock import SYSTEM_CLOCK, Clock

log = structlog.get_logger("bridge.cache")
_meter = metrics.get_meter("bridge.cache")
_requests = _meter.create_counter(
    "bridge_cache_requests", description="Cache lookups by result (hit, miss, stale, ...)"
)
_backend_calls = _meter.create_counter(
    "bridge_cache_backend_calls", description="Loader (backend) calls made by the cache"
)

Loader = Callable[[], Awaitable[Any]]


class NotFound(Exception):
    """Raised by a loader for an authoritative "does not exist": cached negatively."""


@dataclass(frozen=True)
class CachePolicy:
    """Lifetimes in seconds of one kind of entry."""

    ttl: float = 5.0
    stale: float = 30.0
    negative_ttl: float = 2.0
    error_grace: float = 60.0


@dataclass(frozen=True)
class CacheResult:
    """``value`` (None when ``found`` is False) and how it was obtained (``status``)."""

    value: Any
    found: bool
    status: str  # hit | early | stale | miss | negative | bypass | stale_error
    # The stored entry the value is (for ``bridge.answers``): its tag versions, until when it is
    # fresh (0.0 when the value is not a fresh stored entry) and how long it took to load.
    versions: tuple[int, ...] = ()
    fresh_until: float = 0.0
    delta: float = 0.0


@dataclass
class CacheStats:
    """Counters kept per cache object (the metrics carry the same, process-wide)."""

    hits: int = 0
    misses: int = 0
    stale: int = 0
    negative: int = 0
    bypass: int = 0
    errors: int = 0
    backend_calls: int = 0
    refreshes: int = 0
    by_status: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class _Entry:
    value: Any
    negative: bool
    fresh_until: float
    stale_until: float
    delta: float
    versions: tuple[int, ...]

    def encode(self) -> bytes:
        return json.dumps(
            {
                "v": self.value,
                "n": self.negative,
                "f": self.fresh_until,
                "s": self.stale_until,
                "d": self.delta,
                "t": list(self.versions),
            },
            separators=(",", ":"),
        ).encode()

    @staticmethod
    def decode(raw: bytes) -> _Entry | None:
        try:
            d = json.loads(raw)
            return _Entry(
                d["v"], bool(d["n"]), float(d["f"]), float(d["s"]), float(d["d"]), tuple(d["t"])
            )
        except (ValueError, KeyError, TypeError):
            return None  # a corrupt or foreign entry is a miss, never an error


class ResponseCache:
    """Cache-aside with shared state in a ``CacheStore`` (Redis for HA, memory when embedded)."""

    def __init__(
        self,
        store: CacheStore,
        *,
        policy: CachePolicy | None = None,
        clock: Clock = SYSTEM_CLOCK,
        rand: Callable[[], float] = random.random,
        xfetch_beta: float = 1.0,
        lock_ttl_s: float = 5.0,
        lock_wait_s: float = 5.0,
        local_size: int = 0,
        lock_lease_s: float = 0.5,
    ) -> None:
        self.store = store
        self.policy = policy or CachePolicy()
        self.stats = CacheStats()
        self._clock = clock
        self._rand = rand
        self._beta = xfetch_beta
        self._lock_ttl_ms = int(lock_ttl_s * 1000)
        # The cross-replica lock is a lease its holder renews while it loads (every third of
        # it), never past lock_ttl_s: a replica killed while loading frees the key within one
        # lease, where a plain TTL made the other replicas wait up to lock_wait_s for it (a
        # viewer retried on the other Bridge at the moment of a kill -9 timed out there).
        self._lease_ms = int(min(lock_lease_s, lock_ttl_s) * 1000)
        self._lock_wait_s = lock_wait_s
        self._flights: SingleFlight[CacheResult] = SingleFlight()
        self._refreshing: set[str] = set()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._local_size = local_size
        self._local: OrderedDict[str, _Entry] = OrderedDict()
        self._pending: set[str] = set()

    # -- public API -------------------------------------------------------------------------
    async def get(
        self,
        key: str,
        loader: Loader,
        tags: Sequence[str] = (),
        policy: CachePolicy | None = None,
    ) -> CacheResult:
        """The cached value for ``key``, or ``loader()``'s, with at most one load in flight."""
        pol = policy or self.policy
        tags = tuple(tags)
        try:
            entry, versions = await self._read(key, tags)
        except StoreUnavailable:
            return await self._bypass(key, loader)
        now = self._clock.time()
        if entry is not None and entry.versions == versions:
            if now < entry.fresh_until:
                status = "hit"
                if not entry.negative and should_refresh_early(
                    now, entry.fresh_until, entry.delta, self._beta, self._rand()
                ):
                    self._refresh_in_background(key, loader, tags, pol)
                    status = "early"
                return self._answer(entry, status)
            if now < entry.stale_until and not entry.negative:
                self._refresh_in_background(key, loader, tags, pol)
                return self._answer(entry, "stale")
        # Only an entry that was never invalidated may stand in for a failing backend.
        stale_for_error = (
            entry
            if entry is not None and not entry.negative and entry.versions == versions
            else None
        )
        return await self._flights.do(
            key, lambda: self._miss(key, loader, tags, pol, stale_for_error)
        )

    async def invalidate(self, tags: Sequence[str]) -> bool:
        """Invalidate every entry recorded under any of ``tags``, on every replica at once.

        Returns False when the store is unreachable: the tags are then remembered and bumped by
        ``flush_pending`` once it is back, so entries written before the outage (still in a Redis
        that only this replica could not reach) are not served after it.
        """
        self._local.clear()  # cheap and safe: local entries revalidate anyway
        try:
            await self.store.bump(list(tags))
        except StoreUnavailable:
            self._pending.update(tags)
            log.warning("cache_invalidation_deferred", tags=list(tags))
            return False
        return True

    async def flush_pending(self) -> None:
        """Apply invalidations deferred during an outage (run when the store recovers)."""
        self._local.clear()
        if not self._pending:
            return
        tags = sorted(self._pending)
        try:
            await self.store.bump(tags)
        except StoreUnavailable:
            return
        self._pending.difference_update(tags)
        log.info("cache_invalidation_replayed", tags=tags)

    def clear_local(self) -> None:
        """Drop the in-process tier (e.g. after Redis restarted and tag versions reset)."""
        self._local.clear()

    async def close(self) -> None:
        """Cancel background refreshes."""
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            try:
                await task
            except BaseException:
                pass

    # -- internals --------------------------------------------------------------------------
    async def _read(self, key: str, tags: tuple[str, ...]) -> tuple[_Entry | None, tuple[int, ...]]:
        local = self._local.get(key) if self._local_size else None
        if local is not None:
            versions = tuple(await self.store.tag_versions(tags))
            if local.versions == versions and self._clock.time() < local.fresh_until:
                self._local.move_to_end(key)
                return local, versions
            del self._local[key]
        raw, vers = await self.store.read(key, tags)
        versions = tuple(vers)
        entry = _Entry.decode(raw) if raw is not None else None
        if entry is not None and self._local_size and entry.versions == versions:
            self._remember(key, entry)
        return entry, versions

    def _remember(self, key: str, entry: _Entry) -> None:
        self._local[key] = entry
        self._local.move_to_end(key)
        while len(self._local) > self._local_size:
            self._local.popitem(last=False)

    def _answer(self, entry: _Entry, status: str) -> CacheResult:
        if entry.negative:
            status = "negative"
        self._count(status)
        fresh = 0.0 if status == "stale" else entry.fresh_until
        return CacheResult(
            None if entry.negative else entry.value,
            not entry.negative,
            status,
            entry.versions,
            fresh,
            entry.delta,
        )

    def _count(self, status: str) -> None:
        s = self.stats
        s.by_status[status] = s.by_status.get(status, 0) + 1
        if status in ("hit", "early"):
            s.hits += 1
        elif status in ("stale", "stale_error"):
            s.stale += 1
        elif status == "negative":
            s.negative += 1
        elif status == "bypass":
            s.bypass += 1
        elif status == "error":
            s.errors += 1
        else:
            s.misses += 1
        _requests.add(1, {"result": status})

    async def _call_loader(self, loader: Loader) -> tuple[Any, bool, float]:
        """(value, found, seconds it took)."""
        self.stats.backend_calls += 1
        _backend_calls.add(1)
        start = self._clock.monotonic()
        try:
            value = await loader()
            found = True
        except NotFound:
            value, found = None, False
        return value, found, max(0.0, self._clock.monotonic() - start)

    async def _bypass(self, key: str, loader: Loader) -> CacheResult:
        async def go() -> CacheResult:
            value, found, _ = await self._call_loader(loader)
            return CacheResult(value, found, "bypass")

        result = await self._flights.do(key, go)
        self._count("bypass")
        return result

    async def _load_and_store(
        self,
        key: str,
        loader: Loader,
        versions: tuple[int, ...],
        pol: CachePolicy,
        stale_for_error: _Entry | None,
        count: bool = True,
    ) -> CacheResult:
        try:
            value, found, delta = await self._call_loader(loader)
        except Exception:
            if stale_for_error is not None and self._clock.time() < (
                stale_for_error.stale_until + pol.error_grace
            ):
                self._count("stale_error")
                return CacheResult(stale_for_error.value, True, "stale_error")
            if count:
                self._count("error")
            raise
        now = self._clock.time()
        if found:
            entry = _Entry(value, False, now + pol.ttl, now + pol.ttl + pol.stale, delta, versions)
            life = pol.ttl + pol.stale + pol.error_grace
        else:
            until = now + pol.negative_ttl
            entry = _Entry(None, True, until, until, delta, versions)
            life = pol.negative_ttl
        stored = entry.fresh_until
        try:
            # ``versions`` were read BEFORE the load: an invalidation during the load leaves
            # this entry already outdated, never hiding the newer state.
            await self.store.write(key, entry.encode(), int(life * 1000))
            if self._local_size:
                self._remember(key, entry)
        except StoreUnavailable:
            stored = 0.0
        status = "miss" if found else "negative"
        if count:
            self._count("miss")
        return CacheResult(value, found, status, versions, stored, delta)

    async def _miss(
        self,
        key: str,
        loader: Loader,
        tags: tuple[str, ...],
        pol: CachePolicy,
        stale_for_error: _Entry | None,
    ) -> CacheResult:
        """One flight per process: take the cross-replica lock, or wait for whoever holds it."""
        token = secrets.token_hex(8)
        deadline = self._clock.monotonic() + self._lock_wait_s
        pause = 0.002
        try:
            while True:
                if await self.store.acquire(key, token, self._lease_ms):
                    try:
                        # Another replica may have written the entry just before we got the lock.
                        entry, versions = await self._read(key, tags)
                        if self._usable(entry, versions):
                            assert entry is not None
                            return self._answer(entry, "hit")
                        async with self._renewed(key, token):
                            return await self._load_and_store(
                                key, loader, versions, pol, stale_for_error
                            )
                    finally:
                        try:
                            await self.store.release(key, token)
                        except StoreUnavailable:
                            pass  # the lock's TTL frees it
                await self._clock.asleep(pause)
                pause = min(pause * 2, 0.05)
                entry, versions = await self._read(key, tags)
                if self._usable(entry, versions):
                    assert entry is not None
                    return self._answer(entry, "hit")
                if self._clock.monotonic() >= deadline:
                    # The holder is stuck (paused, partitioned): load ourselves rather than wait.
                    log.warning("cache_lock_wait_expired", key=key)
                    return await self._load_and_store(key, loader, versions, pol, stale_for_error)
        except StoreUnavailable:
            value, found, _ = await self._call_loader(loader)
            self._count("bypass")
            return CacheResult(value, found, "bypass")

    @contextlib.asynccontextmanager
    async def _renewed(self, key: str, token: str) -> AsyncIterator[None]:
        """Renew the lock ``token`` holds on ``key`` while the body runs."""
        done = asyncio.Event()
        task = asyncio.ensure_future(self._renew(key, token, done))
        try:
            yield
        finally:
            # Cancelling alone does not stop the renewal: on Python 3.11 a cancel that meets a
            # Redis reply already read is lost (redis-py writes through asyncio.wait_for, which
            # then returns the result instead of raising), and the loop went on renewing until
            # the lock TTL, holding the request that loaded for those 5 s (isolate-replica,
            # --hosts: a route query answered after 5 s, its load balancer gave up at 2 s).
            done.set()
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _renew(self, key: str, token: str, done: asyncio.Event) -> None:
        until = self._clock.monotonic() + self._lock_ttl_ms / 1000.0
        while not done.is_set():
            await self._clock.asleep(self._lease_ms / 3000.0)
            left_ms = int((until - self._clock.monotonic()) * 1000)
            if done.is_set() or left_ms <= 0:
                return  # loaded; or held as long as the lock TTL allows: let it lapse
            try:
                if not await self.store.extend(key, token, min(self._lease_ms, left_ms)):
                    return  # lost it (lapsed, taken): the load goes on, unguarded
            except StoreUnavailable:
                return

    def _usable(self, entry: _Entry | None, versions: tuple[int, ...]) -> bool:
        return (
            entry is not None
            and entry.versions == versions
            and self._clock.time() < entry.fresh_until
        )

    def _refresh_in_background(
        self, key: str, loader: Loader, tags: tuple[str, ...], pol: CachePolicy
    ) -> None:
        if key in self._refreshing or self._flights.in_flight(key):
            return
        self._refreshing.add(key)
        task = asyncio.ensure_future(self._refresh(key, loader, tags, pol))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _refresh(
        self, key: str, loader: Loader, tags: tuple[str, ...], pol: CachePolicy
    ) -> None:
        token = secrets.token_hex(8)
        try:
            # Only one replica refreshes; the others keep serving the stale entry meanwhile.
            if not await self.store.acquire(key, token, self._lease_ms):
                return
            try:
                async with self._renewed(key, token):
                    versions = tuple(await self.store.tag_versions(tags))
                    self.stats.refreshes += 1
                    await self._load_and_store(key, loader, versions, pol, None, count=False)
            finally:
                await self.store.release(key, token)
        except StoreUnavailable:
            pass
        except Exception as exc:
            log.warning("cache_refresh_failed", key=key, error=repr(exc))
        finally:
            self._refreshing.discard(key)
