"""The pure pipeline: decode, validate, expand batches, classify, redact; poison verdicts."""

from __future__ import annotations

import json

import pytest

from pkg.events import Event
from pkg.events.envelope import EnvelopeError, decode_record, encode_batch, encode_event
from signalman.channels import ALL, SYSTEM, check_subscribable, classify, matches
from signalman.pipeline import Poison, Processed, process_record
from signalman.redact import redact


def test_event_round_trips_through_the_envelope() -> None:
    ev = Event("stream.started", "acme", {"stream": "s1"}, source="foghorn")
    (back,) = decode_record(encode_event(ev), b"acme")
    assert back == ev


def test_batch_expands_in_order() -> None:
    events = [Event("stream.started", "acme", {"n": i}) for i in range(5)]
    result = process_record(encode_batch(events), b"acme")
    assert isinstance(result, Processed)
    assert [e.data["n"] for _, e in result.items] == [0, 1, 2, 3, 4]
    assert {c for c, _ in result.items} == {"streams"}


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        (b"\x00\xffgarbage", "not JSON"),
        (b"[1, 2]", "expected a JSON object"),
        (b'{"v": 1, "type": "stream.started", "id": "x"}', "tenant: missing"),
        (b'{"type": "stream.started", "tenant": "a", "id": "x"}', "envelope.v"),
        (b'{"v": 1, "type": "Stream Started", "tenant": "a", "id": "x"}', "dotted event type"),
        (b'{"v": 1, "type": "stream.started", "tenant": "a b", "id": "x"}', "not a valid tenant"),
        (b'{"v": 1, "type": "stream.started", "tenant": "a", "id": "x", "data": []}', "data"),
        (b'{"v": 1, "type": "weather.rain", "tenant": "a", "id": "x"}', "no channel"),
        (b'{"v": 1, "batch": []}', "non-empty list"),
    ],
)
def test_malformed_records_are_poison_with_a_reason(value: bytes, reason: str) -> None:
    result = process_record(value, None)
    assert isinstance(result, Poison)
    assert reason in result.reason
    assert not result.retryable


def test_newer_schema_version_is_retryable_poison() -> None:
    raw = {"v": 1, "type": "stream.started", "tenant": "a", "id": "x", "schema_version": 9}
    result = process_record(json.dumps(raw).encode(), b"a")
    assert isinstance(result, Poison) and result.retryable


def test_batch_mixing_tenants_is_poison() -> None:
    value = encode_batch([Event("stream.started", "a", {}), Event("stream.started", "b", {})])
    with pytest.raises(EnvelopeError, match="mixes tenants"):
        decode_record(value)


def test_record_key_must_match_tenant() -> None:
    result = process_record(encode_event(Event("stream.started", "acme", {})), b"globex")
    assert isinstance(result, Poison) and "key" in result.reason


def test_system_events_go_to_the_system_channel_only() -> None:
    assert classify("node.registered", "system") == SYSTEM
    assert classify("node.registered", "acme") == "nodes"
    assert matches(ALL, "streams") and not matches(ALL, SYSTEM)
    assert check_subscribable(SYSTEM, frozenset({"reader"})) is not None
    assert check_subscribable(SYSTEM, frozenset({"system"})) is None
    problem = check_subscribable("bogus", frozenset())
    assert problem is not None and problem[0] == "INVALID_ARGUMENT"


def test_redaction_hides_secrets_and_truncates_addresses() -> None:
    data = {
        "password": "p",
        "nested": {"Authorization": "Bearer x", "list": [{"api_key": "k"}]},
        "viewer_ip": "198.51.100.23",
        "client_addr": "2001:db8::1",
        "node": "edge-1",
    }
    out = redact(data)
    assert out["password"] == "[redacted]"
    assert out["nested"]["Authorization"] == "[redacted]"
    assert out["nested"]["list"][0]["api_key"] == "[redacted]"
    assert out["viewer_ip"] == "198.51.100.0/24"
    assert out["client_addr"] == "2001:db8::/48"
    assert out["node"] == "edge-1"
    assert data["password"] == "p"  # the input is not modified
