"""Validate the ``targets`` argument of the channel factories and name its gRPC targets.

One address ("127.0.0.1:5001", "localhost:5001", "dns:///svc:443", "unix:/path") is passed
through. Several addresses of replicas of ONE service give one single-address target per
replica (``replicas``: ``aio_channel`` connects to each and picks the replica of every attempt,
with outlier ejection) and a single ``ipv4:``/``ipv6:`` multi-address target (``target``:
what ``sync_channel``, or ``aio_channel`` with outlier ejection off, balances with grpc's
``round_robin``, where a dead replica drops out once its connection breaks).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
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
