"""The record encoding shared by the Redis hash and the changelog."""

from __future__ import annotations

import dataclasses
import json

import pytest

from api_balancing.model import GeoPoint, NodeMode, NodeRecord, StreamLoad
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


def _generic(record: NodeRecord) -> object:
    """What the generic JSON encoder writes for the fields after the identity."""
    doc = {"report": redis_codec._report(record.report), **redis_codec._rest(record)}
    return json.loads(redis_codec._ENCODER.encode(doc))


@pytest.mark.parametrize(
    "text", ["plain", 'quote"and\\slash', "caf\u00e9 \u2603", "line\nbreak", ""]
)
def test_the_direct_encoding_writes_what_the_generic_encoder_writes(text: str) -> None:
    base = make_record("n3", cpu=12.25, owner=text, fence=4)
    assert base.report is not None
    record = dataclasses.replace(
        base,
        report=dataclasses.replace(
            base.report, streams=(StreamLoad(text, "t\u00fcnant", 3, 1, 2_000_000_000_000),)
        ),
        mode_reason=text,
        last_rejection=text,
        connected=False,
        disconnected_at=5.5,
        extra={text: text},
    )
    doc = json.loads(redis_codec.encode(record))
    assert {k: v for k, v in doc.items() if k == "report" or k in redis_codec._rest(record)} == (
        _generic(record)
    )
    assert redis_codec.decode(redis_codec.encode(record)) == record


def test_fields_of_unexpected_types_take_the_generic_encoder() -> None:
    # e.g. integer timestamps from a test clock: still valid JSON, still the same record
    record = dataclasses.replace(make_record("n6"), last_report_at=17, connected_at=3)
    doc = json.loads(redis_codec.encode(record))
    assert (doc["report_at"], doc["connected_at"]) == (17, 3)
    assert redis_codec.decode(redis_codec.encode(record)).last_report_at == 17.0


@pytest.mark.parametrize("field", ["last_report_at", "connected_at", "disconnected_at"])
def test_a_non_finite_timestamp_is_refused_not_written(field: str) -> None:
    record = dataclasses.replace(make_record("n7"), **{field: float("inf")})
    with pytest.raises(ValueError):
        redis_codec.encode(record)


@pytest.mark.parametrize("cpu", [float("nan"), float("inf"), float("-inf")])
def test_a_non_finite_report_value_is_refused_not_written(cpu: float) -> None:
    base = make_record("n4")
    assert base.report is not None
    record = dataclasses.replace(base, report=dataclasses.replace(base.report, cpu_percent=cpu))
    with pytest.raises(ValueError):
        redis_codec.encode(record)


def test_a_record_without_a_report_round_trips() -> None:
    record = dataclasses.replace(make_record("n5"), report=None)
    assert redis_codec.decode(redis_codec.encode(record)) == record


@pytest.mark.parametrize("streams", [0, 1, 3])
def test_a_decoded_report_carries_the_derived_attributes_of_its_streams(streams: int) -> None:
    base = make_record("n6")
    assert base.report is not None
    loads = tuple(
        StreamLoad(f"live-{i}", f"t{i % 2}", viewers=i + 4, inputs=1) for i in range(streams)
    )
    record = dataclasses.replace(base, report=dataclasses.replace(base.report, streams=loads))
    report = redis_codec.decode(redis_codec.encode(record)).report
    assert report is not None and report == record.report
    assert report.stream_ids == tuple(s.stream_id for s in loads)
    assert report.tenant_ids == tuple(s.tenant_id for s in loads)
    assert report.viewers == sum(s.viewers for s in loads)
