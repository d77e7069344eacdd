"""The route index's cell search returns exactly what scoring every node returns: same nodes,
same order, same scores and distances to the bit, whatever the fleet, the viewer and the
changes since the last query (nodes without a location, the antimeridian, the poles, ties)."""

from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from api_balancing.index import FleetIndex, Ranked
from api_balancing.model import GeoPoint, NodeMode, NodeRecord
from api_balancing.scoring import Weights
from tests.foghorn.test_scoring import NOW, node

W = Weights()


def searching_index() -> FleetIndex:
    index = FleetIndex(W, redirect_bps=100.0, stale_after_s=90.0, initial_capacity=4)
    index.scan_max = 0  # always search the cells, however small the fleet
    index.scan_share = 1.0  # and however much of it the search would look at
    return index


def both(
    index: FleetIndex,
    where: GeoPoint | None,
    *,
    content: str = "c1",
    protocol: str = "",
    limit: int = 4,
    now: float = NOW,
) -> tuple[list[Ranked], list[Ranked]]:
    """(searched, scanned) answers to one query."""
    kw = {
        "content_id": content,
        "lat": where.latitude if where else None,
        "lon": where.longitude if where else None,
        "now": now,
        "role": "edge",
        "protocol": protocol,
        "limit": limit,
    }
    searched, _ = index.rank(**kw)  # type: ignore[arg-type]
    scanned, _ = index.rank(exhaustive=True, **kw)  # type: ignore[arg-type]
    return searched, scanned


# Latitudes and longitudes that stress the grid: the poles, the antimeridian from both sides,
# cell edges, and anywhere.
edge_lat = st.sampled_from([-90.0, -89.999, -45.0, -4.0, 0.0, 4.0, 88.0, 89.999, 90.0])
edge_lon = st.sampled_from([-180.0, -179.999, -178.0, -4.0, 0.0, 4.0, 178.0, 179.999, 180.0])
lats = st.one_of(edge_lat, st.floats(-90, 90, allow_nan=False))
lons = st.one_of(edge_lon, st.floats(-180, 180, allow_nan=False))
points = st.builds(GeoPoint, lats, lons)
ids = [f"n{i:02d}" for i in range(30)]
records = st.builds(
    node,
    node_id=st.sampled_from(ids),
    cpu=st.sampled_from([0.0, 10.0, 50.0, 99.0]),
    ram=st.sampled_from([(0, 100), (50, 100)]),
    up=st.sampled_from([0, 200, 900, 1000]),
    limit=st.sampled_from([0, 1000]),
    where=st.one_of(st.none(), points, st.sampled_from([GeoPoint(10.0, 10.0)])),
    streams=st.sampled_from([(), ("c1",), ("c2",), ("c1", "c2")]),
    mode=st.sampled_from([NodeMode.NORMAL, NodeMode.NORMAL, NodeMode.DRAINING]),
    connected=st.sampled_from([True, True, True, False]),
    age=st.sampled_from([0.0, 50.0, 95.0]),
    capacity=st.sampled_from([0, 100, 100]),
    caps=st.sampled_from([("hls",), ("webrtc",), ("hls", "webrtc")]),
)
changes = st.lists(st.one_of(records, st.sampled_from(ids)), max_size=30)  # a str: deleted


@settings(max_examples=300, deadline=None)
@given(
    fleet=st.lists(records, max_size=30),
    later=changes,
    viewers=st.lists(st.one_of(st.none(), points), min_size=1, max_size=3),
    protocol=st.sampled_from(["", "hls", "webrtc"]),
    content=st.sampled_from(["", "c1", "c2"]),
    limit=st.integers(1, 32),
    pending=st.dictionaries(st.sampled_from(ids), st.integers(0, 4)),
)
def test_cell_search_returns_exactly_what_the_full_scan_returns(
    fleet: list[NodeRecord],
    later: list[NodeRecord | str],
    viewers: list[GeoPoint | None],
    protocol: str,
    content: str,
    limit: int,
    pending: dict[str, int],
) -> None:
    index = searching_index()
    for rec in fleet:
        index.update(rec.node_id, rec)
    searched, scanned = both(index, viewers[0], content=content, protocol=protocol, limit=limit)
    assert searched == scanned
    # Changes after a query patch the cached columns and cell maxima in place: nodes move,
    # leave, report, get pending redirects, go stale.
    for change in later:
        if isinstance(change, str):
            index.update(change, None)
        else:
            index.update(change.node_id, change)
    for node_id, count in pending.items():
        index.set_pending(node_id, count)
    for where in viewers:
        for now in (NOW, NOW + 60.0):
            searched, scanned = both(
                index, where, content=content, protocol=protocol, limit=limit, now=now
            )
            assert searched == scanned


def test_cell_search_matches_the_scan_on_a_large_clustered_fleet() -> None:
    rng = random.Random(7)
    cities = [(48.86, 2.35), (51.51, -0.13), (40.71, -74.01), (-33.87, 151.21), (64.1, -21.9),
              (-54.8, -68.3), (1.35, 103.82), (0.0, 179.9), (0.0, -179.9)]  # fmt: skip
    index = searching_index()
    for i in range(3000):
        lat, lon = rng.choice(cities)
        where = (
            None
            if i % 97 == 0
            else GeoPoint(
                max(-90.0, min(90.0, lat + rng.uniform(-1.5, 1.5))),
                (lon + rng.uniform(-1.5, 1.5) + 180.0) % 360.0 - 180.0,
            )
        )
        streams = tuple(f"s{rng.randrange(200)}" for _ in range(3))
        index.update(f"n{i:04d}", node(f"n{i:04d}", cpu=rng.uniform(0, 95), up=rng.randrange(900),
                                       where=where, streams=streams))  # fmt: skip
    for q in range(300):
        if q % 50 == 0:  # reports move bases (and cell maxima) between queries
            for i in rng.sample(range(3000), 300):
                index.update(f"n{i:04d}", node(f"n{i:04d}", cpu=rng.uniform(0, 95),
                                               where=GeoPoint(*rng.choice(cities))))  # fmt: skip
        lat, lon = rng.choice(cities)
        where = GeoPoint(lat + rng.uniform(-3, 3), lon) if q % 10 else None
        searched, scanned = both(index, where, content=f"s{rng.randrange(220)}",
                                 limit=rng.choice([1, 4, 17]))  # fmt: skip
        assert searched == scanned


def test_the_nearest_node_across_the_antimeridian_wins() -> None:
    index = searching_index()
    index.update("east", node("east", where=GeoPoint(0.0, 179.9)))
    index.update("far", node("far", where=GeoPoint(0.0, 170.0)))
    index.update("west", node("west", where=GeoPoint(0.0, -179.95)))
    searched, scanned = both(index, GeoPoint(0.0, -179.99), limit=3)
    assert searched == scanned
    assert [r.node_id for r in searched] == ["west", "east", "far"]
    assert searched[0].distance_km < 10 and searched[1].distance_km < 15


def test_near_the_pole_every_longitude_is_close() -> None:
    index = searching_index()
    for i, lon in enumerate((-180.0, -90.0, 0.0, 90.0, 179.0)):
        index.update(f"p{i}", node(f"p{i}", where=GeoPoint(89.9, lon)))
    index.update("south", node("south", where=GeoPoint(80.0, 0.0)))
    searched, scanned = both(index, GeoPoint(90.0, 0.0), limit=6)
    assert searched == scanned
    assert [r.node_id for r in searched] == ["p0", "p1", "p2", "p3", "p4", "south"]


def test_equal_scores_are_ordered_by_node_id_in_the_search_too() -> None:
    index = searching_index()
    for name in ("d", "b", "c", "a", "e"):
        index.update(name, node(name, where=GeoPoint(10.0, 10.0)))
    index.update("z", node("z", where=None))
    searched, scanned = both(index, GeoPoint(12.0, 11.0), content="", limit=3)
    assert searched == scanned
    assert [r.node_id for r in searched] == ["a", "b", "c"]


def test_nodes_without_a_location_compete_on_load_alone() -> None:
    index = searching_index()
    index.update("nowhere", node("nowhere", where=None))
    index.update("far", node("far", where=GeoPoint(-48.0, -178.0)))
    index.update("busy-near", node("busy-near", where=GeoPoint(48.9, 2.4), cpu=99.0))
    for where in (GeoPoint(48.86, 2.35), None):
        searched, scanned = both(index, where, content="", limit=3)
        assert searched == scanned
    # No viewer location: no geo weight for anyone, so the idle nodes tie (id order).
    searched, _ = both(index, None, content="", limit=3)
    assert [r.node_id for r in searched] == ["far", "nowhere", "busy-near"]
    assert searched[0].score == searched[1].score


def test_a_moved_node_is_found_in_its_new_cell() -> None:
    index = searching_index()
    index.update("a", node("a", where=GeoPoint(48.86, 2.35)))
    index.update("b", node("b", where=GeoPoint(40.71, -74.01)))
    assert both(index, GeoPoint(-33.87, 151.21), limit=1)[0][0].node_id in {"a", "b"}
    index.update("a", node("a", where=GeoPoint(-33.8, 151.2)))  # re-registered elsewhere
    searched, scanned = both(index, GeoPoint(-33.87, 151.21), limit=1)
    assert searched == scanned and searched[0].node_id == "a"
    index.update("a", None)
    searched, scanned = both(index, GeoPoint(-33.87, 151.21), limit=2)
    assert searched == scanned and [r.node_id for r in searched] == ["b"]


def test_a_node_at_the_corner_of_its_cell_next_to_the_viewer_is_not_pruned() -> None:
    # Cells are 4 degree boxes: "corner" sits at the corner of [50, 54) x [0, 4), the viewer
    # just across it in the next cell, "local" shares the viewer's cell 100 km away with a
    # slightly better load. The corner node's cell centre is 250 km away: only the radius of
    # its cap keeps it in the search.
    index = searching_index()
    index.update("corner", node("corner", cpu=0.5, where=GeoPoint(53.999, 3.999)))
    index.update("local", node("local", cpu=0.0, where=GeoPoint(54.9, 4.5)))
    for i in range(6):  # the rest of the corner's cell, busy, at its centre
        index.update(f"mid{i}", node(f"mid{i}", cpu=90.0, where=GeoPoint(52.0, 2.0)))
    searched, scanned = both(index, GeoPoint(54.001, 4.001), content="", limit=2)
    assert searched == scanned
    assert [r.node_id for r in searched] == ["corner", "local"]


near_corner = st.builds(GeoPoint, st.floats(47.0, 53.0), st.floats(-1.0, 5.0))


@settings(max_examples=300, deadline=None)
@given(
    fleet=st.lists(
        st.builds(node, node_id=st.sampled_from(ids), cpu=st.floats(0.0, 20.0), where=near_corner),
        min_size=1,
        max_size=30,
    ),
    where=near_corner,
    limit=st.integers(1, 5),
)
def test_cell_search_is_exact_for_close_calls_across_cell_edges(
    fleet: list[NodeRecord], where: GeoPoint, limit: int
) -> None:
    # Loads within a few points of each other and distances of tens of km: the geo penalty
    # decides, and every cap bound is tight.
    index = searching_index()
    for rec in fleet:
        index.update(rec.node_id, rec)
    searched, scanned = both(index, where, content="", limit=limit)
    assert searched == scanned


def test_a_default_index_answers_like_the_scan_above_the_scan_size() -> None:
    # Past scan_max the default index searches, or scans when the cells cannot narrow the
    # query down (a fleet in one metro): the answer is the same either way.
    rng = random.Random(11)
    index = FleetIndex(W, redirect_bps=100.0, stale_after_s=90.0)
    for i in range(index.scan_max + 200):
        lat, lon = (48.86, 2.35) if i % 2 else rng.choice([(40.71, -74.01), (1.35, 103.82)])
        where = GeoPoint(lat + rng.uniform(-0.5, 0.5), lon + rng.uniform(-0.5, 0.5))
        index.update(f"n{i:04d}", node(f"n{i:04d}", cpu=rng.uniform(0, 95), where=where))
    for lat, lon in ((48.9, 2.3), (40.7, -74.0), (-33.9, 151.2), (90.0, 0.0)):
        searched, scanned = both(index, GeoPoint(lat, lon), content="", limit=4)
        assert searched == scanned
