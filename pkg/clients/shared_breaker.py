"""Breaker state shared through Redis, so all replicas of a caller open and close together.

Each process keeps its breakers local for the call path (no Redis round trip per call). A
background thread syncs every ``sync_interval`` seconds (and at once after a probe ends): one
Lua script per breaker adds this process's outcomes since the last sync to a shared sliding
window, applies the transition rules atomically on Redis time, grants the single half-open
probe to exactly one process, and returns the shared state, which the local breaker adopts.
pybreaker's own Redis storage does several non-atomic round trips per call; this does one
atomic script per breaker per interval.

If Redis is unreachable the breakers fall back to their local windows (logged once) and
rejoin the shared state when it comes back.
"""

from __future__ import annotations

import threading
import uuid
import weakref
from typing import Any

import redis

from pkg.clients.breaker import (
    BREAKER_FAILURE,
    BREAKER_IGNORE,
    BREAKER_SUCCESS,
    STATE_CLOSED,
    STATE_HALF_OPEN,
    STATE_OPEN,
    TICKET_PROBE,
    CircuitBreaker,
)
from pkg.clients.log import get_logger
from pkg.common import redisconn

_log = get_logger("pkg.clients.shared_breaker")

# KEYS[1]: breaker hash. ARGV: owner, successes, failures, probe_result (0 none, 1 success,
# 2 failure, 3 released), want_probe, window_ms, buckets, min_calls, ratio, open_ms,
# probe_ttl_ms, grant_ttl_ms, probe_started, slow (outcomes slower than the breaker's
# slow_call_duration), slow_ratio (0: no slow-call rule). Returns {state, ms until the open
# state ends, 1 if owner holds the probe}.
SYNC_LUA = """
local key = KEYS[1]
local owner = ARGV[1]
local succ = tonumber(ARGV[2])
local fail = tonumber(ARGV[3])
local probe_result = tonumber(ARGV[4])
local want_probe = tonumber(ARGV[5])
local window_ms = tonumber(ARGV[6])
local buckets = tonumber(ARGV[7])
local min_calls = tonumber(ARGV[8])
local ratio = tonumber(ARGV[9])
local open_ms = tonumber(ARGV[10])
local probe_ttl = tonumber(ARGV[11])
local grant_ttl = tonumber(ARGV[12])
local probe_started = tonumber(ARGV[13])
local slow = tonumber(ARGV[14])
local slow_ratio = tonumber(ARGV[15])

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local state = redis.call('HGET', key, 'state') or 'closed'
local open_until = tonumber(redis.call('HGET', key, 'open_until') or '0')
local probe_owner = redis.call('HGET', key, 'probe_owner') or ''
local probe_until = tonumber(redis.call('HGET', key, 'probe_until') or '0')

local function clear_window()
  local fields = redis.call('HKEYS', key)
  for _, f in ipairs(fields) do
    local p = string.sub(f, 1, 2)
    if p == 's:' or p == 'f:' or p == 'w:' then redis.call('HDEL', key, f) end
  end
end

if probe_result > 0 and probe_owner == owner then
  if probe_result == 1 and state == 'half-open' then
    state = 'closed'
    clear_window()
  elseif probe_result == 2 and state == 'half-open' then
    state = 'open'
    open_until = now + open_ms
  end
  probe_owner = ''
  probe_until = 0
end

if state == 'closed' and (succ > 0 or fail > 0) then
  local width = window_ms / buckets
  local epoch = math.floor(now / width)
  if succ > 0 then redis.call('HINCRBY', key, 's:' .. epoch, succ) end
  if fail > 0 then redis.call('HINCRBY', key, 'f:' .. epoch, fail) end
  if slow > 0 then redis.call('HINCRBY', key, 'w:' .. epoch, slow) end
  local total_s, total_f, total_w = 0, 0, 0
  local fields = redis.call('HGETALL', key)
  for i = 1, #fields, 2 do
    local f = fields[i]
    local p = string.sub(f, 1, 2)
    if p == 's:' or p == 'f:' or p == 'w:' then
      local e = tonumber(string.sub(f, 3))
      if e <= epoch - buckets then
        redis.call('HDEL', key, f)
      elseif p == 's:' then
        total_s = total_s + tonumber(fields[i + 1])
      elseif p == 'f:' then
        total_f = total_f + tonumber(fields[i + 1])
      else
        total_w = total_w + tonumber(fields[i + 1])
      end
    end
  end
  local total = total_s + total_f
  local too_many_failures = fail > 0 and total_f >= ratio * total
  local too_many_slow = slow > 0 and slow_ratio > 0 and total_w >= slow_ratio * total
  if total >= min_calls and (too_many_failures or too_many_slow) then
    state = 'open'
    open_until = now + open_ms
    clear_window()
  end
end

if state == 'open' and now >= open_until then
  state = 'half-open'
end
if state == 'half-open' and probe_started == 1 and probe_owner == owner then
  probe_until = now + probe_ttl
end
if state == 'half-open' and want_probe == 1 then
  if probe_owner == '' or now >= probe_until then
    -- A grant not used within grant_ttl goes to the next process that asks.
    probe_owner = owner
    probe_until = now + grant_ttl
  end
end

redis.call('HSET', key, 'state', state, 'open_until', open_until,
           'probe_owner', probe_owner, 'probe_until', probe_until)
redis.call('PEXPIRE', key, window_ms + open_ms + probe_ttl + 60000)
local mine = 0
if state == 'half-open' and probe_owner == owner then mine = 1 end
return {state, math.max(0, open_until - now), mine}
"""


class _SharedState:
    """The link between one local breaker and its shared Redis state."""

    def __init__(self, store: SharedBreakerStore, breaker: CircuitBreaker) -> None:
        self.store = store
        self.breaker_ref = weakref.ref(breaker)
        self.key = f"{store.namespace}:{breaker.name}"
        self.lock = threading.Lock()
        self.successes = 0
        self.failures = 0
        self.slow = 0
        self.probe_result = 0
        self.want_probe = False
        self.granted = False
        self.started = False
        self.healthy = False  # True once a sync succeeded; False: the local window decides

    # Called on the call path: counters only, under a tiny lock.
    def note(self, ticket: int, outcome: int, slow: bool = False) -> None:
        with self.lock:
            if ticket == TICKET_PROBE:
                if slow and outcome == BREAKER_SUCCESS:
                    outcome = BREAKER_FAILURE  # a slow probe re-opens, as it does locally
                self.probe_result = {BREAKER_SUCCESS: 1, BREAKER_FAILURE: 2}.get(outcome, 3)
                self.granted = False
                self.want_probe = False
            else:
                if outcome == BREAKER_SUCCESS:
                    self.successes += 1
                elif outcome == BREAKER_FAILURE:
                    self.failures += 1
                if slow and outcome != BREAKER_IGNORE:
                    self.slow += 1
        if ticket == TICKET_PROBE or outcome == BREAKER_FAILURE or slow:
            self.store.wake()

    def wants_probe(self) -> bool:
        if not self.healthy:
            return True  # Redis unreachable: local single-probe rule applies
        with self.lock:
            granted = self.granted
            if granted:
                self.started = True  # the next sync extends the grant to probe_timeout
            else:
                self.want_probe = True
        self.store.wake()
        return granted

    def released(self) -> None:
        """A local probe ended without outcome (cancelled): give the shared slot back."""
        with self.lock:
            self.probe_result = 3
            self.granted = False
        self.store.wake()

    def sync(self, client: redis.Redis, script: Any) -> None:
        breaker = self.breaker_ref()
        if breaker is None:
            return
        # Read before the counts: a probe that ends after this is not in them, and the shared
        # state returned must not override what it decided (see CircuitBreaker.record).
        probes_seen = breaker.probe_outcomes
        with self.lock:
            successes, failures, probe_result = self.successes, self.failures, self.probe_result
            slow = self.slow
            want = self.want_probe
            started = self.started
            self.started = False
            self.successes = self.failures = self.probe_result = self.slow = 0
        policy = breaker.policy
        try:
            state, open_ms, mine = script(
                keys=[self.key],
                args=[
                    self.store.owner,
                    successes,
                    failures,
                    probe_result,
                    1 if want else 0,
                    int(policy.window * 1000),
                    policy.buckets,
                    policy.min_calls,
                    policy.failure_ratio,
                    int(policy.open_duration * 1000),
                    int(policy.probe_timeout * 1000),
                    int(self.store.grant_ttl * 1000),
                    1 if started else 0,
                    slow,
                    policy.slow_call_ratio if policy.slow_call_duration is not None else 0,
                ],
            )
        except Exception:
            with self.lock:  # put the counts back for the next try
                self.successes += successes
                self.failures += failures
                self.slow += slow
                if probe_result and not self.probe_result:
                    self.probe_result = probe_result
            raise
        state = state.decode() if isinstance(state, bytes) else str(state)
        with self.lock:
            self.granted = bool(int(mine))
            if self.granted:
                self.want_probe = False
        self.healthy = True
        self._adopt(breaker, state, int(open_ms) / 1000.0, probes_seen)

    def _adopt(
        self, breaker: CircuitBreaker, state: str, open_left: float, probes_seen: int
    ) -> None:
        local = breaker.state
        if state == STATE_OPEN and (local != STATE_OPEN):
            breaker.force(
                STATE_OPEN,
                open_for=open_left,
                reason="shared state (redis): open",
                unless_probed_since=probes_seen,
            )
        elif state == STATE_CLOSED and local != STATE_CLOSED:
            breaker.force(
                STATE_CLOSED,
                reason="shared state (redis): closed",
                unless_probed_since=probes_seen,
            )
        elif state == STATE_HALF_OPEN and local == STATE_CLOSED:
            # Another replica is probing: stop sending here until it reports.
            breaker.force(
                STATE_OPEN,
                open_for=0.0,
                reason="shared state (redis): half-open",
                unless_probed_since=probes_seen,
            )


class SharedBreakerStore:
    """Shares the state of every breaker of a ``Runtime`` through one Redis.

    ``Runtime(shared_breakers=SharedBreakerStore("redis://127.0.0.1:6379/0"))``; breakers
    with the same name (the target, plus the method when per-method) in every process using
    the same Redis and ``namespace`` act as one. Call ``close()`` on shutdown.
    """

    def __init__(
        self,
        url: str | None = None,
        *,
        client: redis.Redis | None = None,
        namespace: str = "pkg-clients:breaker",
        sync_interval: float = 0.2,
    ) -> None:
        if (url is None) == (client is None):
            raise ValueError("SharedBreakerStore needs exactly one of url= or client=")
        if not (isinstance(sync_interval, int | float) and 0.01 <= sync_interval <= 60):
            raise ValueError(f"sync_interval must be in 0.01..60 seconds, got {sync_interval!r}")
        if not namespace or not isinstance(namespace, str):
            raise ValueError("namespace must be a non-empty string")
        # ``url``: a plain Redis URL or a ``redis+sentinel://`` spec (pkg.common.redisconn).
        self.client: redis.Redis = client or redisconn.connect_sync(
            url or "", name="pkg-clients-breaker", socket_timeout=1.0, socket_connect_timeout=1.0
        )
        self._owns_client = client is None  # a client the caller passed in is the caller's
        self.namespace = namespace
        self.sync_interval = sync_interval
        # A granted probe slot that this process does not use within this time is given to
        # another process (its caller asked, was turned away, and may never call again).
        self.grant_ttl = max(1.0, 5 * sync_interval)
        self.owner = uuid.uuid4().hex
        self._script = self.client.register_script(SYNC_LUA)
        self._links: list[_SharedState] = []
        self._links_lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._failing = False
        self._thread = threading.Thread(
            target=self._run, name="pkg-clients-shared-breaker", daemon=True
        )
        self._thread.start()

    def attach(self, breaker: CircuitBreaker) -> None:
        """Link ``breaker`` to its shared state (called by ``Runtime`` for new breakers)."""
        link = _SharedState(self, breaker)
        breaker.shared = link
        with self._links_lock:
            self._links.append(link)
        # Adopt the shared state before the first call goes out (one round trip, once per
        # breaker): a replica that starts while the others hold the breaker open stays out.
        try:
            link.sync(self.client, self._script)
        except Exception as exc:
            _log.warning("shared_breaker_initial_sync_failed", breaker=breaker.name, error=str(exc))
        self.wake()

    def wake(self) -> None:
        """Sync now instead of at the next interval."""
        self._wake.set()

    def sync_now(self) -> None:
        """Run one sync of every breaker in the calling thread (tests, shutdown)."""
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
                    _log.info("shared_breaker_redis_back", namespace=self.namespace)
                    self._failing = False
            except Exception as exc:
                with self._links_lock:
                    for link in self._links:
                        link.healthy = False
                if not self._failing:
                    _log.warning(
                        "shared_breaker_redis_down_local_fallback",
                        namespace=self.namespace,
                        error=str(exc),
                    )
                    self._failing = True
                self._stop.wait(self.sync_interval)

    def close(self) -> None:
        """Stop the sync thread; close the Redis connection if this store opened it (url=)."""
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=2)
        if self._owns_client:
            self.client.close()
