"""Routing replies assembled from cached wire fragments (the RouteViewer hot path).

A viewer reply holds up to 17 candidates with a playback URL per protocol each; building
those as protobuf objects field by field costs more than the routing decision itself (about
7 us per candidate). Most of a candidate never changes between requests: the node's id, base
URL and region, and its URL templates per protocol. So each node's fragment is encoded once,
and a reply is the concatenation of fragments plus the per-request parts (content id in the
URLs, score, distance), parsed back into a ``ViewerRouteResponse`` in one C call.

This follows the protobuf wire format (length-delimited fields, fixed64 doubles, varints)
for exactly the messages below; ``tests/foghorn/test_fastwire.py`` checks it against the
field-by-field builder (``convert.candidate``) on random inputs, so a change to those
messages in the .proto that is not mirrored here fails the tests.
"""

from __future__ import annotations

import re
import struct
from functools import lru_cache

from api_balancing.model import GeoPoint, NodeIdentity
from api_balancing.urls import playback_templates, quoted
from pkg.proto.foghorn.v1 import foghorn_pb2 as pb

_double = struct.Struct("<d").pack
_URL_SAFE = re.compile(r"[A-Za-z0-9._:/-]*")

# Tags: (field number << 3) | wire type (0 varint, 1 fixed64, 2 length-delimited).
_CAND_NODE_ID, _CAND_BASE_URL, _CAND_URLS, _CAND_REGION = b"\x0a", b"\x12", b"\x1a", b"\x32"
_CAND_SCORE, _CAND_DISTANCE = b"\x21", b"\x29"
_URL_PROTOCOL, _URL_URL = b"\x0a", b"\x12"
_RESP_BEST, _RESP_FALLBACKS, _RESP_LOCATION, _RESP_CONSIDERED = b"\x0a", b"\x12", b"\x1a", b"\x20"
_GEO_LAT, _GEO_LON = b"\x09", b"\x11"


def _varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _field(tag: bytes, payload: bytes) -> bytes:
    """A length-delimited field (string, bytes or sub-message)."""
    n = len(payload)
    return tag + (bytes((n,)) if n < 0x80 else _varint(n)) + payload


def _string(tag: bytes, text: str) -> bytes:
    return _field(tag, text.encode()) if text else b""


@lru_cache(maxsize=16384)
def _node_fragment(node_id: str, base_url: str, region: str) -> bytes:
    return (
        _string(_CAND_NODE_ID, node_id)
        + _string(_CAND_BASE_URL, base_url)
        + _string(_CAND_REGION, region)
    )


@lru_cache(maxsize=16384)
def _url_parts(
    base_url: str, capabilities: frozenset[str], protocol: str
) -> tuple[tuple[bytes, bytes, bytes], ...]:
    """Per playable protocol: (encoded protocol field, URL prefix, URL suffix)."""
    return tuple(
        (_string(_URL_PROTOCOL, proto), prefix.encode(), suffix.encode())
        for proto, prefix, suffix in playback_templates(base_url, capabilities, protocol)
    )


def candidate(
    ident: NodeIdentity, score: float, distance_km: float, content: bytes, protocol: str
) -> bytes:
    """One encoded RouteCandidate; ``content`` is the URL-quoted content id as bytes."""
    parts = [_node_fragment(ident.node_id, ident.base_url, ident.region)]
    for proto_field, prefix, suffix in _url_parts(ident.base_url, ident.capabilities, protocol):
        url = prefix + content + suffix
        n = len(url)  # _field inlined twice (four calls per candidate, four candidates a reply)
        entry = proto_field + _URL_URL + (bytes((n,)) if n < 0x80 else _varint(n)) + url
        n = len(entry)
        parts.append(_CAND_URLS + (bytes((n,)) if n < 0x80 else _varint(n)) + entry)
    parts.append(_CAND_SCORE + _double(score) + _CAND_DISTANCE + _double(distance_km))
    return b"".join(parts)


def viewer_reply(
    candidates: list[bytes], location: GeoPoint | None, considered: int
) -> pb.ViewerRouteResponse:
    """The ViewerRouteResponse made of encoded candidates (best first)."""
    parts = [_field(_RESP_BEST, candidates[0])]
    parts.extend(_field(_RESP_FALLBACKS, c) for c in candidates[1:])
    if location is not None:
        geo = _GEO_LAT + _double(location.latitude) + _GEO_LON + _double(location.longitude)
        parts.append(_field(_RESP_LOCATION, geo))
    if considered:
        parts.append(_RESP_CONSIDERED + _varint(considered))
    return pb.ViewerRouteResponse.FromString(b"".join(parts))


def content_bytes(content_id: str) -> bytes:
    """The content id as it appears in playback URLs.

    Validated content ids hold only ``A-Za-z0-9._:/-``, which URLs carry as they are, so the
    quoting ``urls.playback_urls`` does is the identity here; anything else is quoted.
    """
    if _URL_SAFE.fullmatch(content_id):
        return content_id.encode()
    return quoted(content_id).encode()
