"""Retry budgets shared through Redis: the replicas of a caller retry against one budget.

A budget per process lets N replicas of a caller retry N times as much as one: in an outage each
spends its own spare tokens, and every restarted or newly scaled replica brings a full bucket.
With a ``SharedBudgetStore`` the budgets of one target in every process using the same Redis
and ``namespace`` are one token bucket:

* the call path never waits on Redis: each process counts its successes and failed attempts
  and decides on a local view of the shared bucket;
* a background thread applies those counts with one atomic Lua script per budget (refill by
  ``token_ratio`` per success up to ``max_tokens``, one token per failure) and adopts the
  shared level, every ``sync_interval`` and at once after a failure; so between two syncs a
  replica can over-spend by at most the failures it sees in that moment;
* if Redis is unreachable each process falls back to its local bucket (logged once) and
  rejoins when it is back.
"""

from __future__ import annotations

import threading
import weakref
from typing import Any

import redis

from pkg.clients.budget import RetryBudget
from pkg.clients.log import get_logger
from pkg.common import redisconn

_log = get_logger("pkg.clients.shared_budget")

# KEYS[1]: the budget's key. ARGV: max_tokens, token_ratio, successes, failures, ttl_ms.
# Returns the bucket's level after applying them (a string: Lua numbers become integers).
SYNC_LUA = """
local max_tokens = tonumber(ARGV[1])
local tokens = tonumber(redis.call('GET', KEYS[1]) or ARGV[1])
tokens = math.min(max_tokens, tokens + tonumber(ARGV[3]) * tonumber(ARGV[2]))
tokens = math.max(0, tokens - tonumber(ARGV[4]))
redis.call('SET', KEYS[1], tostring(tokens), 'PX', tonumber(ARGV[5]))
return tostring(tokens)
"""

# A bucket nobody touches for this long is forgotten (it refills to full anyway).
_TTL_MS = 3_600_000


class _SharedBudget:
    """The link between one local budget and its shared bucket in Redis."""

    def __init__(self, store: SharedBudgetStore, budget: RetryBudget, key: str) -> None:
        self.store = store
        self.budget_ref = weakref.ref(budget)
        self.key = key
        self.lock = threading.Lock()
        self.successes = 0
        self.failures = 0
        self.healthy = False

    def success(self) -> None:
        with self.lock:
            self.successes += 1

    def failure(self) -> None:
        with self.lock:
            self.failures += 1
        self.store.wake()

    def sync(self, client: redis.Redis, script: Any) -> None:
        budget = self.budget_ref()
        if budget is None:
            return
        with self.lock:
            successes, failures = self.successes, self.failures
            self.successes = self.failures = 0
        try:
            level = float(
                script(
                    keys=[self.key],
                    args=[budget.max_tokens, budget.ratio, successes, failures, _TTL_MS],
                )
            )
        except Exception:
            with self.lock:  # counted again at the next try
                self.successes += successes
                self.failures += failures
            self.healthy = False
            raise
        with self.lock:
            # The shared level, minus what happened here since the script read the counts.
            local = level + self.successes * budget.ratio - self.failures
            budget.tokens = min(budget.max_tokens, max(0.0, local))
        self.healthy = True


class SharedBudgetStore:
    """Shares the retry budget of every target of a ``Runtime`` through one Redis.

    ``Runtime(shared_budgets=SharedBudgetStore("redis://127.0.0.1:6379/0"))``; budgets of the
    same target in every process using the same Redis and ``namespace`` act as one bucket
    (sized by the policy of the first process that syncs it). Call ``close()`` on shutdown.
    """

    def __init__(
        self,
        url: str | None = None,
        *,
        client: redis.Redis | None = None,
        namespace: str = "pkg-clients:budget",
        sync_interval: float = 0.05,
    ) -> None:
        if (url is None) == (client is None):
            raise ValueError("SharedBudgetStore needs exactly one of url= or client=")
        if not (
            isinstance(sync_interval, int | float)
            and not isinstance(sync_interval, bool)
            and 0.005 <= sync_interval <= 60
        ):
            raise ValueError(f"sync_interval must be in 0.005..60 seconds, got {sync_interval!r}")
        if not namespace or not isinstance(namespace, str):
            raise ValueError("namespace must be a non-empty string")
        # ``url``: a plain Redis URL or a ``redis+sentinel://`` spec (pkg.common.redisconn).
        self.client: redis.Redis = client or redisconn.connect_sync(
            url or "", name="pkg-clients-budget", socket_timeout=1.0, socket_connect_timeout=1.0
        )
        self._owns_client = client is None
        self.namespace = namespace
        self.sync_interval = sync_interval
        self._script = self.client.register_script(SYNC_LUA)
        self._links: list[_SharedBudget] = []
        self._links_lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._failing = False
        self._thread = threading.Thread(
            target=self._run, name="pkg-clients-shared-budget", daemon=True
        )
        self._thread.start()

    def attach(self, target: str, budget: RetryBudget) -> None:
        """Link ``budget`` (of ``target``) to its shared bucket; adopts its level at once."""
        link = _SharedBudget(self, budget, f"{self.namespace}:{target}")
        budget.shared = link
        with self._links_lock:
            self._links.append(link)
        try:
            link.sync(self.client, self._script)
        except Exception as exc:
            _log.warning("shared_budget_initial_sync_failed", target=target, error=str(exc))

    def wake(self) -> None:
        """Sync now instead of at the next interval."""
        self._wake.set()

    def sync_now(self) -> None:
        """Run one sync of every budget in the calling thread (tests, shutdown)."""
        with self._links_lock:
            links = list(self._links)
        for link in links:
            link.sync(self.client, self._script)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.sync_interval)
            self._wake.clear()
            if self._stop.is_set():
                break
            try:
                self.sync_now()
                if self._failing:
                    _log.info("shared_budget_redis_back", namespace=self.namespace)
                    self._failing = False
            except Exception as exc:
                if not self._failing:
                    _log.warning(
                        "shared_budget_redis_down_local_fallback",
                        namespace=self.namespace,
                        error=str(exc),
                    )
                    self._failing = True
                self._stop.wait(self.sync_interval)

    def close(self) -> None:
        """Stop the sync thread (after a last sync); close Redis if this store opened it."""
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=2)
        try:
            self.sync_now()
        except Exception:
            pass  # Redis gone: the counts of the last moments are lost, nothing else
        if self._owns_client:
            self.client.close()
