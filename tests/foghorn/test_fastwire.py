"""The cached-fragment reply encoder produces exactly the message the field-by-field builder
does, for any node, content id, protocol, score and location."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from api_balancing import convert, fastwire
from api_balancing.index import Ranked
from api_balancing.model import GeoPoint, NodeIdentity, NodeRecord
from api_balancing.validation import VIEWER_PROTOCOLS
from pkg.proto.foghorn.v1 import foghorn_pb2 as pb

ids = st.from_regex(r"[A-Za-z0-9._:-]{1,128}", fullmatch=True)
contents = st.from_regex(r"[A-Za-z0-9._:/-]{1,256}", fullmatch=True)
identities = st.builds(
    NodeIdentity,
    node_id=ids,
    roles=st.just(frozenset({"edge"})),
    capabilities=st.frozensets(st.sampled_from(VIEWER_PROTOCOLS)),
    base_url=st.from_regex(r"https?://[a-z0-9.]{1,200}(:[0-9]{1,5})?", fullmatch=True),
    location=st.none(),
    capacity=st.just(10),
    region=st.text(max_size=64),
)
numbers = st.floats(allow_nan=False, allow_infinity=False, width=64)


@settings(max_examples=300, deadline=None)
@given(
    nodes=st.lists(st.tuples(identities, numbers, numbers), min_size=1, max_size=17),
    content=contents,
    protocol=st.sampled_from(["", *VIEWER_PROTOCOLS]),
    location=st.one_of(st.none(), st.builds(GeoPoint, numbers, numbers)),
    considered=st.integers(0, 2**31 - 1),
)
def test_fast_reply_equals_the_field_by_field_reply(
    nodes: list[tuple[NodeIdentity, float, float]],
    content: str,
    protocol: str,
    location: GeoPoint | None,
    considered: int,
) -> None:
    raw = fastwire.content_bytes(content)
    fast = fastwire.viewer_reply(
        [fastwire.candidate(ident, score, dist, raw, protocol) for ident, score, dist in nodes],
        location,
        considered,
    )
    built = [
        convert.candidate(Ranked(i.node_id, s, d), NodeRecord(identity=i), content, protocol)
        for i, s, d in nodes
    ]
    reference = pb.ViewerRouteResponse(best=built[0], fallbacks=built[1:], considered=considered)
    if location is not None:
        reference.viewer_location.CopyFrom(convert.geo(location))
    assert fast == reference
    assert fast.SerializeToString(deterministic=True) == reference.SerializeToString(
        deterministic=True
    )
