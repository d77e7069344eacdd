"""Outlier ejection state machine and per-method attempt timeouts (no network, FakeClock)."""

from __future__ import annotations

import grpc
import pytest

from pkg.clients import OutlierDetector, OutlierEvent, OutlierPolicy, Policy, RetryPolicy, Runtime
from pkg.clients.classify import outlier_outcome
from pkg.clients.connection import NotSentError
from pkg.clients.foghorn import default_policy as foghorn_policy
from pkg.clients.outlier import (
    EJECTED,
    HEALTHY,
    OUTCOME_ERROR,
    OUTCOME_LOCAL,
    OUTCOME_NEUTRAL,
    OUTCOME_SUCCESS,
)
from pkg.clients.targets import resolve_targets
from pkg.common.clock import FakeClock
from tests.clients.conftest import status_error

ADDRESSES = ["127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3", "127.0.0.1:4"]


def detector(
    n: int = 2, clock: FakeClock | None = None, **policy: object
) -> tuple[OutlierDetector, list[OutlierEvent], FakeClock]:
    clock = clock or FakeClock()
    events: list[OutlierEvent] = []
    found = OutlierDetector(
        "svc",
        ADDRESSES[:n],
        OutlierPolicy(**policy),  # type: ignore[arg-type]
        clock,
        events.append,
    )
    return found, events, clock


def fail(d: OutlierDetector, replica: int, outcome: int = OUTCOME_LOCAL, times: int = 1) -> None:
    """Send ``times`` attempts that all land on ``replica`` and fail with ``outcome``."""
    for _ in range(times):
        d.replicas[replica].in_flight += 1
        d.failure(replica, outcome)


def test_healthy_replicas_are_used_in_round_robin() -> None:
    d, _, _ = detector(3)
    picks = []
    for _ in range(6):
        i = d.pick()
        d.success(i)
        picks.append(i)
    assert picks == [0, 1, 2, 0, 1, 2]


def test_a_retry_avoids_the_replica_its_attempt_failed_on() -> None:
    d, _, _ = detector(3)
    for failed in range(3):
        i = d.pick(avoid=failed)
        assert i != failed
        d.success(i)


def test_consecutive_timeouts_eject_the_replica_with_the_reason() -> None:
    d, events, _ = detector(2, consecutive_local_failures=2, base_ejection_time=2.0)
    fail(d, 0)
    assert d.replicas[0].state == HEALTHY
    fail(d, 0)
    assert d.replicas[0].state == EJECTED
    assert d.ejected == 1
    assert [(e.replica, e.ejected, e.duration) for e in events] == [("127.0.0.1:1", True, 2.0)]
    assert "timeouts" in events[0].reason
    picks = set()
    for _ in range(10):
        i = d.pick()
        d.success(i)
        picks.add(i)
    assert picks == {1}


def test_a_success_resets_the_consecutive_failure_count() -> None:
    d, _, _ = detector(2, consecutive_local_failures=2)
    fail(d, 0)
    d.replicas[0].in_flight += 1
    d.success(0)
    fail(d, 0)
    assert d.replicas[0].state == HEALTHY


def test_server_errors_need_more_in_a_row_than_timeouts() -> None:
    d, events, _ = detector(2, consecutive_errors=5)
    fail(d, 0, OUTCOME_ERROR, times=4)
    assert d.replicas[0].state == HEALTHY
    fail(d, 0, OUTCOME_ERROR)
    assert d.replicas[0].state == EJECTED
    assert "server errors" in events[0].reason


def test_a_suspect_replica_gets_one_attempt_at_a_time() -> None:
    # A hung replica: several attempts are in flight on it when the first one times out. From
    # then on it receives no new attempt until the others report (or it is ejected).
    d, _, _ = detector(2, consecutive_local_failures=3)
    in_flight_on_0 = []
    for _ in range(6):
        i = d.pick()
        if i == 0:
            in_flight_on_0.append(i)
        else:
            d.success(i)
    assert len(in_flight_on_0) == 3
    d.failure(0, OUTCOME_LOCAL)  # the first attempt times out: replica 0 is suspect
    for _ in range(6):
        i = d.pick()
        assert i == 1
        d.success(i)


def test_never_more_than_max_ejection_percent_of_replicas_are_ejected() -> None:
    d, events, _ = detector(2, max_ejection_percent=50)
    fail(d, 0, times=2)
    fail(d, 1, times=5)
    assert d.ejected == 1
    assert [e.replica for e in events if e.ejected] == ["127.0.0.1:1"]
    # The replica left in rotation keeps receiving calls (no total failure by ejection); it is
    # failing too, so the ejected one is tried beside it (panic routing).
    assert d.panic
    picks = []
    for _ in range(4):
        i = d.pick()
        picks.append(i)
        d.release(i)
    assert sorted(set(picks)) == [0, 1]


def test_a_single_replica_is_never_ejected() -> None:
    d, events, _ = detector(1)
    fail(d, 0, times=10)
    assert d.ejected == 0 and events == []
    assert d.pick() == 0


def test_after_the_ejection_time_one_probe_goes_through_and_success_returns_it() -> None:
    d, events, clock = detector(2, base_ejection_time=2.0)
    fail(d, 0, times=2)
    clock.advance(1.9)
    assert {d.pick() for _ in range(4)} == {1}
    for r in d.replicas:
        r.in_flight = 0
    clock.advance(0.2)
    probes = [i for i in (d.pick() for _ in range(4)) if i == 0]
    assert probes == [0]  # exactly one probe while it is in flight
    d.success(0)
    assert d.replicas[0].state == HEALTHY
    assert events[-1].ejected is False and events[-1].replica == "127.0.0.1:1"


def test_a_failed_probe_ejects_again_for_longer_up_to_the_cap() -> None:
    d, events, clock = detector(2, base_ejection_time=1.0, max_ejection_time=3.0)
    fail(d, 0, times=2)
    durations = [events[-1].duration]
    for _ in range(3):
        clock.advance(durations[-1])
        assert d.pick(avoid=1) == 0  # the probe
        d.failure(0, OUTCOME_LOCAL)
        durations.append(events[-1].duration)
    assert durations == [1.0, 2.0, 3.0, 3.0]


def test_ejection_history_is_forgotten_after_a_long_healthy_stretch() -> None:
    d, events, clock = detector(2, base_ejection_time=1.0, max_ejection_time=4.0)
    fail(d, 0, times=2)
    clock.advance(1.0)
    assert d.pick(avoid=1) == 0
    d.success(0)
    clock.advance(5.0)
    assert d.pick(avoid=1) == 0
    d.success(0)
    fail(d, 0, times=2)
    assert events[-1].duration == 1.0


def test_when_every_replica_is_ejected_the_one_back_soonest_is_used() -> None:
    d, _, clock = detector(2, max_ejection_percent=100, base_ejection_time=1.0)
    fail(d, 0, times=2)
    clock.advance(0.5)
    fail(d, 1, times=2)
    assert d.ejected == 2
    assert d.pick() == 0


@pytest.mark.parametrize(
    ("code", "details", "capped", "connected", "expected"),
    [
        (grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded", True, True, OUTCOME_LOCAL),
        (grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded", False, True, OUTCOME_NEUTRAL),
        # The connection is gone (a transport fact): the replica did not answer.
        (grpc.StatusCode.UNAVAILABLE, "Socket closed", False, False, OUTCOME_LOCAL),
        # The same texts on a live connection were sent by the replica: a server error.
        (
            grpc.StatusCode.UNAVAILABLE,
            "failed to connect to all addresses; last error: Connection refused",
            False,
            True,
            OUTCOME_ERROR,
        ),
        (grpc.StatusCode.UNAVAILABLE, "Socket closed", False, True, OUTCOME_ERROR),
        (grpc.StatusCode.UNAVAILABLE, "replica is draining", False, True, OUTCOME_ERROR),
        (grpc.StatusCode.INTERNAL, "boom", False, True, OUTCOME_ERROR),
        (grpc.StatusCode.NOT_FOUND, "no such node", False, True, OUTCOME_SUCCESS),
        (grpc.StatusCode.CANCELLED, "Cancelled", False, True, OUTCOME_NEUTRAL),
    ],
)
def test_attempt_outcomes_are_classified_for_outlier_detection(
    code: grpc.StatusCode, details: str, capped: bool, connected: bool, expected: int
) -> None:
    assert outlier_outcome(status_error(code, details), capped, connected) == expected


def test_a_request_the_library_did_not_send_counts_as_no_answer() -> None:
    error = NotSentError("10.0.0.1:1", "no connection could be made", grpc.StatusCode.UNAVAILABLE)
    assert outlier_outcome(error, False, True) == OUTCOME_LOCAL


def test_outlier_policy_rejects_bad_settings_naming_the_field() -> None:
    with pytest.raises(ValueError, match="consecutive_local_failures"):
        OutlierPolicy(consecutive_local_failures=0)
    with pytest.raises(ValueError, match="consecutive_errors"):
        OutlierPolicy(consecutive_errors=-1)
    with pytest.raises(ValueError, match="base_ejection_time"):
        OutlierPolicy(base_ejection_time=0)
    with pytest.raises(ValueError, match="max_ejection_time"):
        OutlierPolicy(base_ejection_time=5, max_ejection_time=1)
    with pytest.raises(ValueError, match="max_ejection_percent"):
        OutlierPolicy(max_ejection_percent=150)
    with pytest.raises(ValueError, match=r"policy\.outlier"):
        Policy(outlier="on")  # type: ignore[arg-type]


def test_attempt_timeouts_per_method_pattern_first_match_wins() -> None:
    retry = RetryPolicy(
        attempt_timeout=2.0,
        attempt_timeouts=(("/foghorn.v1.Routing/*", 0.3), ("/foghorn.v1.*", 1.0)),
    )
    assert retry.attempt_timeout_for("/foghorn.v1.Routing/RouteViewer") == 0.3
    assert retry.attempt_timeout_for("/foghorn.v1.NodeAdmin/GetNode") == 1.0
    assert retry.attempt_timeout_for("/signalman.v1.Signalman/GetStats") == 2.0
    runtime = Runtime(clock=FakeClock(), instrumentation=[])
    state = runtime.method(Policy(retry=retry), "t", "/foghorn.v1.Routing/RouteIngest")
    assert state.attempt_timeout == 0.3


def test_attempt_timeouts_reject_bad_entries_naming_the_field() -> None:
    with pytest.raises(ValueError, match="attempt_timeouts"):
        RetryPolicy(attempt_timeouts=(("/a/*", 0),))
    with pytest.raises(ValueError, match="attempt_timeouts"):
        RetryPolicy(attempt_timeouts=(("/a/*",),))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="attempt_timeouts"):
        RetryPolicy(attempt_timeouts=[("/a/*", 1.0)])  # type: ignore[arg-type]


def test_foghorn_default_policy_fails_routing_over_fast_but_not_commands() -> None:
    retry = foghorn_policy().retry
    assert retry.attempt_timeout_for("/foghorn.v1.Routing/RouteViewer") == 0.3
    assert retry.attempt_timeout_for("/foghorn.v1.NodeAdmin/SendCommand") is None
    assert foghorn_policy().outlier.enabled


def test_multi_address_targets_list_one_target_per_replica() -> None:
    resolved = resolve_targets(["127.0.0.1:5001", "localhost:5002"])
    assert resolved.replicas == ("ipv4:127.0.0.1:5001", "ipv4:127.0.0.1:5002")


def test_panic_routing_tries_an_ejected_replica_when_every_replica_in_rotation_fails() -> None:
    d, events, _ = detector(2, consecutive_local_failures=2, base_ejection_time=30.0)
    fail(d, 0, times=2)  # replica 0 ejected for 30 s
    assert d.ejected == 1 and not d.panic
    assert all(d.pick() == 1 for _ in range(1)) and d.replicas[1].in_flight == 1
    d.success(1)
    fail(d, 1, times=2)  # replica 1 dies too: cannot be ejected (50 %), it is held
    assert d.replicas[1].held and d.panic
    # A retry of a call that failed on replica 1 goes to the ejected replica 0 ...
    i = d.pick(avoid=1)
    assert i == 0
    # ... whose success puts it back into rotation and ends the panic.
    d.success(i)
    assert d.replicas[0].state == HEALTHY and not d.panic
    assert [(e.replica, e.ejected) for e in events] == [
        ("127.0.0.1:1", True),
        ("127.0.0.1:1", False),
    ]


def test_a_transient_error_on_the_replica_in_rotation_is_no_panic() -> None:
    d, _, _ = detector(2, consecutive_local_failures=2, base_ejection_time=30.0)
    fail(d, 0, times=2)  # replica 0 ejected (hung)
    fail(d, 1)  # one error on replica 1: suspect, not failing
    assert not d.panic
    busy = d.pick()
    assert busy == 1  # its one attempt in flight
    # The next call finds replica 1 busy: it still goes there, not to the hung replica.
    assert d.pick() == 1


def test_readmit_returns_an_ejected_replica_at_once() -> None:
    d, events, clock = detector(2, consecutive_local_failures=2, base_ejection_time=30.0)
    fail(d, 0, times=2)
    assert d.replicas[0].state == EJECTED
    clock.advance(1.0)
    assert d.readmit(0)
    assert d.replicas[0].state == HEALTHY and d.replicas[0].ejections == 1
    assert events[-1].reason == "health check: SERVING" and not events[-1].ejected
    assert not d.readmit(0)  # already in rotation: nothing to do
    assert sorted({d.pick() for _ in range(2)}) == [0, 1]


def test_breaker_excluded_replicas_are_never_picked() -> None:
    d, _, _ = detector(3)
    excluded = {d.replicas[0], d.replicas[2]}
    for _ in range(4):
        i = d.pick(exclude=excluded)
        assert i == 1
        d.release(i)
    assert d.pick(exclude=set(d.replicas)) == -1


def test_a_changed_replica_set_keeps_the_state_of_replicas_that_stay() -> None:
    d, _, _ = detector(2, consecutive_local_failures=2, base_ejection_time=30.0)
    fail(d, 1, times=2)
    kept = d.replicas[1]
    d.set_addresses(["127.0.0.1:2", "127.0.0.1:3"])
    assert d.addresses == ["127.0.0.1:2", "127.0.0.1:3"]
    assert d.replicas[0] is kept and kept.state == EJECTED
    assert d.max_ejected == 1
    # An attempt still in flight on a removed replica reports on the object it holds.
    removed = OutlierDetector("svc", ["127.0.0.1:9"], OutlierPolicy(), FakeClock()).replicas[0]
    removed.in_flight += 1
    d.failure(removed, OUTCOME_LOCAL)
    assert all(d.pick() == 1 for _ in range(1))
