"""Validate the ``targets`` argument of the channel factories and name its gRPC targets.

One address ("127.0.0.1:5001", "localhost:5001", "dns:///svc:443", "unix:/path") is passed
through. Several addresses of replicas of ONE service give one single-address target per
replica (``replicas``: ``aio_channel`` connects to each and picks the replica of every attempt,
with outlier ejection) and a single ``ipv4:``/``ipv6:`` multi-address target (``target``:
what ``sync_channel``, or ``aio_channel`` with outlier ejection off, balances with grpc's
``round_robin``, where a dead replica drops out once its connection breaks).
"""

from __future__ import annotations

import contextlib
import ipaddress
from collections.abc import Callable, Sequence
from dataclasses import dataclass

_SCHEMES = ("dns:", "unix:", "unix-abstract:", "ipv4:", "ipv6:", "vsock:")


@dataclass(frozen=True, slots=True)
class ResolvedTarget:
    """The gRPC target string, whether it spans several replicas, and its display name.

    ``replicas`` holds one single-address gRPC target per replica (``ipv4:127.0.0.1:5001``)
    for channels that pick the replica of each attempt themselves (outlier ejection).
    """

    target: str
    multi: bool
    name: str
    replicas: tuple[str, ...] = ()


def _split_host_port(address: str) -> tuple[str, int]:
    if address.startswith("["):
        host, sep, port = address[1:].partition("]:")
    else:
        host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(
            f"unknown target syntax {address!r}: expected 'host:port' (e.g. '127.0.0.1:5001'), "
            "'[::1]:5001' or a gRPC URI such as 'dns:///svc:443'"
        )
    return host, int(port)


def _validate_single(address: str) -> str:
    if not isinstance(address, str) or not address.strip() or address != address.strip():
        raise ValueError(f"unknown target syntax {address!r}: empty or padded address")
    if address.startswith(_SCHEMES):
        return address
    if "://" in address:
        raise ValueError(
            f"unknown target syntax {address!r}: scheme must be one of "
            + ", ".join(s.rstrip(":") for s in _SCHEMES)
        )
    _split_host_port(address)
    return address


def resolve_targets(targets: str | Sequence[str]) -> ResolvedTarget:
    """Validate ``targets`` and build the gRPC target; raises ``ValueError`` on bad syntax."""
    if isinstance(targets, str):
        addresses = [t.strip() for t in targets.split(",")] if "," in targets else [targets]
    else:
        addresses = list(targets)
    if not addresses:
        raise ValueError("targets must name at least one address")
    if len(addresses) == 1:
        single = _validate_single(addresses[0])
        return ResolvedTarget(single, False, single, (single,))
    families: set[int] = set()
    parts: list[str] = []
    for address in addresses:
        if not isinstance(address, str) or address.startswith(_SCHEMES):
            raise ValueError(
                f"unknown target syntax {address!r}: several targets must be plain "
                "'ip:port' addresses of replicas of one service"
            )
        host, port = _split_host_port(address)
        if host == "localhost":
            host = "127.0.0.1"
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            raise ValueError(
                f"unknown target syntax {address!r}: with several replicas each address must be "
                "an IP literal (or localhost); use one 'dns:///name:port' target for DNS"
            ) from None
        families.add(ip.version)
        parts.append(f"{ip}:{port}" if ip.version == 4 else f"[{ip}]:{port}")
    if len(families) != 1:
        raise ValueError(f"targets mix IPv4 and IPv6 addresses: {addresses!r}")
    if len(set(parts)) != len(parts):
        raise ValueError(f"targets list the same address twice: {addresses!r}")
    scheme = "ipv4:" if families == {4} else "ipv6:"
    joined = ",".join(parts)
    return ResolvedTarget(scheme + joined, True, joined, tuple(scheme + part for part in parts))


def replica_address(address: str) -> str:
    """One replica address in the form replica lists use: ``ip:port`` or ``[ip6]:port``
    (``localhost`` is 127.0.0.1); ``ValueError`` for anything else."""
    if not isinstance(address, str) or address != address.strip() or not address:
        raise ValueError(f"unknown replica address {address!r}: empty or padded")
    host, port = _split_host_port(address)
    if host == "localhost":
        host = "127.0.0.1"
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(
            f"unknown replica address {address!r}: a replica list holds IP literals "
            "(a DNS name is given as one 'dns:///name:port' target)"
        ) from None
    return f"{ip}:{port}" if ip.version == 4 else f"[{ip}]:{port}"


def grpc_target(address: str) -> str:
    """The gRPC target of one replica address (``ipv4:1.2.3.4:5`` / ``ipv6:[::1]:5``)."""
    return ("ipv6:" if address.startswith("[") else "ipv4:") + address


Subscriber = Callable[[tuple[str, ...]], None]


class TargetList:
    """The replica addresses of one service, which may change while callers run.

    Channels built on it (``aio_channel(target_list)``, ``FoghornClient(target_list)``) follow
    every change: a new replica gets a connection and joins the rotation, a removed one gets
    no new calls and its connection is closed after a grace period. ``update`` is the seam
    for whoever learns the replica set (a DNS name re-resolved by ``DnsTargets``, a watched
    file by ``FileTargets``, or a Foghorn control stream telling its nodes). ``name`` stays
    the same across changes: budgets, breakers' service and metrics are keyed by it.
    """

    def __init__(self, addresses: Sequence[str] = (), *, name: str | None = None) -> None:
        self._addresses = self._checked(addresses)
        self.name = name or ",".join(self._addresses)
        if not self.name:
            raise ValueError("a target list without addresses needs a name")
        self._subscribers: list[Subscriber] = []
        self.changes = 0  # how many times the replica set changed

    @staticmethod
    def _checked(addresses: Sequence[str]) -> tuple[str, ...]:
        if isinstance(addresses, str):
            raise ValueError("give a list of addresses, not a string")
        found: list[str] = []
        for address in addresses:
            normal = replica_address(address)
            if normal not in found:
                found.append(normal)
        return tuple(found)

    @property
    def addresses(self) -> tuple[str, ...]:
        """The current replica addresses (``ip:port``)."""
        return self._addresses

    def update(self, addresses: Sequence[str]) -> bool:
        """Replace the replica set (validated first: a bad address changes nothing and raises
        ``ValueError``); subscribers hear of it. Returns whether it changed."""
        new = self._checked(addresses)
        if new == self._addresses:
            return False
        self._addresses = new
        self.changes += 1
        for subscriber in list(self._subscribers):
            subscriber(new)
        return True

    def subscribe(self, subscriber: Subscriber) -> None:
        """Call ``subscriber(addresses)`` after every change (once, however often added)."""
        if subscriber not in self._subscribers:
            self._subscribers.append(subscriber)

    def unsubscribe(self, subscriber: Subscriber) -> None:
        """Stop calling ``subscriber``."""
        with contextlib.suppress(ValueError):
            self._subscribers.remove(subscriber)

    def acquire(self) -> None:
        """A channel starts using the list (sources refresh while any does)."""

    def release(self) -> None:
        """A channel stops using the list."""

    def start(self) -> None:
        """Begin refreshing in the background (sources that have something to refresh)."""

    def refresh_soon(self) -> None:
        """A call failed: refresh now rather than at the next interval (sources that can)."""

    async def close(self) -> None:
        """Stop refreshing."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, {list(self._addresses)})"
