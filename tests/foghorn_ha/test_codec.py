"""The record encoding shared by the Redis hash and the changelog."""

from __future__ import annotations

import dataclasses

import pytest

from api_balancing.model import GeoPoint, NodeMode
from api_balancing.store import redis_codec
from tests.foghorn_ha.conftest import make_record


def test_round_trip_keeps_every_field() -> None:
    record = dataclasses.replace(
        make_record("n1", cpu=33.5, fence=7, owner="a"),
        mode=NodeMode.DRAINING,
        mode_reason="maintenance window",
        connected=False,
        disconnected_at=12.5,
        reports_accepted=9,
        reports_rejected=2,
        last_rejection="report.cpu_percent: 140 is outside 0..100",
        version=11,
        extra={"k": "v"},
    )
    assert redis_codec.decode(redis_codec.encode(record)) == record


def test_a_changed_identity_is_encoded_again() -> None:
    record = make_record("n2")
    redis_codec.encode(record)
    moved = dataclasses.replace(
        record, identity=dataclasses.replace(record.identity, location=GeoPoint(1.0, 2.0))
    )
    assert redis_codec.decode(redis_codec.encode(moved)).identity.location == GeoPoint(1.0, 2.0)


@pytest.mark.parametrize("text", ["", "nope", "{}", '{"s": 99}', '{"s": 1, "id": "x"}', "[1, 2]"])
def test_malformed_input_is_a_value_error(text: str) -> None:
    with pytest.raises(ValueError):
        redis_codec.decode(text)
