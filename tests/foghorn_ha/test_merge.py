"""Merge rules for a record from another replica (pure logic, no Redis)."""

from __future__ import annotations

from api_balancing.model import GeoPoint, NodeIdentity, NodeRecord
from api_balancing.store import merge, redis_codec


def _identity(**changes: object) -> NodeIdentity:
    fields: dict[str, object] = {
        "node_id": "edge-1",
        "roles": frozenset({"edge"}),
        "capabilities": frozenset({"hls"}),
        "base_url": "http://10.0.0.1:8080",
        "location": GeoPoint(52.37, 4.9),
        "capacity": 100,
        "region": "eu",
    }
    fields.update(changes)
    return NodeIdentity(**fields)  # type: ignore[arg-type]


def test_a_remote_record_with_the_same_identity_keeps_the_local_identity_object() -> None:
    local = NodeRecord(identity=_identity(), version=1)
    # As a peer's record arrives: decoded, so every field is a new object of equal value.
    remote = redis_codec.decode(redis_codec.encode(NodeRecord(identity=_identity(), version=2)))
    kept = merge.merge(local, remote)
    assert kept.identity is local.identity
    assert kept.version == 2 and kept == NodeRecord(identity=local.identity, version=2)


def test_blank_identity_fields_of_a_remote_record_are_filled_from_the_local_one() -> None:
    local = NodeRecord(identity=_identity(), version=1)
    remote = NodeRecord(identity=_identity(location=None, region="", capacity=0), version=2)
    kept = merge.merge(local, remote)
    assert kept.identity == _identity()
    assert kept.version == 2


def test_a_remote_identity_that_changed_wins_over_the_local_one() -> None:
    local = NodeRecord(identity=_identity(), version=1)
    remote = NodeRecord(identity=_identity(base_url="http://10.0.0.2:8080"), version=2)
    kept = merge.merge(local, remote)
    assert kept.identity.base_url == "http://10.0.0.2:8080"
    assert kept.identity.location == GeoPoint(52.37, 4.9)
