"""Replica sets that change by themselves: a DNS name re-resolved, a file watched.

``dns:///name:port`` (a Kubernetes headless Service, or any name with one A/AAAA record per
replica) becomes a ``DnsTargets``: resolved when built, again every ``interval`` seconds and
soon after a call fails to reach a replica (at most once per ``min_interval``), so a replica
that joins is used and one that left is dropped without restarting the caller. A failed or
empty resolution keeps the last known replicas (as gRPC's own DNS resolver does): a DNS
hiccup must not empty the rotation.

``file:/path`` becomes a ``FileTargets``: the file lists one ``ip:port`` per line (``#``
comments, blank lines and commas allowed), re-read when its modification time or size
changes (checked every ``interval`` seconds). A file that cannot be read or holds a bad
address keeps the last good list and logs why.

Both are ``TargetList``s: the channels built on them follow every change. The refresh task
runs while at least one channel uses the list (``acquire``/``release``) inside an event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import weakref
from collections.abc import Callable, Sequence
from pathlib import Path

from pkg.clients.log import get_logger
from pkg.clients.targets import TargetList, _split_host_port

log = get_logger("pkg.clients.discovery")

# host, port -> "ip:port" strings (may block: it runs in a worker thread after the first time)
Resolver = Callable[[str, int], Sequence[str]]

DNS_INTERVAL_S = 5.0
DNS_MIN_INTERVAL_S = 1.0
FILE_INTERVAL_S = 1.0


def system_resolver(host: str, port: int) -> list[str]:
    """The addresses ``getaddrinfo`` gives for ``host`` (IPv4 and IPv6, in its order)."""
    found: list[str] = []
    for family, _, _, _, sockaddr in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM):
        ip = str(sockaddr[0])
        address = f"[{ip}]:{port}" if family == socket.AF_INET6 else f"{ip}:{port}"
        if address not in found:
            found.append(address)
    return found


class RefreshingTargets(TargetList):
    """A ``TargetList`` that refreshes itself in the background while channels use it."""

    def __init__(
        self, addresses: Sequence[str], *, name: str, interval: float, min_interval: float
    ) -> None:
        super().__init__(addresses, name=name)
        if not interval > 0 or not min_interval > 0:
            raise ValueError(f"{name}: refresh intervals must be > 0 seconds")
        self.interval = interval
        self.min_interval = min_interval
        self.refreshes = 0  # how many times the source was read
        self._users = 0
        self._task: asyncio.Task[None] | None = None
        self._task_loop: asyncio.AbstractEventLoop | None = None
        self._soon: asyncio.Event | None = None
        self._last = 0.0

    def acquire(self) -> None:
        """A channel uses the list (refreshing runs while any does)."""
        self._users += 1

    def release(self) -> None:
        """A channel no longer uses the list."""
        self._users = max(0, self._users - 1)
        if self._users == 0 and self._task is not None:
            self._task.cancel()
            self._task = None

    def start(self) -> None:
        """Start refreshing (inside an event loop; no-op when running or outside one)."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        if self._task is not None and not self._task.done() and self._task_loop is loop:
            return
        # A list shared by channels of another (perhaps closed) loop restarts on this one.
        self._task_loop = loop
        self._soon = asyncio.Event()
        self._last = loop.time()
        self._task = loop.create_task(self._loop())

    def refresh_soon(self) -> None:
        """Refresh now (at most once per ``min_interval``): a replica could not be reached."""
        if self._soon is not None:
            self._soon.set()
        else:
            self.start()

    async def close(self) -> None:
        """Stop refreshing."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        soon = self._soon
        assert soon is not None
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(soon.wait(), self.interval)
            # Failures come in bursts: one refresh per min_interval however many ask.
            wait = self._last + self.min_interval - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            soon.clear()
            self._last = loop.time()
            await self.refresh()

    async def refresh(self) -> None:
        """Read the source once and apply what it says (errors keep the current list)."""
        self.refreshes += 1
        try:
            found = await self._read()
        except Exception as exc:
            log.warning("replica list not refreshed", target=self.name, error=str(exc))
            return
        if found is None:
            return
        if not found:
            log.warning("replica list source is empty: keeping the last one", target=self.name)
            return
        try:
            changed = self.update(found)
        except ValueError as exc:
            log.warning("replica list not refreshed", target=self.name, error=str(exc))
            return
        if changed:
            log.info("replica list changed", target=self.name, replicas=list(self.addresses))

    async def _read(self) -> list[str] | None:
        raise NotImplementedError


class DnsTargets(RefreshingTargets):
    """The replicas behind one DNS name (``dns:///name:port``), re-resolved in the background.

    ``resolver``: the seam for tests and special setups (default: ``getaddrinfo``).
    """

    def __init__(
        self,
        host: str,
        port: int,
        *,
        resolver: Resolver | None = None,
        interval: float = DNS_INTERVAL_S,
        min_interval: float = DNS_MIN_INTERVAL_S,
        name: str | None = None,
    ) -> None:
        self.host = host
        self.port = port
        self.resolver = resolver or system_resolver
        # The first resolution happens here (the channel needs replicas to start with); a
        # name that does not resolve yet starts empty and calls fail UNAVAILABLE until it does.
        try:
            initial = list(self.resolver(host, port))
        except OSError as exc:
            log.warning("name not resolved yet", host=host, error=str(exc))
            initial = []
        super().__init__(
            initial,
            name=name or f"dns:///{host}:{port}",
            interval=interval,
            min_interval=min_interval,
        )

    async def _read(self) -> list[str]:
        loop = asyncio.get_running_loop()
        return list(await loop.run_in_executor(None, self.resolver, self.host, self.port))


def parse_address_file(text: str) -> list[str]:
    """The addresses of a replica file: one per line or comma-separated, ``#`` comments."""
    found: list[str] = []
    for line in text.splitlines():
        content = line.split("#", 1)[0]
        found.extend(part.strip() for part in content.split(",") if part.strip())
    return found


class FileTargets(RefreshingTargets):
    """The replicas listed in a file (``file:/path``), re-read when it changes."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        interval: float = FILE_INTERVAL_S,
        name: str | None = None,
    ) -> None:
        self.path = Path(path)
        try:
            text = self.path.read_text()
            self._stamp: tuple[float, int] | None = self._stat()
        except OSError as exc:
            raise ValueError(f"replica file {str(self.path)!r} cannot be read: {exc}") from None
        super().__init__(
            parse_address_file(text),
            name=name or f"file:{self.path}",
            interval=interval,
            min_interval=interval,
        )

    def _stat(self) -> tuple[float, int]:
        st = self.path.stat()
        return (st.st_mtime, st.st_size)

    async def _read(self) -> list[str] | None:
        stamp = self._stat()
        if stamp == self._stamp:
            return None  # unchanged: nothing to read
        self._stamp = stamp
        return parse_address_file(self.path.read_text())


# One list per spec in the process, so code that builds a channel per request neither resolves
# the name (a blocking getaddrinfo) nor starts a refresh task each time.
_SHARED: weakref.WeakValueDictionary[str, TargetList] = weakref.WeakValueDictionary()


def dynamic_targets(targets: object) -> TargetList | None:
    """The ``TargetList`` a target spec stands for, when it names a changing replica set:
    a ``TargetList`` itself, ``dns:///name:port`` or ``file:/path`` (alone, as a string or
    a one-element list; one shared list per spec while something uses it). None for fixed
    addresses."""
    if isinstance(targets, TargetList):
        return targets
    if isinstance(targets, (list, tuple)) and len(targets) == 1:
        targets = targets[0]
    if not isinstance(targets, str) or not targets.startswith(("file:", "dns:")):
        return None
    found = _SHARED.get(targets)
    if found is None:
        found = _SHARED.setdefault(targets, _from_spec(targets))
    return found


def _from_spec(targets: str) -> TargetList:
    if targets.startswith("file:"):
        path = targets[len("file:") :]
        if path.startswith("//"):
            path = path[2:]
        if not path:
            raise ValueError(f"unknown target syntax {targets!r}: expected 'file:/path'")
        return FileTargets(path)
    rest = targets[len("dns:") :]
    if rest.startswith("//"):
        authority, slash, rest = rest[2:].partition("/")
        if authority or not slash:
            raise ValueError(
                f"unknown target syntax {targets!r}: expected 'dns:///name:port' (a DNS "
                "server other than the system's is not supported)"
            )
    host, port = _split_host_port(rest)
    return DnsTargets(host, port)
