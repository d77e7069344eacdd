"""The typed Foghorn client's request building: bad input fails before anything is sent."""

from __future__ import annotations

import pytest

from pkg.clients.foghorn import _locate, mode_value, parse_targets
from pkg.proto.foghorn.v1 import foghorn_pb2 as pb


@pytest.mark.parametrize("request_type", [pb.ViewerRouteRequest, pb.IngestRouteRequest])
def test_location_is_set_only_when_both_coordinates_are_given(request_type) -> None:
    located = request_type()
    _locate(located, 52.5, 13.4)
    assert (located.location.latitude, located.location.longitude) == (52.5, 13.4)
    unlocated = request_type()
    _locate(unlocated, None, None)
    assert not unlocated.HasField("location")


@pytest.mark.parametrize(("lat", "lon"), [(52.5, None), (None, 13.4)])
def test_half_a_location_is_refused(lat, lon) -> None:
    with pytest.raises(ValueError, match="both lat and lon"):
        _locate(pb.ViewerRouteRequest(), lat, lon)


def test_modes_and_targets_are_checked() -> None:
    assert mode_value("Draining") == pb.NODE_MODE_DRAINING
    with pytest.raises(ValueError, match="unknown mode 'asleep'"):
        mode_value("asleep")
    assert parse_targets(" 127.0.0.1:1, ,127.0.0.1:2") == ["127.0.0.1:1", "127.0.0.1:2"]
    with pytest.raises(ValueError, match="no Foghorn address"):
        parse_targets(" , ")
