"""Per-address rate limits of Foghorn's public routing (gRPC Routing and HTTP /play).

Anonymous callers are limited per client address: an IPv4 address, or an IPv6 /64 (one
subscriber usually holds a whole /64, so per-address limits would be free to dodge). A token
bucket per key, ``rate`` per second with ``burst``; memory is bounded (the least recently used
keys are forgotten past ``max_keys``, which can only make a limit more lenient). Callers with a
valid platform credential are not limited here (Bridge routes on behalf of many viewers and has
its own per-tenant and per-IP limits).
"""

from __future__ import annotations

import ipaddress
import math
from collections import OrderedDict

from pkg.common.clock import Clock


def address_key(ip: str) -> str:
    """The rate-limit key of an address: itself (IPv4), its /64 (IPv6), "" if not an IP."""
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return ""
    if isinstance(addr, ipaddress.IPv6Address):
        if addr.ipv4_mapped is not None:
            return str(addr.ipv4_mapped)
        return str(ipaddress.IPv6Network((int(addr) >> 64 << 64, 64)))
    return str(addr)


def peer_ip(peer: str) -> str:
    """The IP of a grpc peer string (``ipv4:1.2.3.4:5``, ``ipv6:[::1]:5``); "" otherwise."""
    kind, _, rest = peer.partition(":")
    if kind == "ipv4":
        return rest.rpartition(":")[0]
    if kind == "ipv6":
        host = rest.rpartition(":")[0]
        return host.strip("[]").split("%")[0]
    return ""


class AddressLimiter:
    """Token buckets per address key, on an injected clock."""

    def __init__(
        self, clock: Clock, rate_per_s: float, burst: float, max_keys: int = 100_000
    ) -> None:
        if rate_per_s <= 0 or burst < 1:
            raise ValueError("rate_per_s must be > 0 and burst >= 1")
        self._clock = clock
        self.rate = rate_per_s
        self.burst = burst
        self.max_keys = max_keys
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # tokens, at
        self.limited = 0

    def take(self, key: str) -> float:
        """Take one token for ``key``: 0.0 when allowed, else seconds until one is available."""
        now = self._clock.monotonic()
        tokens, at = self._buckets.pop(key, (self.burst, now))
        tokens = min(self.burst, tokens + (now - at) * self.rate)
        if tokens >= 1.0:
            self._buckets[key] = (tokens - 1.0, now)
            wait = 0.0
        else:
            self._buckets[key] = (tokens, now)
            self.limited += 1
            wait = (1.0 - tokens) / self.rate
        if len(self._buckets) > self.max_keys:
            self._buckets.popitem(last=False)
        return wait

    def remaining(self, key: str) -> int:
        """Whole tokens left for ``key`` now (for X-RateLimit-Remaining)."""
        tokens, at = self._buckets.get(key, (self.burst, self._clock.monotonic()))
        now = self._clock.monotonic()
        return int(min(self.burst, tokens + (now - at) * self.rate))


def retry_after_header(wait_s: float) -> str:
    """HTTP Retry-After: whole seconds, at least 1."""
    return str(max(1, math.ceil(wait_s)))
