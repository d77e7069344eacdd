"""Scoring specification: each weight, the stream bonus, the redirect penalty, every rejection
reason and the tie-break; and the vectorised index agrees with the reference scorer."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from api_balancing.index import FleetIndex
from api_balancing.model import GeoPoint, LoadReport, NodeIdentity, NodeMode, NodeRecord, StreamLoad
from api_balancing.scoring import (
    HALF_EARTH_CIRCUMFERENCE_KM,
    Rejection,
    RouteQuery,
    Weights,
    evaluate,
    great_circle_km,
    rank,
)

NOW = 10_000.0
W = Weights()
PARIS = GeoPoint(48.8566, 2.3522)
LONDON = GeoPoint(51.5074, -0.1278)


def node(
    node_id: str = "n1",
    *,
    cpu: float = 0.0,
    ram: tuple[int, int] = (0, 100),
    up: int = 0,
    limit: int = 1000,
    where: GeoPoint | None = PARIS,
    streams: tuple[str, ...] = (),
    mode: NodeMode = NodeMode.NORMAL,
    connected: bool = True,
    age: float = 1.0,
    capacity: int = 100,
    roles: tuple[str, ...] = ("edge",),
    caps: tuple[str, ...] = ("hls",),
    viewers: int = 0,
) -> NodeRecord:
    report = LoadReport(
        cpu_percent=cpu,
        ram_used_bytes=ram[0],
        ram_max_bytes=ram[1],
        upload_bps=up,
        download_bps=0,
        bandwidth_limit_bps=limit,
        streams=tuple(StreamLoad(s, "t", viewers) for s in streams),
    )
    ident = NodeIdentity(
        node_id, frozenset(roles), frozenset(caps), f"http://{node_id}", where, capacity
    )
    return NodeRecord(
        identity=ident, mode=mode, report=report, last_report_at=NOW - age, connected=connected
    )


def query(content: str = "c1", where: GeoPoint | None = PARIS, **kw: object) -> RouteQuery:
    return RouteQuery(content_id=content, location=where, now=NOW, stale_after_s=90.0, **kw)  # type: ignore[arg-type]


def test_idle_node_at_the_viewer_scores_every_weight_in_full() -> None:
    e = evaluate(node(), query(), W)
    assert e.eligible
    assert e.parts.cpu == 500 and e.parts.ram == 500 and e.parts.bandwidth == 1000
    assert e.parts.geo == 1000 and e.parts.stream_bonus == 0
    assert e.score == 3000


def test_cpu_weight_scales_with_cpu_load() -> None:
    assert evaluate(node(cpu=50), query(), W).parts.cpu == 250
    assert evaluate(node(cpu=50), query(), Weights(cpu=100)).parts.cpu == 50


def test_ram_weight_scales_with_ram_use() -> None:
    assert evaluate(node(ram=(25, 100)), query(), W).parts.ram == 375
    assert evaluate(node(ram=(25, 100)), query(), Weights(ram=0)).parts.ram == 0


def test_bandwidth_weight_scales_with_upload_over_limit() -> None:
    assert evaluate(node(up=400, limit=1000), query(), W).parts.bandwidth == 600


def test_geo_weight_falls_linearly_with_great_circle_distance() -> None:
    e = evaluate(node(where=LONDON), query(where=PARIS), W)
    assert 340 < e.distance_km < 346  # Paris - London is about 343 km
    assert abs(e.parts.geo - 1000 * (1 - e.distance_km / HALF_EARTH_CIRCUMFERENCE_KM)) < 1e-9
    antipode = evaluate(node(where=GeoPoint(-48.8566, -177.6478)), query(where=PARIS), W)
    assert antipode.parts.geo < 1e-6


def test_unknown_viewer_location_makes_geography_neutral() -> None:
    e = evaluate(node(where=LONDON), query(where=None), W)
    assert e.parts.geo == 0 and e.distance_km == -1


def test_great_circle_distance_is_symmetric_and_zero_on_the_same_point() -> None:
    assert great_circle_km(PARIS, PARIS) == 0
    assert abs(great_circle_km(PARIS, LONDON) - great_circle_km(LONDON, PARIS)) < 1e-9


def test_node_carrying_the_stream_gets_the_bonus() -> None:
    with_stream = evaluate(node(streams=("c1",)), query("c1"), W)
    without = evaluate(node(streams=("other",)), query("c1"), W)
    assert with_stream.parts.stream_bonus == 50 and without.parts.stream_bonus == 0
    assert with_stream.score - without.score == 50


def test_pending_redirects_count_as_bandwidth_taken() -> None:
    e = evaluate(node(up=0, limit=1000), query(), W, pending_redirects=2, redirect_bps=100)
    assert e.parts.redirect_penalty_bps == 200
    assert e.parts.bandwidth == 800


def test_pending_redirects_that_fill_the_link_reject_the_node() -> None:
    e = evaluate(node(up=500, limit=1000), query(), W, pending_redirects=5, redirect_bps=100)
    assert e.rejection is Rejection.NO_BANDWIDTH


def test_rejects_maintenance_and_draining_nodes() -> None:
    assert evaluate(node(mode=NodeMode.MAINTENANCE), query(), W).rejection is Rejection.MAINTENANCE
    assert evaluate(node(mode=NodeMode.DRAINING), query(), W).rejection is Rejection.DRAINING


def test_rejects_stale_nodes_and_nodes_without_a_report() -> None:
    stale = evaluate(node(age=91), query(), W)
    assert stale.rejection is Rejection.STALE and "91.0 s ago" in stale.reason
    assert evaluate(node(age=89), query(), W).eligible
    no_report = dataclasses.replace(node(), report=None)
    assert evaluate(no_report, query(), W).rejection is Rejection.STALE


def test_rejects_nodes_lacking_the_role_or_protocol() -> None:
    assert evaluate(node(roles=("ingest",)), query(), W).rejection is Rejection.NO_CAPABILITY
    e = evaluate(node(caps=("hls",)), query(protocol="webrtc"), W)
    assert e.rejection is Rejection.NO_CAPABILITY and "webrtc" in e.reason


def test_rejects_nodes_out_of_bandwidth_or_full() -> None:
    assert evaluate(node(up=1000, limit=1000), query(), W).rejection is Rejection.NO_BANDWIDTH
    full = evaluate(node(streams=("a",), viewers=100, capacity=100), query(), W)
    assert full.rejection is Rejection.NO_BANDWIDTH


def test_rejects_nodes_with_zero_capacity() -> None:
    assert evaluate(node(capacity=0), query(), W).rejection is Rejection.CAPACITY_ZERO
    assert evaluate(node(limit=0), query(), W).rejection is Rejection.CAPACITY_ZERO


def test_rejects_disconnected_nodes() -> None:
    assert evaluate(node(connected=False), query(), W).rejection is Rejection.DISCONNECTED


def test_ties_are_broken_by_node_id() -> None:
    evals = [evaluate(node(i), query(), W) for i in ("c", "a", "b")]
    assert [e.node_id for e in rank(evals)] == ["a", "b", "c"]


def test_less_loaded_node_ranks_first() -> None:
    evals = [evaluate(node("busy", cpu=90), query(), W), evaluate(node("idle", cpu=5), query(), W)]
    assert [e.node_id for e in rank(evals)] == ["idle", "busy"]


# -- the vectorised index is the same function ------------------------------------------------

coords = st.tuples(st.floats(-90, 90, allow_nan=False), st.floats(-180, 180, allow_nan=False)).map(
    lambda p: GeoPoint(*p)
)
records = st.builds(
    node,
    node_id=st.sampled_from([f"n{i}" for i in range(12)]),
    cpu=st.sampled_from([0.0, 10.0, 50.0, 99.0]),
    ram=st.sampled_from([(0, 100), (50, 100), (99, 100)]),
    up=st.sampled_from([0, 200, 900, 1000]),
    limit=st.sampled_from([0, 1000]),
    where=st.one_of(st.none(), coords),
    streams=st.sampled_from([(), ("c1",), ("c2",), ("c1", "c2")]),
    mode=st.sampled_from(list(NodeMode)),
    connected=st.booleans(),
    age=st.sampled_from([0.0, 50.0, 95.0]),
    capacity=st.sampled_from([0, 5, 100]),
    roles=st.sampled_from([("edge",), ("ingest",), ("edge", "ingest")]),
    caps=st.sampled_from([("hls",), ("webrtc",), ("hls", "webrtc")]),
    viewers=st.sampled_from([0, 3]),
)


@settings(max_examples=150, deadline=None)
@given(
    fleet=st.lists(records, max_size=12, unique_by=lambda r: r.node_id),
    where=st.one_of(st.none(), coords),
    protocol=st.sampled_from(["", "hls", "webrtc"]),
    pending=st.dictionaries(st.sampled_from([f"n{i}" for i in range(12)]), st.integers(0, 4)),
)
def test_index_ranks_exactly_like_the_reference_scorer(
    fleet: list[NodeRecord], where: GeoPoint | None, protocol: str, pending: dict[str, int]
) -> None:
    index = FleetIndex(W, redirect_bps=100.0, stale_after_s=90.0, initial_capacity=2)
    for rec in fleet[: len(fleet) // 2]:
        index.update(rec.node_id, rec)
    # Query once early, so the later updates patch cached views instead of building them.
    index.rank(content_id="c1", lat=None, lon=None, now=NOW, role="edge", protocol=protocol,
               limit=3)  # fmt: skip
    for rec in fleet[len(fleet) // 2 :]:
        index.update(rec.node_id, rec)
    for node_id, count in pending.items():
        index.set_pending(node_id, count)
    got, _ = index.rank(
        content_id="c1",
        lat=where.latitude if where else None,
        lon=where.longitude if where else None,
        now=NOW,
        role="edge",
        protocol=protocol,
        limit=len(fleet) + 1,
    )
    q = query("c1", where, protocol=protocol)
    want = rank(evaluate(r, q, W, pending.get(r.node_id, 0), 100.0) for r in fleet)
    assert {r.node_id for r in got} == {e.node_id for e in want}
    by_id = {e.node_id: e for e in want}
    for g, w in zip(got, want, strict=True):
        # Same score (to float rounding of arccos vs haversine: far below a point) and the
        # same order, except where two scores are equal up to that rounding.
        assert abs(g.score - by_id[g.node_id].score) < 1e-3
        assert g.node_id == w.node_id or abs(g.score - w.score) < 1e-3
        if by_id[g.node_id].distance_km >= 0:
            assert abs(g.distance_km - by_id[g.node_id].distance_km) < 0.01


def test_index_forgets_deleted_nodes_and_reuses_their_slots() -> None:
    index = FleetIndex(W)
    index.update("a", node("a", streams=("c1",)))
    index.update("b", node("b"))
    index.update("a", None)
    assert index.carriers("c1") == 0
    index.update("c", node("c"))
    got, considered = index.rank(
        content_id="c1", lat=None, lon=None, now=NOW, role="edge",
        protocol="", limit=5,
    )  # fmt: skip
    assert considered == 2 and [r.node_id for r in got] == ["b", "c"]


def test_index_top_k_keeps_ties_at_the_cut_in_id_order() -> None:
    index = FleetIndex(W)
    for i in reversed(range(40)):  # slots in the opposite order of ids
        index.update(f"n{i:02d}", node(f"n{i:02d}"))
    got, _ = index.rank(
        content_id="", lat=None, lon=None, now=NOW, role="edge",
        protocol="", limit=3,
    )  # fmt: skip
    assert [r.node_id for r in got] == ["n00", "n01", "n02"]


def test_index_handles_the_same_point_and_the_antipode_without_nan() -> None:
    index = FleetIndex(W)
    index.update("here", node("here", where=PARIS))
    index.update(
        "antipode", node("antipode", where=GeoPoint(-PARIS.latitude, PARIS.longitude - 180))
    )
    got, _ = index.rank(
        content_id="", lat=PARIS.latitude, lon=PARIS.longitude, now=NOW, role="edge",
        protocol="", limit=2,
    )  # fmt: skip
    here, antipode = got
    assert here.node_id == "here" and here.distance_km < 0.01 and here.score == pytest.approx(3000)
    assert antipode.node_id == "antipode"
    assert antipode.distance_km == pytest.approx(HALF_EARTH_CIRCUMFERENCE_KM, abs=0.01)
    assert antipode.score == pytest.approx(2000, abs=1e-3)


def test_index_knows_a_streams_tenant_only_while_some_node_carries_it() -> None:
    index = FleetIndex(W)
    index.update("a", node("a", streams=("c1",)))
    index.update("b", node("b", streams=("c1", "c2")))
    assert index.tenant_of("c1") == "t" and index.carriers("c1") == 2
    index.update("b", node("b", streams=()))
    assert index.tenant_of("c2") is None and index.tenant_of("c1") == "t"
    index.update("a", None)
    assert index.tenant_of("c1") is None and index.carriers("c1") == 0
