"""Foghorn's domain records: what a node is, what it last reported, how an operator set it.

Pure data (no grpc, no redis): the wire layer converts protobuf messages to these after
validation, the store persists them whole, routing reads them.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, NamedTuple


class NodeMode(enum.IntEnum):
    """Operational mode; values match ``foghorn.v1.NodeMode``."""

    NORMAL = 1
    DRAINING = 2
    MAINTENANCE = 3


@dataclass(frozen=True)
class GeoPoint:
    latitude: float
    longitude: float


@dataclass(frozen=True)
class NodeIdentity:
    """What a node declared when it registered."""

    node_id: str
    roles: frozenset[str]
    capabilities: frozenset[str]
    base_url: str
    location: GeoPoint | None
    capacity: int
    region: str = ""


# The mode a node says it runs in when it registers, with its reason (``Register.mode``).
HeldMode = tuple["NodeMode", str]


class StreamLoad(NamedTuple):
    """One stream a node carries. A NamedTuple rather than a dataclass: thousands are built
    per second from load reports and a tuple is built in half the time."""

    stream_id: str
    tenant_id: str
    viewers: int = 0
    inputs: int = 0
    upload_bps: int = 0


@dataclass(frozen=True)
class LoadReport:
    """One validated load report."""

    cpu_percent: float
    ram_used_bytes: int
    ram_max_bytes: int
    upload_bps: int
    download_bps: int
    bandwidth_limit_bps: int
    streams: tuple[StreamLoad, ...] = ()

    # Derived from ``streams``, computed once per report (validation fills them in as it
    # reads the message). A node usually lists the same streams report after report: the
    # validated report then shares its predecessor's ``stream_ids`` and ``tenant_ids`` tuples,
    # so whoever compares them (the identity check, the fleet's stream start/end events, the
    # index's carriers) finds the same object and does no work per stream.

    @cached_property
    def stream_ids(self) -> tuple[str, ...]:
        return tuple(s.stream_id for s in self.streams)

    @cached_property
    def tenant_ids(self) -> tuple[str, ...]:
        return tuple(s.tenant_id for s in self.streams)

    @cached_property
    def viewers(self) -> int:
        return sum(s.viewers for s in self.streams)

    def viewers_by_stream(self) -> dict[str, int]:
        return {s.stream_id: s.viewers for s in self.streams}


@dataclass(frozen=True)
class NodeRecord:
    """Everything the fleet knows about one node: the unit the store reads and writes whole.

    Timestamps are wall-clock seconds (``Clock.time()``) because records are shared between
    replicas; ``version`` is assigned by the store and grows with every write of this node.
    """

    identity: NodeIdentity
    mode: NodeMode = NodeMode.NORMAL
    mode_reason: str = ""
    report: LoadReport | None = None
    last_report_at: float = 0.0
    connected: bool = True
    connected_at: float = 0.0
    disconnected_at: float = 0.0
    owner: str = ""  # replica id holding the node's control stream
    owner_fence: int = 0  # fencing token of that ownership (0 in the embedded store)
    reports_accepted: int = 0
    reports_rejected: int = 0
    last_rejection: str = ""
    version: int = 0
    extra: dict[str, str] = field(default_factory=dict, compare=False)

    @property
    def node_id(self) -> str:
        return self.identity.node_id


def validated_report(
    cpu_percent: float,
    ram_used_bytes: int,
    ram_max_bytes: int,
    upload_bps: int,
    download_bps: int,
    bandwidth_limit_bps: int,
    streams: tuple[StreamLoad, ...],
    stream_ids: tuple[str, ...],
    tenant_ids: tuple[str, ...],
    viewers: int,
) -> LoadReport:
    """A ``LoadReport`` with its derived attributes already filled in (validation's hot path;
    the caller vouches that they are those of ``streams``).

    LoadReport has no ``__post_init__``, so filling the attribute dict equals the frozen
    ``__init__`` (seven ``object.__setattr__`` calls) at a fraction of its cost.
    """
    new = object.__new__(LoadReport)
    d = new.__dict__
    d["cpu_percent"] = cpu_percent
    d["ram_used_bytes"] = ram_used_bytes
    d["ram_max_bytes"] = ram_max_bytes
    d["upload_bps"] = upload_bps
    d["download_bps"] = download_bps
    d["bandwidth_limit_bps"] = bandwidth_limit_bps
    d["streams"] = streams
    d["stream_ids"] = stream_ids
    d["tenant_ids"] = tenant_ids
    d["viewers"] = viewers
    return new


def evolve(record: NodeRecord, **changes: Any) -> NodeRecord:
    """``dataclasses.replace`` for the hot path (one report = one new record).

    NodeRecord has no ``__post_init__`` and no init-only fields, so copying its attribute
    dict is equivalent, and about five times faster than ``replace``.
    """
    new = object.__new__(NodeRecord)
    new.__dict__.update(record.__dict__)
    new.__dict__.update(changes)
    return new
