"""Per-tenant limits: what each tenant may do, looked up through a provider interface.

Today the limits come from configuration (``ConfigLimitsProvider``); the interface is the one a
billing service client would implement (``async limits_for(tenant)``), and ``CachedLimits``
keeps answers in process for a short TTL so the request path does not call billing each time,
and keeps serving the last known limits if the provider fails.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import structlog

from bridge.token_bucket import Limit
from pkg.common.clock import SYSTEM_CLOCK, Clock

log = structlog.get_logger("bridge.limits")


@dataclass(frozen=True)
class TenantLimits:
    """A tenant's plan: request rate (tokens per second, burst) and its plan name."""

    tenant: str
    requests: Limit
    plan: str = "default"


class LimitsProvider(Protocol):
    async def limits_for(self, tenant: str) -> TenantLimits: ...


def parse_overrides(spec: str) -> dict[str, Limit]:
    """Parse ``tenant=burst/rate,...`` (``acme=200/50``); raises ValueError naming the entry."""
    out: dict[str, Limit] = {}
    for raw in spec.split(","):
        entry = raw.strip()
        if not entry:
            continue
        tenant, sep, rest = entry.partition("=")
        burst, slash, rate = rest.partition("/")
        try:
            if not (tenant and sep and slash):
                raise ValueError("missing part")
            out[tenant.strip()] = Limit(capacity=int(burst), rate=float(rate))
        except ValueError as exc:
            raise ValueError(
                f"bad tenant limit {entry!r}: expected tenant=burst/rate_per_second ({exc})"
            ) from None
    return out


class ConfigLimitsProvider:
    """Limits from configuration: a default plan plus per-tenant overrides."""

    def __init__(self, default: Limit, overrides: dict[str, Limit] | None = None) -> None:
        self._default = default
        self._overrides = dict(overrides or {})

    async def limits_for(self, tenant: str) -> TenantLimits:
        limit = self._overrides.get(tenant)
        if limit is None:
            return TenantLimits(tenant, self._default, "default")
        return TenantLimits(tenant, limit, "custom")


class CachedLimits:
    """Caches a provider's answers for ``ttl_s``; on provider failure keeps the last answer."""

    def __init__(
        self,
        provider: LimitsProvider,
        ttl_s: float = 30.0,
        clock: Clock = SYSTEM_CLOCK,
        max_tenants: int = 50_000,
    ) -> None:
        self._provider = provider
        self._ttl = ttl_s
        self._clock = clock
        self._max = max_tenants
        self._cache: dict[str, tuple[TenantLimits, float]] = {}

    async def limits_for(self, tenant: str) -> TenantLimits:
        now = self._clock.monotonic()
        hit = self._cache.get(tenant)
        if hit is not None and hit[1] > now:
            return hit[0]
        try:
            limits = await self._provider.limits_for(tenant)
        except Exception as exc:
            if hit is not None:
                log.warning("tenant_limits_stale", tenant=tenant, error=repr(exc))
                return hit[0]
            raise
        if len(self._cache) >= self._max:
            self._cache.clear()
        self._cache[tenant] = (limits, now + self._ttl)
        return limits
