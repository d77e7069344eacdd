"""Wire messages -> validated domain records. Every check names the field it failed on.

Numbers must be finite and in range, ids non-empty, bounded and from a safe alphabet, sizes
bounded (oversized collections are RESOURCE_EXHAUSTED). Nothing here trusts the client.
"""

from __future__ import annotations

import ipaddress
import math
import operator
import re
from collections.abc import Iterable
from itertools import repeat

from api_balancing import errors
from api_balancing.model import (
    GeoPoint,
    HeldMode,
    LoadReport,
    NodeIdentity,
    NodeMode,
    StreamLoad,
    validated_report,
)
from pkg.common.tenant import SYNTAX as TENANT_SYNTAX
from pkg.common.tenant import TENANT_ID_RE
from pkg.proto.foghorn.v1 import foghorn_pb2 as pb

# Matched with fullmatch: "$" would also accept a trailing newline.
NODE_ID_RE = re.compile(r"[A-Za-z0-9._:-]{1,128}")
CONTENT_ID_RE = re.compile(r"[A-Za-z0-9._:/-]{1,256}")
STREAM_KEY_RE = re.compile(r"[A-Za-z0-9._:-]{1,256}")
TENANT_RE = TENANT_ID_RE  # the platform's one tenant-id syntax
NAME_RE = re.compile(r"[a-z0-9_-]{1,32}")
KNOWN_ROLES = frozenset({"edge", "ingest"})
VIEWER_PROTOCOLS = ("hls", "llhls", "dash", "webrtc")
INGEST_PROTOCOLS = ("rtmp", "srt", "whip")
KNOWN_PROTOCOLS = frozenset(VIEWER_PROTOCOLS + INGEST_PROTOCOLS)
MAX_NAMES = 16
MAX_STREAMS_PER_REPORT = 5000
MAX_FALLBACKS = 16
MAX_REASON = 256
MAX_REGION = 64
MAX_URL = 512
MAX_INT = 2**62  # bytes / bps / counts beyond this are nonsense
_URL_RE = re.compile(r"https?://[A-Za-z0-9.\-\[\]:]+(/[\x21-\x7e]*)?")


def _id(field: str, value: str, pattern: re.Pattern[str], what: str) -> str:
    if not value:
        raise errors.InvalidArgument(field, "must not be empty")
    if len(value) > 256 and pattern is not CONTENT_ID_RE:
        raise errors.InvalidArgument(field, f"too long ({len(value)} chars)")
    if not pattern.fullmatch(value):
        raise errors.InvalidArgument(field, f"{value[:64]!r} is not a valid {what}")
    return value


def node_id(field: str, value: str) -> str:
    return _id(field, value, NODE_ID_RE, "node id (1..128 of A-Za-z0-9._:-)")


def content_id(field: str, value: str) -> str:
    return _id(field, value, CONTENT_ID_RE, "content id (1..256 of A-Za-z0-9._:/-)")


def stream_key(field: str, value: str) -> str:
    return _id(field, value, STREAM_KEY_RE, "stream key (1..256 of A-Za-z0-9._:-)")


def _finite(field: str, value: float) -> float:
    if math.isnan(value) or math.isinf(value):
        raise errors.InvalidArgument(field, f"must be a finite number, got {value}")
    return value


def _count(field: str, value: int) -> int:
    if value < 0:
        raise errors.InvalidArgument(field, f"must not be negative, got {value}")
    if value > MAX_INT:
        raise errors.InvalidArgument(field, f"{value} is out of range")
    return value


def geo(field: str, point: pb.GeoPoint) -> GeoPoint:
    lat = _finite(f"{field}.latitude", point.latitude)
    lon = _finite(f"{field}.longitude", point.longitude)
    if not -90.0 <= lat <= 90.0:
        raise errors.InvalidArgument(f"{field}.latitude", f"{lat} is outside -90..90")
    if not -180.0 <= lon <= 180.0:
        raise errors.InvalidArgument(f"{field}.longitude", f"{lon} is outside -180..180")
    return GeoPoint(lat, lon)


def _names(field: str, values: Iterable[str], allowed: frozenset[str] | None) -> frozenset[str]:
    items = list(values)
    if len(items) > MAX_NAMES:
        raise errors.TooLarge(field, f"{len(items)} entries (max {MAX_NAMES})")
    for i, name in enumerate(items):
        if not NAME_RE.fullmatch(name):
            raise errors.InvalidArgument(f"{field}[{i}]", f"{name[:40]!r} is not a valid name")
        if allowed is not None and name not in allowed:
            raise errors.InvalidArgument(
                f"{field}[{i}]", f"unknown {name!r} (one of {', '.join(sorted(allowed))})"
            )
    return frozenset(items)


def register(msg: pb.Register) -> NodeIdentity:
    """Validate a Register message."""
    nid = node_id("register.node_id", msg.node_id)
    roles = _names("register.roles", msg.roles, KNOWN_ROLES)
    if not roles:
        raise errors.InvalidArgument("register.roles", "must name at least one role")
    caps = _names("register.capabilities", msg.capabilities, KNOWN_PROTOCOLS)
    url = msg.base_url
    if not url:
        raise errors.InvalidArgument("register.base_url", "must not be empty")
    if len(url) > MAX_URL:
        raise errors.InvalidArgument("register.base_url", f"too long ({len(url)} chars)")
    if not _URL_RE.fullmatch(url):
        raise errors.InvalidArgument("register.base_url", f"{url[:64]!r} is not an http(s) URL")
    location = geo("register.location", msg.location) if msg.HasField("location") else None
    capacity = _count("register.capacity", msg.capacity)
    if len(msg.region) > MAX_REGION:
        raise errors.InvalidArgument("register.region", f"too long ({len(msg.region)} chars)")
    free_text("register.region", msg.region)
    return NodeIdentity(nid, roles, caps, url.rstrip("/"), location, capacity, msg.region)


def held_mode(msg: pb.Register) -> HeldMode:
    """The mode a registering node says it runs in (UNSPECIFIED: normal), with its reason."""
    try:
        mode = NodeMode(int(msg.mode)) if msg.mode else NodeMode.NORMAL
    except ValueError:
        raise errors.InvalidArgument("register.mode", f"unknown node mode {msg.mode}") from None
    if len(msg.mode_reason) > MAX_REASON:
        raise errors.InvalidArgument(
            "register.mode_reason", f"too long ({len(msg.mode_reason)} chars, max {MAX_REASON})"
        )
    return mode, msg.mode_reason


# One C-level call per stream reads its five fields into a tuple in StreamLoad's field order.
_STREAM_ROW = operator.attrgetter("stream_id", "tenant_id", "viewers", "inputs", "upload_bps")


def report(msg: pb.LoadReport, previous: LoadReport | None = None) -> LoadReport:
    """Validate a LoadReport message.

    ``previous``: the node's last accepted report. When the message lists the same streams
    (ids and tenants, in the same order), their id syntax and uniqueness were checked then and
    are not checked again, and the report shares the previous one's ``stream_ids`` and
    ``tenant_ids`` tuples; the numbers are checked as always.
    """
    cpu = _finite("report.cpu_percent", msg.cpu_percent)
    if not 0.0 <= cpu <= 100.0:
        raise errors.InvalidArgument("report.cpu_percent", f"{cpu} is outside 0..100")
    ram_used = _count("report.ram_used_bytes", msg.ram_used_bytes)
    ram_max = _count("report.ram_max_bytes", msg.ram_max_bytes)
    if ram_max == 0:
        raise errors.InvalidArgument("report.ram_max_bytes", "must be positive")
    if ram_used > ram_max:
        raise errors.InvalidArgument(
            "report.ram_used_bytes", f"{ram_used} exceeds ram_max_bytes {ram_max}"
        )
    up = _count("report.upload_bps", msg.upload_bps)
    down = _count("report.download_bps", msg.download_bps)
    limit = _count("report.bandwidth_limit_bps", msg.bandwidth_limit_bps)
    items = msg.streams
    count = len(items)
    if count > MAX_STREAMS_PER_REPORT:
        raise errors.TooLarge("report.streams", f"{count} streams (max {MAX_STREAMS_PER_REPORT})")
    if not count:
        return validated_report(cpu, ram_used, ram_max, up, down, limit, (), (), (), 0)
    # Column at a time, each a loop in C (reports arrive thousands per second); only a report
    # that fails a check pays for the stream-by-stream pass that names the field.
    rows = list(map(_STREAM_ROW, items))
    ids, tenants, viewers, inputs, uploads = zip(*rows, strict=True)
    if previous is not None and ids == previous.stream_ids and tenants == previous.tenant_ids:
        ids, tenants = previous.stream_ids, previous.tenant_ids
    elif not (
        all(map(CONTENT_ID_RE.fullmatch, ids))
        and all(map(TENANT_RE.fullmatch, tenants))
        and len(set(ids)) == count
    ):
        _streams_error(items)
    numbers = viewers + inputs + uploads
    if min(numbers) < 0 or max(numbers) > MAX_INT:
        _streams_error(items)
    # tuple.__new__ directly: the NamedTuple's generated __new__ is a Python frame.
    streams = tuple(map(_new_tuple, repeat(StreamLoad, count), rows))
    return validated_report(
        cpu, ram_used, ram_max, up, down, limit, streams, ids, tenants, sum(viewers)
    )


_new_tuple = tuple.__new__


def _streams_error(items: Iterable[pb.StreamLoad]) -> None:
    """Raise the precise error of the first stream entry that is not valid, in list order
    (each entry's checks in field order, a repeated id at its second listing)."""
    seen: set[str] = set()
    for i, s in enumerate(items):
        f = f"report.streams[{i}]"
        sid = content_id(f"{f}.stream_id", s.stream_id)
        if sid in seen:
            raise errors.InvalidArgument(f"{f}.stream_id", f"{sid!r} listed twice")
        seen.add(sid)
        _id(f"{f}.tenant_id", s.tenant_id, TENANT_RE, f"tenant id ({TENANT_SYNTAX})")
        _count(f"{f}.viewers", s.viewers)
        _count(f"{f}.inputs", s.inputs)
        _count(f"{f}.upload_bps", s.upload_bps)
    raise AssertionError("report.streams: failed a check but no entry did")  # unreachable


def mode(field: str, value: int) -> NodeMode:
    try:
        return NodeMode(value)
    except ValueError:
        raise errors.InvalidArgument(
            field, f"{value} is not a mode (1 normal, 2 draining, 3 maintenance)"
        ) from None


def reason(field: str, value: str) -> str:
    if len(value) > MAX_REASON:
        raise errors.InvalidArgument(field, f"too long ({len(value)} chars, max {MAX_REASON})")
    return free_text(field, value)


def free_text(field: str, value: str) -> str:
    """Free text ends up in logs, events and operators' terminals: printable characters only
    (no control characters, line or paragraph separators, or invisible format characters such
    as bidi overrides)."""
    if value.isprintable():
        return value
    at = next(i for i, c in enumerate(value) if not c.isprintable())
    raise errors.InvalidArgument(
        field, f"character {at} (U+{ord(value[at]):04X}) is a control or format character"
    )


MAX_ADDRESSES = 16
_ADDRESS_RE = re.compile(r"[A-Za-z0-9.\-]{1,253}:[0-9]{1,5}|\[[0-9A-Fa-f:.]{2,45}\]:[0-9]{1,5}")


def addresses(field: str, values: Iterable[str]) -> list[str]:
    """Replica addresses (``host:port``), at most ``MAX_ADDRESSES``."""
    out = list(values)
    if len(out) > MAX_ADDRESSES:
        raise errors.InvalidArgument(field, f"{len(out)} addresses (max {MAX_ADDRESSES})")
    for i, value in enumerate(out):
        port = value.rsplit(":", 1)[-1]
        if not _ADDRESS_RE.fullmatch(value) or not 0 < int(port) < 65536:
            raise errors.InvalidArgument(f"{field}[{i}]", f"{value[:64]!r} is not host:port")
    return out


def ip(field: str, value: str) -> str:
    if not value:
        return ""
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        raise errors.InvalidArgument(field, f"{value[:64]!r} is not an IP address") from None


def protocol(field: str, value: str, allowed: tuple[str, ...]) -> str:
    if value and value not in allowed:
        raise errors.InvalidArgument(
            field, f"unknown protocol {value[:32]!r} (one of {', '.join(allowed)})"
        )
    return value


def fallbacks(field: str, value: int) -> int:
    if value < 0 or value > MAX_FALLBACKS:
        raise errors.InvalidArgument(field, f"{value} is outside 0..{MAX_FALLBACKS}")
    return value


def timeout(field: str, value: float, default: float, maximum: float = 60.0) -> float:
    _finite(field, value)
    if value < 0 or value > maximum:
        raise errors.InvalidArgument(field, f"{value} is outside 0..{maximum:g} s")
    return value or default
