"""Bridge's health reports a Foghorn breaker whose open period is over as half-open, not open."""

from __future__ import annotations

from api_gateway.foghorn_backend import FoghornFleet
from pkg.clients import BreakerPolicy, CircuitBreaker
from pkg.common.clock import FakeClock


def test_open_breaker_whose_probe_is_due_is_reported_half_open() -> None:
    backend = FoghornFleet(["127.0.0.1:1"], timeout_s=1.0, token="t")
    clock = FakeClock()
    breaker = CircuitBreaker("127.0.0.1:1", BreakerPolicy(open_duration=5.0), clock)
    backend.runtime.breakers["127.0.0.1:1"] = breaker
    assert backend.state() == {"127.0.0.1:1": "closed"}
    breaker.force("open", open_for=5.0)
    assert backend.state() == {"127.0.0.1:1": "open"}
    clock.advance(5.0)
    # No call came to probe: the breaker itself is still "open", but it fails nothing anymore.
    assert breaker.state == "open"
    assert backend.state() == {"127.0.0.1:1": "half-open"}
