"""NodeRecord <-> JSON for the Redis store and the changelog (compact, versioned, strict).

One encoding for both the Redis hash (rehydration source) and changelog entries, so a replica
applies exactly what the owner stored. ``decode`` raises ``ValueError`` on anything malformed:
a corrupt entry is skipped and counted by the caller, never applied half-way.
"""

from __future__ import annotations

import json
import math
from json.encoder import encode_basestring_ascii as _quote
from typing import Any

from api_balancing.model import (
    GeoPoint,
    LoadReport,
    NodeIdentity,
    NodeMode,
    NodeRecord,
    StreamLoad,
    validated_report,
)

SCHEMA = 1
# One encoder for every record: json.dumps with non-default options builds a new encoder per
# call, which costs more than encoding a record.
_ENCODER = json.JSONEncoder(separators=(",", ":"), allow_nan=False)


def _c_encoder() -> Any:
    """CPython's C encoder built once with ``_ENCODER``'s options (``JSONEncoder.encode``
    builds a new one, and a dict of circular-reference markers, on every call); records are
    plain trees, so no marker dict. None where the C accelerator is missing."""
    try:
        # A private CPython name that typeshed's json.encoder stub does not declare.
        from json.encoder import c_make_encoder  # type: ignore[attr-defined]
    except ImportError:  # pragma: no cover
        return None
    if c_make_encoder is None:  # pragma: no cover
        return None
    try:
        # Same arguments JSONEncoder.iterencode passes (markers, default, string encoder,
        # indent, key and item separators, sort_keys, skipkeys, allow_nan).
        return c_make_encoder(None, _ENCODER.default, _quote, None, ":", ",", False, False, False)
    except TypeError:  # pragma: no cover - another CPython's signature
        return None


_C_ENCODE = _c_encoder()


def _dumps(doc: Any) -> str:
    if _C_ENCODE is None:  # pragma: no cover
        return _ENCODER.encode(doc)
    return "".join(_C_ENCODE(doc, 0))


def _report(report: LoadReport | None) -> list[Any] | None:
    if report is None:
        return None
    # StreamLoad is a NamedTuple: the C encoder writes it as an array as it is.
    return [
        report.cpu_percent,
        report.ram_used_bytes,
        report.ram_max_bytes,
        report.upload_bps,
        report.download_bps,
        report.bandwidth_limit_bps,
        report.streams,
    ]


# A node's identity rarely changes while its record is rewritten on every report: its JSON
# fragment is cached per node, keyed by the identity object itself.
_IDENTITY_CACHE: dict[str, tuple[NodeIdentity, str]] = {}
_IDENTITY_CACHE_MAX = 100_000


def _identity_fragment(ident: NodeIdentity) -> str:
    hit = _IDENTITY_CACHE.get(ident.node_id)
    if hit is not None and hit[0] is ident:
        return hit[1]
    loc = ident.location
    doc = {
        "s": SCHEMA,
        "id": ident.node_id,
        "roles": sorted(ident.roles),
        "caps": sorted(ident.capabilities),
        "url": ident.base_url,
        "geo": [loc.latitude, loc.longitude] if loc else None,
        "cap": ident.capacity,
        "region": ident.region,
    }
    fragment = _dumps(doc)[1:-1]
    if len(_IDENTITY_CACHE) >= _IDENTITY_CACHE_MAX:
        _IDENTITY_CACHE.clear()
    _IDENTITY_CACHE[ident.node_id] = (ident, fragment)
    return fragment


def _rest(record: NodeRecord) -> dict[str, Any]:
    """The fields after the report, for the generic encoder."""
    return {
        "mode": int(record.mode),
        "mode_reason": record.mode_reason,
        "report_at": record.last_report_at,
        "connected": record.connected,
        "connected_at": record.connected_at,
        "disconnected_at": record.disconnected_at,
        "owner": record.owner,
        "fence": record.owner_fence,
        "acc": record.reports_accepted,
        "rej": record.reports_rejected,
        "last_rej": record.last_rejection,
        "ver": record.version,
        "extra": record.extra,
    }


def _rest_json(record: NodeRecord) -> str:
    """``_dumps(_rest(record))[1:]`` built directly: written on every report, and about twice
    as fast as the C encoder given a dict. Types are checked where a direct write could differ
    from the encoder (a bool is an int, a float may be infinite): anything unexpected raises
    TypeError, and the caller then takes the generic encoder, which writes it or refuses it."""
    at, con, dis = record.last_report_at, record.connected_at, record.disconnected_at
    fence, acc, rej, ver = (
        record.owner_fence,
        record.reports_accepted,
        record.reports_rejected,
        record.version,
    )
    connected = record.connected
    if not (
        type(at) is float
        and type(con) is float
        and type(dis) is float
        and math.isfinite(at + con + dis)
        and type(fence) is int
        and type(acc) is int
        and type(rej) is int
        and type(ver) is int
        and type(connected) is bool
    ):
        raise TypeError("record fields of unexpected types")
    f = float.__repr__
    extra = _dumps(record.extra) if record.extra else "{}"
    return (
        f'"mode":{int(record.mode)},"mode_reason":{_quote(record.mode_reason)},'
        f'"report_at":{f(at)},"connected":{"true" if connected else "false"},'
        f'"connected_at":{f(con)},"disconnected_at":{f(dis)},"owner":{_quote(record.owner)},'
        f'"fence":{fence},"acc":{acc},"rej":{rej},"last_rej":{_quote(record.last_rejection)},'
        f'"ver":{ver},"extra":{extra}}}'
    )


def encode(record: NodeRecord) -> str:
    """The record as one JSON document."""
    # The report changes on every write: CPython's C encoder writes it (StreamLoad tuples as
    # arrays) faster than any Python-built string, and refuses non-finite numbers.
    report_json = _dumps(_report(record.report))
    try:
        rest = _rest_json(record)
    except TypeError:
        rest = _dumps(_rest(record))[1:]
    return "{" + _identity_fragment(record.identity) + ',"report":' + report_json + "," + rest


_new_tuple = tuple.__new__


def decode(text: str) -> NodeRecord:
    """Parse a record written by ``encode``; ValueError when it is not one."""
    try:
        doc = json.loads(text)
        if not isinstance(doc, dict):
            raise ValueError("a node record is a JSON object")
        if doc.get("s") != SCHEMA:
            raise ValueError(f"unknown record schema {doc.get('s')!r}")
        geo = doc["geo"]
        identity = NodeIdentity(
            node_id=str(doc["id"]),
            roles=frozenset(map(str, doc["roles"])),
            capabilities=frozenset(map(str, doc["caps"])),
            base_url=str(doc["url"]),
            location=GeoPoint(float(geo[0]), float(geo[1])) if geo else None,
            capacity=int(doc["cap"]),
            region=str(doc["region"]),
        )
        raw = doc["report"]
        report = None
        if raw is not None:
            # tuple.__new__ directly: every peer decodes every report's ten streams, and the
            # NamedTuple's own __new__ is a Python frame costing as much again.
            streams = tuple(
                [
                    _new_tuple(StreamLoad, (str(sid), str(ten), int(v), int(i), int(up)))
                    for sid, ten, v, i, up in raw[6]
                ]
            )
            # The derived attributes filled in here, one C-level pass: the index reads them on
            # every apply (computed lazily, each would cost a Python frame and a lock).
            ids: tuple[str, ...] = ()
            tenants: tuple[str, ...] = ()
            viewers: tuple[int, ...] = ()
            if streams:
                ids, tenants, viewers, _, _ = zip(*streams, strict=True)
            report = validated_report(
                float(raw[0]),
                int(raw[1]),
                int(raw[2]),
                int(raw[3]),
                int(raw[4]),
                int(raw[5]),
                streams,
                ids,
                tenants,
                sum(viewers),
            )
        if not identity.node_id:
            raise ValueError("record without node id")
        return NodeRecord(
            identity=identity,
            mode=NodeMode(int(doc["mode"])),
            mode_reason=str(doc["mode_reason"]),
            report=report,
            last_report_at=float(doc["report_at"]),
            connected=bool(doc["connected"]),
            connected_at=float(doc["connected_at"]),
            disconnected_at=float(doc["disconnected_at"]),
            owner=str(doc["owner"]),
            owner_fence=int(doc["fence"]),
            reports_accepted=int(doc["acc"]),
            reports_rejected=int(doc["rej"]),
            last_rejection=str(doc["last_rej"]),
            version=int(doc["ver"]),
            extra={str(k): str(v) for k, v in dict(doc.get("extra") or {}).items()},
        )
    except (KeyError, TypeError, IndexError, json.JSONDecodeError) as exc:
        raise ValueError(f"malformed node record: {exc}") from exc
