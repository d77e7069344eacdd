"""The client's address behind trusted proxies: ``X-Forwarded-For`` (HTTP header or gRPC metadata).

Behind a load balancer every caller arrives from the balancer's address, so per-address limits
would lump all of them together. Each proxy appends the address it received the request from to
``X-Forwarded-For``; only the entries added by proxies we trust are true, anything to their left
may be made up by the client. So the header is read only when the peer itself is a trusted proxy,
from right to left, skipping trusted proxies: the first address that is not one is the client
(nginx's ``real_ip_recursive``, the rightmost untrusted hop). A hop that is not an address stops
the walk at the last trusted proxy (its address is then the key: lenient for those behind it, and
never an address the client chose).

``TrustedProxies.parse("10.0.0.0/8, 192.168.1.5")``: CIDRs or single addresses; empty: nobody
is trusted and the peer's own address is always the client's. Used by Foghorn (``/play`` and
gRPC routing) and by Bridge (its anonymous buckets).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address

HEADER = "x-forwarded-for"  # the HTTP header and the gRPC metadata key (lower case)


def _address(text: str) -> Address | None:
    text = text.strip()
    if text.startswith("[") and "]" in text:  # "[2001:db8::1]:443" as some proxies write it
        text = text[1 : text.index("]")]
    try:
        addr = ipaddress.ip_address(text.split("%")[0])
    except ValueError:
        return None
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped  # a dual-stack listener's view of an IPv4 peer
    return addr


@dataclass(frozen=True)
class TrustedProxies:
    """The networks whose ``X-Forwarded-For`` entries are believed (see the module docstring)."""

    networks: tuple[Network, ...] = ()

    @classmethod
    def parse(cls, spec: str) -> TrustedProxies:
        """Comma-separated CIDRs or addresses; ValueError names the bad entry."""
        networks = []
        for raw in spec.split(","):
            entry = raw.strip()
            if not entry:
                continue
            try:
                networks.append(ipaddress.ip_network(entry, strict=False))
            except ValueError:
                raise ValueError(
                    f"trusted proxy {entry[:60]!r} is not an address or CIDR (10.0.0.0/8)"
                ) from None
        return cls(tuple(networks))

    def __bool__(self) -> bool:
        return bool(self.networks)

    def trusts(self, ip: str) -> bool:
        addr = _address(ip)
        return addr is not None and self._trusts(addr)

    def _trusts(self, addr: Address) -> bool:
        return any(addr.version == net.version and addr in net for net in self.networks)

    def client_address(self, peer: str, forwarded: Iterable[str] = ()) -> str:
        """The client's address: ``peer`` unless it is a trusted proxy, then the rightmost
        ``forwarded`` hop (all values, comma-separated, in the order received) that is not."""
        if not self.networks:
            return peer
        client = _address(peer)
        if client is None or not self._trusts(client):
            return peer
        hops = [hop for value in forwarded for hop in value.split(",")]
        for hop in reversed(hops):
            addr = _address(hop)
            if addr is None:
                break  # not an address: nothing to its left can be believed either
            client = addr
            if not self._trusts(addr):
                break
        return str(client)


NO_PROXIES = TrustedProxies()
