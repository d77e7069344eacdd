"""The one way the platform connects to Redis: a plain URL or a Sentinel-managed primary.

``connect(spec)`` takes either

- ``redis://[[user]:password@]host:port[/db]`` / ``rediss://...`` (one server, as today), or
- ``redis+sentinel://[[user]:password@]h1:p1,h2:p2/mastername[/db][?options]``
  (``rediss+sentinel://`` for TLS): the primary of ``mastername`` as the Sentinels report it.
  Options: ``db``, ``sentinel_password``, ``sentinel_username``, ``ssl`` (``true``: TLS to the
  primary and to the Sentinels), ``ssl_ca_certs``, ``ssl_certfile``, ``ssl_keyfile``,
  ``ssl_cert_reqs`` (``required``/``optional``/``none``). The userinfo authenticates to the
  primary; Sentinels get their own credentials (often none).

and returns a ``redis.asyncio.Redis`` (``connect_sync``: a ``redis.Redis``) whose behaviour the
caller configures as before (timeouts, retries, decoding, a bounded pool, hiredis packing).

With Sentinel the pool is redis-py's ``SentinelConnectionPool``: every new connection asks the
Sentinels for the current primary, so a connection error after a failover reconnects to the
promoted replica; a connection still talking to a demoted primary gets READONLY and reconnects.
On top of that:

- **Failover epoch per connection** (``ERA_KEY``): a new connection to the primary records, in
  the same step as it learns the primary's address, the Sentinels' ``config-epoch`` of that
  primary (an epoch the Sentinel quorum agreed on, higher for every promotion). Its first
  command registers ``replid|epoch`` on the primary (``master_replid`` changes on promotion),
  refused when this primary is new and the epoch is not above the last recorded one (a stale
  Sentinel answer: the connection is dropped and discovery runs again). Fencing scripts
  (``pkg.coord``) read that record to issue tokens above everything an earlier primary issued,
  even when the promoted replica lacked the last increments: see docs/rfcs/foghorn-ha.md,
  "Fencing across a failover".
- **+switch-master**: a watcher subscribed to the Sentinels drops every connection of the old
  primary as soon as they announce the switch (a paused, "zombie" primary would otherwise keep
  connections that only time out).
- **Counters** per client (``stats``), also exported as metrics: connections opened, reconnects,
  failovers seen, NOSCRIPT replies (redis-py's ``Script`` reloads the script and retries).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import ssl as ssl_module
import threading
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import hiredis
import redis
import redis.asyncio as aioredis
import redis.sentinel as sync_sentinel
import structlog
from opentelemetry import metrics
from opentelemetry.metrics import CallbackOptions, Observation
from redis.asyncio import sentinel as async_sentinel
from redis.asyncio.connection import RedisSSLContext
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ResponseError

log = structlog.get_logger("pkg.common.redisconn")

SENTINEL_SCHEMES = ("redis+sentinel", "rediss+sentinel")
PLAIN_SCHEMES = ("redis", "rediss", "unix")

# The record of the current primary's failover epoch, ``<replid>|<epoch>``. One per Redis
# deployment (not per service: it describes the server's lineage, which every user shares).
ERA_KEY = "coord:{era}"

# Registers the connection's epoch: KEYS[1] = ERA_KEY, ARGV[1] = the epoch the Sentinels gave
# with this primary's address. Same replid as recorded: this primary's epoch is known already
# (never raised by a client: a connection to a zombie primary may carry a newer epoch it
# learnt for another server). New replid (this server became primary since the record was
# written, or there is none): the epoch must not be below the recorded one, else the caller's
# Sentinel answer was stale. An equal epoch is the same primary restarted (Sentinel promotes at
# most one server per epoch), whose new replid is recorded.
_REGISTER_ERA = """
local info = redis.call('INFO', 'replication')
local role = string.match(info, 'role:(%a+)')
if role ~= 'master' then
  return redis.error_reply('READONLY the server is not the primary (role ' .. tostring(role) .. ')')
end
local replid = string.match(info, 'master_replid:(%x+)')
local epoch = tonumber(ARGV[1])
local rec = redis.call('GET', KEYS[1])
if rec then
  local rid, ep = string.match(rec, '^(%x+)|(%d+)$')
  if rid == replid then return tonumber(ep) end
  if ep and epoch < tonumber(ep) then
    return redis.error_reply('ERA stale failover epoch ' .. epoch .. ' < recorded ' .. ep)
  end
end
redis.call('SET', KEYS[1], replid .. '|' .. epoch)
return epoch
"""


class SpecError(ValueError):
    """A Redis URL or Sentinel spec that cannot be used (the message says what is wrong)."""


@dataclass(frozen=True)
class RedisSpec:
    """A parsed connection spec (see the module docstring for the syntax)."""

    url: str | None = None  # plain: the URL as given
    sentinels: tuple[tuple[str, int], ...] = ()
    service: str = ""
    username: str | None = None
    password: str | None = None
    db: int = 0
    ssl: bool = False
    ssl_options: tuple[tuple[str, str], ...] = ()
    sentinel_username: str | None = None
    sentinel_password: str | None = None

    @property
    def is_sentinel(self) -> bool:
        return bool(self.sentinels)

    def describe(self) -> str:
        """The spec without credentials (for logs and health pages)."""
        if not self.is_sentinel:
            parts = urlsplit(self.url or "")
            host = parts.hostname or ""
            port = f":{parts.port}" if parts.port else ""
            return f"{parts.scheme}://{host}{port}{parts.path}"
        hosts = ",".join(f"{h}:{p}" for h, p in self.sentinels)
        scheme = "rediss+sentinel" if self.ssl else "redis+sentinel"
        return f"{scheme}://{hosts}/{self.service}/{self.db}"


_SSL_OPTIONS = ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile", "ssl_cert_reqs")
_OPTIONS = {"db", "ssl", "sentinel_password", "sentinel_username", *_SSL_OPTIONS}


def parse_spec(text: str) -> RedisSpec:
    """Parse a plain Redis URL or a ``redis+sentinel://`` spec; raises ``SpecError``."""
    if not isinstance(text, str) or not text.strip():
        raise SpecError("empty Redis URL")
    text = text.strip()
    scheme = text.split("://", 1)[0].lower() if "://" in text else ""
    if scheme in PLAIN_SCHEMES:
        return RedisSpec(url=text)
    if scheme not in SENTINEL_SCHEMES:
        raise SpecError(
            f"Redis URL scheme {scheme or '(none)'!r} not supported: use redis://, rediss:// "
            "or redis+sentinel://h1:p1,h2:p2/mastername"
        )
    rest = text.split("://", 1)[1]
    userinfo, _, hostpart = rest.rpartition("@")
    hostlist, _, pathquery = hostpart.partition("/")
    path, _, query = pathquery.partition("?")
    sentinels = []
    for item in hostlist.split(","):
        host, sep, port = item.strip().rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise SpecError(f"Sentinel address {item!r} is not host:port")
        sentinels.append((host.strip("[]"), int(port)))
    segments = [s for s in path.split("/") if s]
    if not segments:
        raise SpecError("Sentinel spec without the master name: redis+sentinel://h:p/mastername")
    service = unquote(segments[0])
    options = {k: v[-1] for k, v in parse_qs(query, keep_blank_values=True).items()}
    unknown = sorted(set(options) - _OPTIONS)
    if unknown:
        raise SpecError(f"unknown Sentinel spec option(s) {unknown}; known: {sorted(_OPTIONS)}")
    db_text = segments[1] if len(segments) > 1 else options.get("db", "0")
    if not db_text.isdigit():
        raise SpecError(f"database {db_text!r} is not a number")
    username, password = None, None
    if userinfo:
        user, sep, pw = userinfo.partition(":")
        username = unquote(user) or None if sep else None
        password = unquote(pw) if sep else unquote(user)
    ssl_flag = scheme == "rediss+sentinel" or options.get("ssl", "").lower() in ("1", "true")
    return RedisSpec(
        sentinels=tuple(sentinels),
        service=service,
        username=username,
        password=password or None,
        db=int(db_text),
        ssl=ssl_flag,
        ssl_options=tuple((k, options[k]) for k in _SSL_OPTIONS if k in options),
        sentinel_username=options.get("sentinel_username") or None,
        sentinel_password=options.get("sentinel_password") or None,
    )


# -- statistics -------------------------------------------------------------------------------
@dataclass(eq=False)
class ConnStats:
    """What one client's connections went through (shown in health, exported as metrics)."""

    name: str
    spec: str
    connects: int = 0
    reconnects: int = 0
    failovers: int = 0
    noscript: int = 0
    stale_epoch_refusals: int = 0
    primary: str = ""
    epoch: int = 0
    connections: weakref.WeakSet[Any] = field(default_factory=weakref.WeakSet, repr=False)

    def opened(self, conn: Any, primary: str) -> None:
        self.connects += 1
        if self.connects > 1:
            self.reconnects += 1
        if self.primary and primary != self.primary:
            self.failovers += 1
            log.warning("redis_primary_changed", client=self.name, old=self.primary, new=primary)
        self.primary = primary
        self.connections.add(conn)

    def as_dict(self) -> dict[str, Any]:
        return {
            "spec": self.spec,
            "primary": self.primary,
            "failover_epoch": self.epoch,
            "connects": self.connects,
            "reconnects": self.reconnects,
            "failovers": self.failovers,
            "noscript_reloads": self.noscript,
            "stale_epoch_refusals": self.stale_epoch_refusals,
        }


_ALL_STATS: weakref.WeakSet[ConnStats] = weakref.WeakSet()
_stats_lock = threading.Lock()
_meter = metrics.get_meter("pkg.common.redisconn")


def _observe(attr: str) -> Callable[[CallbackOptions], list[Observation]]:
    def observe(_options: CallbackOptions) -> list[Observation]:
        with _stats_lock:
            items = list(_ALL_STATS)
        totals: dict[str, int] = {}
        for s in items:
            totals[s.name] = totals.get(s.name, 0) + int(getattr(s, attr))
        return [Observation(v, {"client": k}) for k, v in totals.items()]

    return observe


_meter.create_observable_counter(
    "redis_client_reconnects",
    callbacks=[_observe("reconnects")],
    unit="1",
    description="Redis connections opened after the first one, per client",
)
_meter.create_observable_counter(
    "redis_client_failovers",
    callbacks=[_observe("failovers")],
    unit="1",
    description="changes of the Redis primary seen by a client (Sentinel failovers)",
)
_meter.create_observable_counter(
    "redis_client_noscript_reloads",
    callbacks=[_observe("noscript")],
    unit="1",
    description="NOSCRIPT replies (script cache empty after a failover or restart; reloaded)",
)


def _new_stats(name: str, spec: RedisSpec) -> ConnStats:
    stats = ConnStats(name=name, spec=spec.describe())
    with _stats_lock:
        _ALL_STATS.add(stats)
    return stats


def is_sentinel(client: Any) -> bool:
    """Whether ``client`` reaches a Sentinel-managed primary (a primary with replicas)."""
    return isinstance(
        getattr(client, "connection_pool", None), async_sentinel.SentinelConnectionPool
    )


def stats(client: Any) -> ConnStats | None:
    """The counters of a client made by ``connect`` / ``connect_sync`` (None otherwise)."""
    pool = getattr(client, "connection_pool", None)
    found = getattr(pool, "conn_stats", None)
    return found if isinstance(found, ConnStats) else None


# -- connections --------------------------------------------------------------------------------
class _HiredisPacking:
    """redis-py's asyncio connection packs commands in pure Python (about 4 us per argument);
    hiredis' C packer does it for us. Anything hiredis refuses falls back to redis-py's."""

    def pack_command(self, *args: Any) -> list[bytes]:
        first = args[0]
        if isinstance(first, str):
            head: tuple[Any, ...] = tuple(first.encode().split())
            args = head + args[1:]
        try:
            return [hiredis.pack_command(args)]
        except TypeError:
            return super().pack_command(*args)  # type: ignore[misc, no-any-return]


class _Counted(aioredis.Connection):
    """A plain connection that counts its (re)connects and NOSCRIPT replies."""

    conn_stats: ConnStats | None = None

    async def on_connect_check_health(self, check_health: bool = True) -> None:
        await super().on_connect_check_health(check_health=check_health)
        if self.conn_stats is not None:
            self.conn_stats.opened(self, f"{self.host}:{self.port}")

    async def read_response(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return await super().read_response(*args, **kwargs)
        except NoScriptError:
            if self.conn_stats is not None:
                self.conn_stats.noscript += 1
            raise


class _PackedCounted(_HiredisPacking, _Counted):
    pass


# -- TLS contexts shared by connections ---------------------------------------------------------
def _file_signature(path: str | None) -> tuple[int, int, int] | None:
    if not path:
        return None
    try:
        st = os.stat(path)
    except OSError:
        return None  # building the context raises the real error
    return (st.st_mtime_ns, st.st_size, st.st_ino)


def _hashable(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


_CONTEXTS: dict[tuple[Any, ...], tuple[tuple[Any, ...], ssl_module.SSLContext]] = {}
_CONTEXTS_LOCK = threading.Lock()


class _SharedSSLContext(RedisSSLContext):
    """One ``SSLContext`` for every connection with the same TLS options, instead of redis-py's
    one per connection: its ``ssl.create_default_context()`` reads the system's CA store, about
    30 ms of CPU on the event loop for each connection a pool opens (27% of a Bridge replica's
    CPU while its pool grew in the bridge-kill drill over TLS, stalling every request it held).
    The shared context is built again when a certificate, key or CA file changes, so new
    connections present a rotated certificate as before. Trust is redis-py's: the system's CAs
    plus ``ssl_ca_certs``."""

    __slots__ = ()

    def get(self) -> ssl_module.SSLContext:
        key = tuple(
            _hashable(getattr(self, name))
            for name in RedisSSLContext.__slots__
            if name != "context"
        )
        files = tuple(_file_signature(p) for p in (self.certfile, self.keyfile, self.ca_certs))
        with _CONTEXTS_LOCK:
            cached = _CONTEXTS.get(key)
        if cached is not None and cached[0] == files:
            return cached[1]
        self.context = None  # build from the files as they are now
        context = super().get()
        with _CONTEXTS_LOCK:
            _CONTEXTS[key] = (files, context)
        return context


class _SharedContextSSL(aioredis.SSLConnection):
    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        own = self.ssl_context
        shared = _SharedSSLContext.__new__(_SharedSSLContext)
        for name in RedisSSLContext.__slots__:
            setattr(shared, name, getattr(own, name))
        self.ssl_context = shared


# rediss:// (TLS): the same counting and C packing over redis-py's SSL connection, whose options
# (ssl_ca_certs, ssl_certfile, ssl_keyfile, ssl_cert_reqs) come from the URL's query string.
class _CountedSSL(_Counted, _SharedContextSSL):
    pass


class _PackedCountedSSL(_HiredisPacking, _CountedSSL):
    pass


class _SentinelConn(async_sentinel.SentinelManagedConnection):
    """A connection to the primary that knows the failover epoch it was discovered with and
    registers it on the primary before any other command (see ``_REGISTER_ERA``)."""

    conn_stats: ConnStats | None = None
    failover_epoch: int = 0

    async def _connect_retry(self) -> None:
        if self._reader:
            return
        if not self.connection_pool.is_master:  # (only the primary is used by the platform)
            await super()._connect_retry()  # type: ignore[no-untyped-call]
            return
        await self.connect_check_health(retry_socket_connect=False)

    async def connect_check_health(
        self, check_health: bool = True, retry_socket_connect: bool = True
    ) -> None:
        # Every way to connect comes here (a pooled connection through connect(), a raw one
        # made by the pool for a tail on its first send_command): ask the Sentinels first.
        if self.is_connected:
            return
        if self.connection_pool.is_master:
            address, epoch = await self.connection_pool.discover_primary()
            self.failover_epoch = epoch
            self.host, self.port = address
        await super().connect_check_health(
            check_health=check_health, retry_socket_connect=retry_socket_connect
        )

    async def on_connect_check_health(self, check_health: bool = True) -> None:
        await super().on_connect_check_health(check_health=check_health)
        # A refusal (stale epoch, or a demoted primary: READONLY) surfaces from read_response
        # as a connection error: the connection is dropped and the next attempt asks the
        # Sentinels again.
        await self.send_command("EVAL", _REGISTER_ERA, 1, ERA_KEY, str(self.failover_epoch))
        await self.read_response()
        if self.conn_stats is not None:
            self.conn_stats.epoch = max(self.conn_stats.epoch, self.failover_epoch)
            self.conn_stats.opened(self, f"{self.host}:{self.port}")

    async def read_response(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return await super().read_response(*args, **kwargs)
        except NoScriptError:
            if self.conn_stats is not None:
                self.conn_stats.noscript += 1
            raise
        except ResponseError as exc:
            if str(exc).startswith("ERA"):
                if self.conn_stats is not None:
                    self.conn_stats.stale_epoch_refusals += 1
                # A fencing script found this primary's epoch record missing or from another
                # primary: this connection's view is stale, reconnect through the Sentinels.
                await self.disconnect()
                raise RedisConnectionError(f"failover epoch changed: {exc}") from exc
            raise


class _PackedSentinelConn(_HiredisPacking, _SentinelConn):
    pass


class _SentinelPoolMixin:
    """Discovery that returns the primary's address *and* its failover epoch from one Sentinel
    reply, and a watcher that drops the old primary's connections on ``+switch-master``."""

    service_name: str
    sentinel_manager: Any
    conn_stats: ConnStats
    master_address: Any
    watch_kwargs: dict[str, Any]
    _watcher: asyncio.Task[None] | None = None

    async def discover_primary(self) -> tuple[tuple[str, int], int]:
        address, epoch = await _discover(self.sentinel_manager, self.service_name)
        if self.master_address != address:
            self.master_address = address
            await self.disconnect(inuse_connections=False)  # type: ignore[attr-defined]
        self._ensure_watcher()
        return address, epoch

    def _ensure_watcher(self) -> None:
        if self._watcher is None or self._watcher.done():
            with contextlib.suppress(RuntimeError):  # no running loop: nothing to watch from
                self._watcher = asyncio.get_running_loop().create_task(
                    self._watch(), name=f"redis-sentinel-watch:{self.service_name}"
                )

    async def _watch(self) -> None:
        """Follow ``+switch-master`` on the Sentinels (one at a time, rotating on errors)."""
        addresses = [
            (
                s.connection_pool.connection_kwargs["host"],
                s.connection_pool.connection_kwargs["port"],
            )
            for s in self.sentinel_manager.sentinels
        ]
        i = 0
        while True:
            host, port = addresses[i % len(addresses)]
            i += 1
            # A client of its own without a read timeout: the subscription is silent until a
            # failover, and the Sentinel clients' short timeouts would end it every second.
            sentinel = aioredis.Redis(host=host, port=port, **self.watch_kwargs)
            pubsub = sentinel.pubsub()
            try:
                await pubsub.subscribe("+switch-master")
                async for message in pubsub.listen():
                    if message.get("type") != "message":
                        continue
                    data = message["data"]
                    text = data.decode() if isinstance(data, bytes) else str(data)
                    name = text.split(" ", 1)[0]
                    if name != self.service_name:
                        continue
                    log.warning("redis_switch_master", service=name, change=text)
                    await self._drop_all()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a Sentinel down: try the next one after a pause
                log.debug("sentinel_watch_failed", error=repr(exc)[:200])
                await asyncio.sleep(0.5)
            finally:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]
                with contextlib.suppress(Exception):
                    await sentinel.aclose()

    async def _drop_all(self) -> None:
        self.master_address = None
        for conn in list(self.conn_stats.connections):
            with contextlib.suppress(Exception):
                await conn.disconnect()
        with contextlib.suppress(Exception):
            await self.disconnect(inuse_connections=True)  # type: ignore[attr-defined]

    async def close_watcher(self) -> None:
        task, self._watcher = self._watcher, None
        if task is not None:
            task.cancel()
            # asyncio.wait: neither the watcher's cancellation nor its errors surface here, and
            # a cancellation of the caller itself is not swallowed (suppressing CancelledError
            # around ``await task`` would swallow it too); bounded, the watcher only closes
            # sockets on its way out.
            await asyncio.wait({task}, timeout=5.0)


class _SentinelPool(_SentinelPoolMixin, async_sentinel.SentinelConnectionPool):
    pass


class _BlockingSentinelPool(
    _SentinelPoolMixin, async_sentinel.SentinelConnectionPool, aioredis.BlockingConnectionPool
):
    pass


async def _discover(manager: Any, service: str) -> tuple[tuple[str, int], int]:
    """Ask every Sentinel (at once) for the primary's address and config epoch and take the
    answer with the highest epoch among those that see a healthy primary.

    The first answer is not enough: right after a failover a Sentinel that has not yet heard of
    it still names the old primary, and a paused old primary that wakes up looks healthy to it
    (seen in redis-zombie-primary: a connection went back to the woken old primary and its
    writes were refused with NOREPLICAS). The Sentinel that ran the failover, and every one
    that learnt of it, answers with the higher epoch."""

    async def ask(sentinel: Any) -> Any:
        return await sentinel.sentinel_masters()

    replies = await asyncio.gather(*(ask(s) for s in manager.sentinels), return_exceptions=True)
    errors, best = [], None
    for reply in replies:
        if isinstance(reply, BaseException):
            if not isinstance(
                reply, (RedisConnectionError, TimeoutError, redis.exceptions.TimeoutError)
            ):
                raise reply
            errors.append(repr(reply)[:120])
            continue
        state = reply.get(service)
        if state and manager.check_master_state(state, service):
            epoch = int(state.get("config-epoch", 0))
            if best is None or epoch > best[1]:
                best = ((state["ip"], int(state["port"])), epoch)
    if best is None:
        raise async_sentinel.MasterNotFoundError(f"no primary found for {service!r}: {errors}")
    return best


class _ClientWithWatcher(aioredis.Redis):
    """Closing the client also stops the pool's Sentinel watcher."""

    async def aclose(self, close_connection_pool: bool | None = None) -> None:
        pool = self.connection_pool
        if isinstance(pool, _SentinelPoolMixin):
            await pool.close_watcher()
        await super().aclose(close_connection_pool)


def _ssl_kwargs(spec: RedisSpec) -> dict[str, Any]:
    if not spec.ssl:
        return {}
    out: dict[str, Any] = {"ssl": True}
    for key, value in spec.ssl_options:
        out[key] = value
    if "ssl_cert_reqs" in out:
        reqs = {
            "required": ssl_module.CERT_REQUIRED,
            "optional": ssl_module.CERT_OPTIONAL,
            "none": ssl_module.CERT_NONE,
        }
        if out["ssl_cert_reqs"] not in reqs:
            raise SpecError("ssl_cert_reqs must be required, optional or none")
        out["ssl_cert_reqs"] = reqs[out["ssl_cert_reqs"]]
    return out


def connect(
    spec: str | RedisSpec,
    *,
    name: str = "redis",
    max_connections: int | None = None,
    blocking_timeout: float | None = None,
    hiredis_packing: bool = False,
    **kwargs: Any,
) -> aioredis.Redis:
    """An asyncio client for ``spec`` (plain URL or Sentinel spec).

    ``kwargs`` are redis-py connection options (``decode_responses``, ``socket_timeout``,
    ``socket_connect_timeout``, ``retry``, ``health_check_interval`` ...). ``max_connections``
    with ``blocking_timeout`` makes the pool bounded and blocking (callers queue for a
    connection); ``hiredis_packing`` packs commands in C. ``name`` labels the counters.
    """
    parsed = spec if isinstance(spec, RedisSpec) else parse_spec(spec)
    conn_stats = _new_stats(name, parsed)
    if not parsed.is_sentinel:
        url = parsed.url or ""
        if url.startswith("rediss"):
            base_plain: type[_Counted] = _PackedCountedSSL if hiredis_packing else _CountedSSL
        else:
            base_plain = _PackedCounted if hiredis_packing else _Counted
        conn_class: type[Any] = type(
            f"{base_plain.__name__}_{name}", (base_plain,), {"conn_stats": conn_stats}
        )
        plain_pool: aioredis.ConnectionPool
        if max_connections is not None and blocking_timeout is not None:
            plain_pool = aioredis.BlockingConnectionPool.from_url(
                url,
                max_connections=max_connections,
                timeout=blocking_timeout,
                connection_class=conn_class,
                **kwargs,
            )
        else:
            plain_pool = aioredis.ConnectionPool.from_url(
                url,
                connection_class=conn_class,
                **({"max_connections": max_connections} if max_connections else {}),
                **kwargs,
            )
        # A rediss:// URL makes from_url pick redis-py's plain SSLConnection over the class
        # given: keep ours (the same SSL connection, counted, with the C packer).
        plain_pool.connection_class = conn_class
        plain_pool.conn_stats = conn_stats  # type: ignore[attr-defined]
        return aioredis.Redis(connection_pool=plain_pool)
    ssl_kwargs = _ssl_kwargs(parsed)
    sentinel_kwargs: dict[str, Any] = {
        k: v for k, v in kwargs.items() if k in ("socket_timeout", "socket_connect_timeout")
    }
    sentinel_kwargs.setdefault("socket_timeout", 1.0)
    sentinel_kwargs.setdefault("socket_connect_timeout", 1.0)
    if parsed.sentinel_password:
        sentinel_kwargs["password"] = parsed.sentinel_password
    if parsed.sentinel_username:
        sentinel_kwargs["username"] = parsed.sentinel_username
    sentinel_kwargs.update(ssl_kwargs)
    manager = async_sentinel.Sentinel(  # type: ignore[no-untyped-call]
        list(parsed.sentinels), sentinel_kwargs=sentinel_kwargs
    )
    base: type[_SentinelConn] = _PackedSentinelConn if hiredis_packing else _SentinelConn
    if ssl_kwargs:
        base = type("_SSLSentinelConn", (base, _SharedContextSSL), {})
    conn_class_s = type(f"{base.__name__}_{name}", (base,), {"conn_stats": conn_stats})
    pool_kwargs: dict[str, Any] = {
        **kwargs,
        **{k: v for k, v in ssl_kwargs.items() if k != "ssl"},
        "connection_class": conn_class_s,
        "db": parsed.db,
        "username": parsed.username,
        "password": parsed.password,
    }
    pool: Any
    if max_connections is not None and blocking_timeout is not None:
        pool = _BlockingSentinelPool(  # type: ignore[no-untyped-call]
            parsed.service,
            manager,
            max_connections=max_connections,
            timeout=blocking_timeout,
            **pool_kwargs,
        )
    else:
        if max_connections is not None:
            pool_kwargs["max_connections"] = max_connections
        pool = _SentinelPool(  # type: ignore[no-untyped-call]
            parsed.service, manager, **pool_kwargs
        )
    pool.conn_stats = conn_stats
    pool.watch_kwargs = {
        **{k: v for k, v in sentinel_kwargs.items() if k != "socket_timeout"},
        "socket_timeout": None,
    }
    return _ClientWithWatcher(connection_pool=pool)


def connect_sync(spec: str | RedisSpec, *, name: str = "redis", **kwargs: Any) -> redis.Redis:
    """A synchronous client for ``spec`` (threads that cannot use asyncio, e.g. the shared
    breaker's sync loop). It follows failovers by re-discovering on connection errors; it
    issues no fencing tokens, so it does not register failover epochs."""
    parsed = spec if isinstance(spec, RedisSpec) else parse_spec(spec)
    if not parsed.is_sentinel:
        return redis.Redis.from_url(parsed.url or "", **kwargs)
    ssl_kwargs = _ssl_kwargs(parsed)
    sentinel_kwargs: dict[str, Any] = {
        k: v for k, v in kwargs.items() if k in ("socket_timeout", "socket_connect_timeout")
    }
    if parsed.sentinel_password:
        sentinel_kwargs["password"] = parsed.sentinel_password
    if parsed.sentinel_username:
        sentinel_kwargs["username"] = parsed.sentinel_username
    sentinel_kwargs.update(ssl_kwargs)
    manager = sync_sentinel.Sentinel(  # type: ignore[no-untyped-call]
        list(parsed.sentinels), sentinel_kwargs=sentinel_kwargs
    )
    client: redis.Redis = manager.master_for(  # type: ignore[no-untyped-call]
        parsed.service,
        db=parsed.db,
        username=parsed.username,
        password=parsed.password,
        **ssl_kwargs,
        **kwargs,
    )
    return client


def fail_waiters(waiters: Sequence[asyncio.Future[Any]], exc: BaseException) -> None:
    """Every waiter of a batched round trip that failed gets the failure: none is left hanging."""
    for done in waiters:
        if not done.done():
            done.set_exception(exc)


def settle_waiters(waiters: Sequence[asyncio.Future[Any]], replies: Sequence[Any]) -> None:
    """Hand each waiter of a batched round trip its reply (an error reply raises at its caller);
    a waiter whose caller gave up is skipped."""
    for done, reply in zip(waiters, replies, strict=True):
        if done.done():
            continue
        if isinstance(reply, Exception):
            done.set_exception(reply)
        else:
            done.set_result(reply)


async def _send(conn: Any, packed: list[bytes]) -> None:
    """``conn.send_packed_command(packed)`` without its timeout task when nothing can wait.

    redis-py runs every write in a task under ``asyncio.wait_for`` (~20 us of CPU and one more
    loop turn) so that a blocked ``drain`` times out; with nothing queued on the transport the
    write goes to the transport without waiting and ``drain`` would return at once, so the task only
    costs. Anything queued (a slow or stuck socket): redis-py's path, with its timeout.
    """
    writer = getattr(conn, "_writer", None)  # redis-py's StreamWriter (private, pinned 8.1)
    transport = getattr(writer, "transport", None)
    if writer is None or transport is None or transport.is_closing():
        await conn.send_packed_command(packed)
        return
    if transport.get_write_buffer_size() > 0:
        await conn.send_packed_command(packed)
        return
    try:
        writer.writelines(packed)
    except (OSError, RuntimeError) as exc:
        # What redis-py makes of a failed write: the connection dropped, a retryable error.
        await conn.disconnect(nowait=True)
        raise RedisConnectionError(f"Error while writing to socket: {exc!r}") from exc


class HeldConnection:
    """Commands written and read straight through one connection held from ``client``'s pool.

    For a hot path whose commands carry their own arguments (a script call per request or per
    fetched batch): redis-py's command path (the client's ``execute_command`` or a pipeline
    object: take a pooled connection and check it, response callbacks, give it back) cost
    ~200-300 us of CPU around one script call on loopback, the same call sent and read here
    ~110 us. The connection is the pool's own kind, so it connects the same way (TLS,
    credentials, Sentinel discovery and the failover epoch above) and is closed with the client
    (its pool disconnects connections in use too); it is checked before each use as the pool
    checks a connection it hands out (one the server closed is reconnected), and the client's
    retry policy applies as redis-py applies it to a pipeline (the whole batch again on a fresh
    connection). Calls are serialised
    (one batch in flight); a call that fails or is cancelled drops the connection, so replies
    still on their way are never read as another call's, and the next call reconnects.
    """

    def __init__(self, client: aioredis.Redis) -> None:
        self._client = client
        self._conn: Any = None
        self._lock = asyncio.Lock()

    async def execute(self, commands: list[tuple[Any, ...]]) -> list[Any]:
        """Send ``commands`` in one write; their replies in order, an error reply (a
        ``ResponseError``, ``NoScriptError`` included) in its command's place."""
        async with self._lock:
            if self._conn is None:
                pool: Any = self._client.connection_pool  # (redis-py leaves it untyped)
                self._conn = await pool.get_connection()
            conn = self._conn

            async def attempt() -> list[Any]:
                await conn.connect()
                try:
                    # What the pool checks when it hands out a connection: a socket the server
                    # closed meanwhile (a restart, a failover) reads EOF; reconnect first.
                    stale = await conn.can_read()
                except (RedisConnectionError, TimeoutError, OSError):
                    stale = True
                if stale:
                    await conn.disconnect()
                    await conn.connect()
                await _send(conn, conn.pack_commands(commands))
                replies: list[Any] = []
                for _ in commands:
                    try:
                        replies.append(await conn.read_response())
                    except ResponseError as exc:  # that command's error; the stream is in step
                        replies.append(exc)
                return replies

            async def dropped(_: BaseException) -> None:
                await conn.disconnect()

            try:
                replies: list[Any] = await conn.retry.call_with_retry(attempt, dropped)
            except BaseException:
                await conn.disconnect(nowait=True)
                raise
            return replies


class BatchedCalls:
    """Commands of concurrent callers sent together over connections held from ``client``'s
    pool (``lanes`` of them, one batch in flight on each; see ``HeldConnection``).

    A command issued while every lane is busy waits for the first one back and goes with every
    other command waiting then, in one write; a lone command is sent at once. Each command is
    still executed on its own (a script stays atomic); only the round trips are shared. For hot
    script calls issued by many tasks at once (a herd of registrations, requests): redis-py
    spent ~200 us of CPU around each call. A caller cancelled before its command was sent
    takes it back; once sent, it runs (as a command already on the wire through redis-py does).
    """

    def __init__(self, client: aioredis.Redis, lanes: int = 2, linger_s: float = 0.0) -> None:
        self._client = client
        self._idle = [HeldConnection(client) for _ in range(lanes)]
        self._pending: list[tuple[tuple[Any, ...], asyncio.Future[Any]]] = []
        self._flushing: asyncio.Handle | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        # A command issued within ``linger_s`` of the last batch sent waits until that long
        # after it, so a steady trickle (a herd of registrations spread over seconds: one
        # every few milliseconds, each alone in its batch) travels a few at a time; a lone
        # command after a quiet spell is still sent at once.
        self.linger_s = linger_s
        self._last_sent = float("-inf")

    async def call(self, *command: Any) -> Any:
        """The reply of ``command``; its error reply raised (``NoScriptError`` included)."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future[Any] = loop.create_future()
        item = (command, done)
        self._pending.append(item)
        if self._flushing is None and self._idle:
            wait = self._last_sent + self.linger_s - loop.time()
            if wait > 0:
                self._flushing = loop.call_later(wait, self._flush)
            else:
                self._flushing = loop.call_soon(self._flush)
        try:
            return await done
        except asyncio.CancelledError:
            with contextlib.suppress(ValueError):
                self._pending.remove(item)  # not sent yet: never will be
            raise

    async def evalsha(self, script: Any, keys: list[Any], args: list[Any]) -> Any:
        """``script`` (a registered ``AsyncScript``) on ``keys`` and ``args``, its source loaded
        again when the server lost its script cache (a restart or a failover)."""
        try:
            return await self.call("EVALSHA", script.sha, len(keys), *keys, *args)
        except NoScriptError:
            script.sha = await self._client.script_load(script.script)
            if isinstance(script.sha, bytes):
                script.sha = script.sha.decode()
            return await self.call("EVALSHA", script.sha, len(keys), *keys, *args)

    def _flush(self) -> None:
        self._flushing = None
        if not self._pending or not self._idle:
            return  # every lane busy: the first one back sends what waits, as one batch
        batch, self._pending = self._pending, []
        self._last_sent = asyncio.get_running_loop().time()
        task = asyncio.ensure_future(self._send(self._idle.pop(), batch))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _send(
        self, lane: HeldConnection, batch: list[tuple[tuple[Any, ...], asyncio.Future[Any]]]
    ) -> None:
        try:
            replies = await lane.execute([command for command, _ in batch])
        except BaseException as exc:  # every waiter gets the failure, none is left hanging
            fail_waiters([done for _, done in batch], exc)
            if not isinstance(exc, Exception):
                raise
            return
        finally:
            self._idle.append(lane)
            if self._pending and self._flushing is None:
                self._flushing = asyncio.get_running_loop().call_soon(self._flush)
        settle_waiters([done for _, done in batch], replies)
