"""Tenant limits (the billing-shaped provider interface) and start-up configuration errors."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from bridge.tenant_limits import CachedLimits, ConfigLimitsProvider, parse_overrides
from bridge.token_bucket import Limit
from pkg.common.clock import FakeClock


def test_overrides_parse_and_bad_entries_name_themselves():
    assert parse_overrides("acme=500/200, small=10/0.5") == {
        "acme": Limit(500, 200.0),
        "small": Limit(10, 0.5),
    }
    for bad in ("acme", "acme=10", "acme=x/1", "=10/1", "acme=0/1", "acme=10/-1"):
        with pytest.raises(ValueError, match="bad tenant limit"):
            parse_overrides(bad)


async def test_a_tenant_without_override_gets_the_default_plan():
    provider = ConfigLimitsProvider(Limit(100, 50.0), {"acme": Limit(500, 200.0)})
    assert (await provider.limits_for("acme")).requests == Limit(500, 200.0)
    other = await provider.limits_for("other")
    assert (other.requests, other.plan) == (Limit(100, 50.0), "default")


class FlakyBilling:
    def __init__(self) -> None:
        self.calls = 0
        self.fail = False

    async def limits_for(self, tenant: str):
        self.calls += 1
        if self.fail:
            raise ConnectionError("billing down")
        return await ConfigLimitsProvider(Limit(7, 1.0)).limits_for(tenant)


async def test_cached_limits_call_the_provider_once_per_ttl_and_survive_its_outage():
    clock, billing = FakeClock(), FlakyBilling()
    limits = CachedLimits(billing, ttl_s=30, clock=clock)
    for _ in range(5):
        assert (await limits.limits_for("acme")).requests.capacity == 7
    assert billing.calls == 1
    clock.advance(31)
    billing.fail = True
    assert (await limits.limits_for("acme")).requests.capacity == 7  # last known answer
    with pytest.raises(ConnectionError):
        await limits.limits_for("never-seen")


@pytest.mark.parametrize(
    "env",
    [
        {"BRIDGE_TENANT_LIMITS": "acme"},
        {"BRIDGE_HTTP_PORT": "not-a-port"},
        {"BRIDGE_TENANT_BURST": "0"},
        {"BRIDGE_EVENT_LOOP": "trio"},
        {"BRIDGE_JWT_RS256_PUBLIC_KEY": "not a pem"},
        {"BRIDGE_SIGNALMAN_ADDRESSES": "127.0.0.1:1", "BRIDGE_SIGNALMAN_TOKENS": "acme"},
    ],
)
def test_bad_configuration_stops_start_up_with_a_clear_message(env):
    result = subprocess.run(
        [sys.executable, "-m", "api_gateway"],
        env={**os.environ, **env},
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "bad configuration" in result.stderr
