"""Typed client for Foghorn (foghorn.v1), on the shared resilient channel.

    client = FoghornClient(["127.0.0.1:18008", "127.0.0.1:18018"], token="secret")
    route = await client.route_viewer("stream-1", lat=52.5, lon=13.4)
    print(route.best.urls[0].url)
    await client.close()

Every call goes through ``pkg.clients.aio_channel`` (deadline, retries of safe calls, retry
budget, breaker, failover across the replica addresses given). ``connect`` opens a node's
control stream; that stream is not retried (a broken stream is the caller's cue to reconnect,
see ``pkg.clients.backoff``).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence

import grpc.aio

from pkg.clients.discovery import dynamic_targets
from pkg.clients.grpc_aio import aio_channel
from pkg.clients.policy import PLATFORM_KEEPALIVE, OutlierPolicy, Policy, RetryPolicy
from pkg.clients.targets import TargetList
from pkg.proto.foghorn.v1 import foghorn_pb2 as pb
from pkg.proto.foghorn.v1 import foghorn_pb2_grpc as pb_grpc

MODES: dict[str, int] = {
    "normal": pb.NODE_MODE_NORMAL,
    "draining": pb.NODE_MODE_DRAINING,
    "maintenance": pb.NODE_MODE_MAINTENANCE,
}
DEFAULT_TIMEOUT_S = 5.0

# Routing answers from memory: p99 is 1-2 ms on loopback, so an attempt still silent after
# 300 ms is on a hung replica (paused, deadlocked) and is retried on another one well within
# a viewer's patience. Admin reads scan the fleet and get more room. SendCommand waits for a
# node's ack (seconds) and SetMode is not idempotent: both keep the whole deadline.
ROUTING_ATTEMPT_TIMEOUT_S = 0.3
ADMIN_READ_ATTEMPT_TIMEOUT_S = 1.0
ATTEMPT_TIMEOUTS: tuple[tuple[str, float], ...] = (
    ("/foghorn.v1.Routing/*", ROUTING_ATTEMPT_TIMEOUT_S),
    ("/foghorn.v1.NodeAdmin/ListNodes", ADMIN_READ_ATTEMPT_TIMEOUT_S),
    ("/foghorn.v1.NodeAdmin/GetNode", ADMIN_READ_ATTEMPT_TIMEOUT_S),
    ("/foghorn.v1.NodeAdmin/ExplainRoute", ADMIN_READ_ATTEMPT_TIMEOUT_S),
)


def default_policy(timeout_s: float = DEFAULT_TIMEOUT_S) -> Policy:
    """The policy of a Foghorn client: short routing attempts, outlier ejection on.

    Pass it to ``aio_channel`` when building a channel to Foghorn yourself.
    """
    return Policy(
        timeout=timeout_s,
        retry=RetryPolicy(attempt_timeouts=ATTEMPT_TIMEOUTS),
        outlier=OutlierPolicy(enabled=True),
        # Our servers permit frequent pings: a node's control stream to a silent replica
        # ends in 30 s instead of the 330 s a server we do not own would need.
        keepalive=PLATFORM_KEEPALIVE,
    )


def parse_targets(spec: str | Sequence[str] | TargetList) -> list[str]:
    """``"127.0.0.1:1,127.0.0.1:2"`` or a list -> list of addresses (empty entries dropped);
    a ``TargetList`` -> its current addresses."""
    if isinstance(spec, TargetList):
        return list(spec.addresses)
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    targets = [t.strip() for t in items if t.strip()]
    if not targets:
        raise ValueError("no Foghorn address given")
    return targets


def mode_value(mode: str | int) -> int:
    """A mode name (normal/draining/maintenance) or number -> the foghorn.v1.NodeMode value."""
    if isinstance(mode, int):
        return mode
    try:
        return MODES[mode.lower()]
    except KeyError:
        raise ValueError(f"unknown mode {mode!r} (one of {', '.join(MODES)})") from None


def _locate(
    request: pb.ViewerRouteRequest | pb.IngestRouteRequest, lat: float | None, lon: float | None
) -> None:
    """Set ``request.location`` from ``lat``/``lon`` (both or neither: neither leaves it unset)."""
    if lat is None and lon is None:
        return
    if lat is None or lon is None:
        raise ValueError("give both lat and lon, or neither")
    request.location.CopyFrom(pb.GeoPoint(latitude=lat, longitude=lon))


class FoghornClient:
    """Routing, admin and node-control calls to one Foghorn service (one or more replicas)."""

    def __init__(
        self,
        targets: str | Sequence[str] | TargetList,
        *,
        token: str | None = None,
        policy: Policy | None = None,
        channel: grpc.aio.Channel | None = None,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        credentials: grpc.ChannelCredentials | None = None,
    ) -> None:
        """``targets``: replica addresses, or a replica set that changes without a restart:
        "dns:///name:port", "file:/path" or a ``TargetList`` (``pkg.clients.discovery``).
        ``credentials``: TLS to the replicas (``pkg.common.tls.client_credentials``: a CA
        bundle and, for mTLS, a client certificate); None: plaintext."""
        # With a channel given, the channel follows the replica set; this is for display.
        self.target_list = (
            dynamic_targets(targets)
            if channel is None
            else (targets if isinstance(targets, TargetList) else None)
        )
        self.targets = (
            [self.target_list.name] if self.target_list is not None else parse_targets(targets)
        )
        self._channel = channel or aio_channel(
            self.target_list or self.targets,
            policy or default_policy(timeout_s),
            token=token,
            credentials=credentials,
        )
        self._owns_channel = channel is None
        self.timeout_s = timeout_s
        self.routing = pb_grpc.RoutingStub(self._channel)
        self.admin = pb_grpc.NodeAdminStub(self._channel)
        self.control = pb_grpc.NodeControlStub(self._channel)

    async def close(self) -> None:
        """Close the channel (when this client created it)."""
        if self._owns_channel:
            await self._channel.close(None)

    async def __aenter__(self) -> FoghornClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- routing (public) -----------------------------------------------------------------

    async def route_viewer(
        self,
        content_id: str,
        *,
        lat: float | None = None,
        lon: float | None = None,
        ip: str = "",
        protocol: str = "",
        max_fallbacks: int = 0,
        timeout_s: float | None = None,
    ) -> pb.ViewerRouteResponse:
        """Best node plus ranked fallbacks for a viewer of ``content_id``."""
        request = pb.ViewerRouteRequest(
            content_id=content_id, viewer_ip=ip, protocol=protocol, max_fallbacks=max_fallbacks
        )
        _locate(request, lat, lon)
        reply: pb.ViewerRouteResponse = await self.routing.RouteViewer(
            request, timeout=timeout_s or self.timeout_s
        )
        return reply

    async def route_ingest(
        self,
        stream_key: str,
        *,
        lat: float | None = None,
        lon: float | None = None,
        ip: str = "",
        protocol: str = "",
        timeout_s: float | None = None,
    ) -> pb.IngestRouteResponse:
        """Best ingest node and the push URL for ``stream_key``."""
        request = pb.IngestRouteRequest(stream_key=stream_key, ingest_ip=ip, protocol=protocol)
        _locate(request, lat, lon)
        reply: pb.IngestRouteResponse = await self.routing.RouteIngest(
            request, timeout=timeout_s or self.timeout_s
        )
        return reply

    # -- admin (token) --------------------------------------------------------------------

    async def list_nodes(
        self, *, mode: str | int | None = None, connected_only: bool = False
    ) -> list[pb.NodeInfo]:
        """Every node Foghorn knows, optionally filtered by mode / connection."""
        request = pb.ListNodesRequest(connected_only=connected_only)
        if mode is not None:
            request.mode = mode_value(mode)  # type: ignore[assignment]
        reply: pb.ListNodesResponse = await self.admin.ListNodes(request, timeout=self.timeout_s)
        return list(reply.nodes)

    async def get_node(self, node_id: str) -> pb.NodeInfo:
        """One node with its last report and health (NOT_FOUND when unknown)."""
        reply: pb.NodeInfo = await self.admin.GetNode(
            pb.GetNodeRequest(node_id=node_id), timeout=self.timeout_s
        )
        return reply

    async def set_mode(
        self, node_id: str, mode: str | int, *, reason: str = "", ack_timeout_s: float = 0.0
    ) -> pb.SetModeResponse:
        """Set a node's mode; the reply says whether the node acknowledged the command."""
        request = pb.SetModeRequest(
            node_id=node_id,
            mode=mode_value(mode),  # type: ignore[arg-type]
            reason=reason,
            ack_timeout_s=ack_timeout_s,
        )
        reply: pb.SetModeResponse = await self.admin.SetMode(
            request, timeout=self.timeout_s + ack_timeout_s
        )
        return reply

    async def explain_route(
        self,
        content_id: str,
        *,
        lat: float | None = None,
        lon: float | None = None,
        ip: str = "",
        protocol: str = "",
    ) -> pb.ExplainRouteResponse:
        """Score parts of every node and why each rejected node was rejected."""
        request = pb.ViewerRouteRequest(content_id=content_id, viewer_ip=ip, protocol=protocol)
        _locate(request, lat, lon)
        reply: pb.ExplainRouteResponse = await self.admin.ExplainRoute(
            request, timeout=self.timeout_s
        )
        return reply

    async def send_command(
        self, node_id: str, command: pb.Command, *, timeout_s: float = 0.0
    ) -> pb.CommandResult:
        """Push a command and wait for the node's ack (DEADLINE_EXCEEDED on no answer)."""
        wait = timeout_s or DEFAULT_TIMEOUT_S
        reply: pb.CommandResult = await self.admin.SendCommand(
            pb.SendCommandRequest(node_id=node_id, command=command, timeout_s=timeout_s),
            timeout=wait + self.timeout_s,
        )
        return reply

    # -- node control (token) -------------------------------------------------------------

    def connect(
        self, messages: AsyncIterator[pb.NodeMessage]
    ) -> grpc.aio.StreamStreamCall[pb.NodeMessage, pb.ControlMessage]:
        """Open a node control stream fed by ``messages``; read ControlMessages from it."""
        call: grpc.aio.StreamStreamCall[pb.NodeMessage, pb.ControlMessage] = self.control.Connect(
            messages
        )
        return call


class ControlStream:
    """A node control stream fed by hand: ``send()`` messages, read Foghorn's from ``call``.

    ``end()`` half-closes the stream (Foghorn sees the node hang up cleanly)."""

    def __init__(self, client: FoghornClient) -> None:
        self._outbox: asyncio.Queue[pb.NodeMessage | None] = asyncio.Queue()
        self.call = client.connect(self._messages())

    async def _messages(self) -> AsyncIterator[pb.NodeMessage]:
        while True:
            msg = await self._outbox.get()
            if msg is None:
                return
            yield msg

    def send(self, msg: pb.NodeMessage) -> None:
        self._outbox.put_nowait(msg)

    def end(self) -> None:
        self._outbox.put_nowait(None)
