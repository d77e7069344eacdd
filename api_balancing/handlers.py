"""foghorn.v1 handlers: wire messages in, validated domain calls, wire messages out.

Errors map to gRPC status in one place (``_status``); every domain error names its field.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
import grpc.aio
import structlog

from api_balancing import convert, errors, fastwire, metrics, validation
from api_balancing.fleet import Fleet, NodeFleet
from api_balancing.geoip import GeoIpTable
from api_balancing.identity import check_register, check_report
from api_balancing.limits import AddressLimiter, address_key, peer_ip
from api_balancing.model import GeoPoint, NodeMode
from api_balancing.sessions import Ack, Closed, Ended, Mailbox, Outbox, Session, SessionRegistry
from api_balancing.urls import ingest_url
from pkg.common.auth import ANONYMOUS, Principal, current_principal
from pkg.common.forwarded import HEADER as FORWARDED
from pkg.common.forwarded import NO_PROXIES, TrustedProxies
from pkg.proto.foghorn.v1 import foghorn_pb2 as pb
from pkg.proto.foghorn.v1 import foghorn_pb2_grpc as pb_grpc

log = structlog.get_logger("foghorn.handlers")

T = TypeVar("T")
Context = grpc.aio.ServicerContext[Any, Any]
DEFAULT_FALLBACKS = 3
# A timer firing this much after its time says the event loop was busy, not the peer silent.
LATE_TIMER_S = 0.25
# Rejection notices wait in the stream's outbox until the node reads them; past this many
# queued messages they are only counted, so a node that never reads cannot grow our memory.
MAX_QUEUED_REJECTIONS = 256


def _status(code: str) -> grpc.StatusCode:
    return getattr(grpc.StatusCode, code, grpc.StatusCode.INTERNAL)


async def _call(context: Context, fn: Callable[[], Awaitable[T]]) -> T:
    """Run a handler body; domain errors become their gRPC status with the message."""
    try:
        return await fn()
    except errors.FoghornError as exc:
        await context.abort(_status(exc.code), exc.message)
        raise  # unreachable: abort raises


@dataclass
class Locator:
    """Where a viewer is: explicit lat/lon wins, else the GeoIP table, else unknown."""

    geoip: GeoIpTable

    def locate(
        self, field: str, has_location: bool, point: pb.GeoPoint, ip: str
    ) -> GeoPoint | None:
        if has_location:
            return validation.geo(field, point)
        return self.geoip.lookup(ip)


# --------------------------------------------------------------------------------------------
# Node control stream
# --------------------------------------------------------------------------------------------

_END = object()


def replicas_message(addresses: list[str]) -> pb.ControlMessage:
    """The replica list a node keeps to reconnect to (see ``pb.Replicas``)."""
    return pb.ControlMessage(replicas=pb.Replicas(addresses=addresses))


def reconnect_message(targets: list[str], reason: str) -> pb.ControlMessage:
    """Ask a node to move its stream to ``targets`` (preferred first) at once."""
    return pb.ControlMessage(reconnect=pb.Reconnect(targets=targets, reason=reason))


class _StreamState:
    session: Session | None = None
    # The stream ids and tenants of the last report this stream's credential was allowed to
    # send (the tuples themselves: validation shares them while a node lists the same streams).
    checked: tuple[tuple[str, ...], tuple[str, ...]] | None = None

    def __init__(self, principal: Principal) -> None:
        self.principal = principal


class NodeControlService(pb_grpc.NodeControlServicer):
    """One bidirectional stream per node: register, reports, acks in; commands out."""

    def __init__(
        self,
        fleet: NodeFleet,
        sessions: SessionRegistry,
        report_interval_s: float,
        register_timeout_s: float = 5.0,
        replicas: Callable[[], list[str]] | None = None,
    ) -> None:
        self.fleet = fleet
        self.sessions = sessions
        self.report_interval_s = report_interval_s
        # A stream that has not registered by then is closed: an open, silent stream costs a
        # task and a slot of the credential's stream quota and serves no node.
        self.register_timeout_s = register_timeout_s
        # Every replica's address (HA: the registry in Redis), told to each node after it
        # registers so that it knows where to reconnect without a restart.
        self.replicas = replicas
        self._background: set[asyncio.Task[None]] = set()

    async def Connect(
        self, request_iterator: AsyncIterator[pb.NodeMessage], context: Context
    ) -> AsyncIterator[pb.ControlMessage]:
        outbox = Mailbox()
        state = _StreamState(current_principal())
        reader = asyncio.create_task(self._read(request_iterator, state, outbox))
        metrics.control_streams.add(1)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.register_timeout_s
        extensions = 0
        try:
            while True:
                if state.session is None:
                    try:
                        item = await asyncio.wait_for(
                            outbox.get(), max(0.0, deadline - loop.time())
                        )
                    except TimeoutError:
                        if state.session is not None or outbox.qsize():
                            continue
                        # A timeout that fires late means the loop was busy (a herd of nodes
                        # re-registering after a replica died): this node's Register may be
                        # queued behind that work rather than missing. Aborting it would send
                        # the node into backoff and back with a fresh connection (on grpc's
                        # client a write racing the abort even surfaces as INTERNAL). So a
                        # late timeout waits again, a few times at most.
                        if loop.time() - deadline > LATE_TIMER_S and extensions < 3:
                            extensions += 1
                            deadline = loop.time() + self.register_timeout_s
                            continue
                        await context.abort(
                            grpc.StatusCode.DEADLINE_EXCEEDED,
                            f"register: no Register within {self.register_timeout_s:g} s of "
                            "opening the control stream",
                        )
                else:
                    item = await outbox.get()
                if item is _END or isinstance(item, Ended):
                    return
                if isinstance(item, Closed):
                    await context.abort(_status(item.code), item.message)
                yield item
        finally:
            metrics.control_streams.add(-1)
            reader.cancel()
            session = state.session
            if session is not None and self.sessions.release(session):
                # Not awaited here: this generator may be finishing because it was cancelled.
                ended = (
                    self.fleet.hand_over(session.node_id)
                    if session.handed_over
                    else self._disconnected(session.node_id)
                )
                task = asyncio.get_running_loop().create_task(ended)
                self._background.add(task)
                task.add_done_callback(self._background.discard)

    async def settle(self, bound_s: float = 5.0) -> None:
        """Wait (at most ``bound_s``) for what ended streams still have to write (disconnects,
        hand-overs): a stop must end within a bound even when the store does not answer."""
        deadline = asyncio.get_running_loop().time() + bound_s
        while self._background:
            left = deadline - asyncio.get_running_loop().time()
            if left <= 0:
                log.warning("stream endings still writing at stop", count=len(self._background))
                return
            await asyncio.wait(list(self._background), timeout=left)

    async def _disconnected(self, node_id: str) -> None:
        if self.sessions.get(node_id) is None:  # not re-registered meanwhile
            await self.fleet.disconnect(node_id)

    async def _read(
        self,
        requests: AsyncIterator[pb.NodeMessage],
        state: _StreamState,
        outbox: Outbox,
    ) -> None:
        try:
            async for msg in requests:
                closed = await self._handle(msg, state, outbox)
                if closed is not None:
                    outbox.put_nowait(closed)
                    return
            outbox.put_nowait(_END)
        except asyncio.CancelledError:
            raise
        except errors.FoghornError as exc:
            outbox.put_nowait(Closed(exc.code, exc.message))
        except (grpc.RpcError, grpc.aio.BaseError):
            outbox.put_nowait(_END)  # the stream broke or was aborted: nothing more to say
        except Exception:
            log.exception("control stream failed")
            outbox.put_nowait(Closed("INTERNAL", "internal error on the control stream"))

    async def _handle(
        self, msg: pb.NodeMessage, state: _StreamState, outbox: Outbox
    ) -> Closed | None:
        kind = msg.WhichOneof("msg")
        session = state.session
        if kind == "report":
            if session is None:
                return Closed("FAILED_PRECONDITION", "report: sent before register")
            if session.closed:
                return None  # replaced by a newer stream; ignore what is still in flight
            await self._report(state, session.node_id, msg.report, outbox)
            return None
        if kind == "register":
            if session is not None:
                return Closed(
                    "FAILED_PRECONDITION",
                    f"register: this stream already registered node {session.node_id!r}",
                )
            identity = validation.register(msg.register)
            node_id = identity.node_id
            check_register(state.principal, node_id, self.fleet.store.get(node_id))
            # Take the stream over first, so an older stream ending meanwhile cannot mark the
            # node disconnected after this registration.
            state.session = self.sessions.open(identity.node_id, outbox)
            record = await self.fleet.register(
                identity, credential=state.principal.name, held=validation.held_mode(msg.register)
            )
            outbox.put_nowait(
                pb.ControlMessage(
                    registered=pb.Registered(
                        node_id=identity.node_id,
                        mode=pb.NodeMode.ValueType(record.mode),
                        replica_id=self.fleet.settings.replica_id,
                        report_interval_s=self.report_interval_s,
                        mode_reason=record.mode_reason,
                    )
                )
            )
            if self.replicas is not None:
                outbox.put_nowait(replicas_message(self.replicas()))
            return None
        if kind == "ack":
            if session is None:
                return Closed("FAILED_PRECONDITION", "ack: sent before register")
            ack = msg.ack
            if not session.resolve(Ack(ack.request_id, ack.ok, ack.message[:512])):
                self.sessions.acks_unmatched += 1
            return None
        return Closed("INVALID_ARGUMENT", "msg: empty NodeMessage (set register, report or ack)")

    async def _report(
        self, state: _StreamState, node_id: str, msg: pb.LoadReport, outbox: Outbox
    ) -> None:
        current = self.fleet.store.get(node_id)
        try:
            report = validation.report(msg, current.report if current is not None else None)
            state.checked = check_report(
                state.principal,
                node_id,
                report,
                self.fleet.stream_tenants.get,
                checked=state.checked,
            )
        except errors.FoghornError as exc:
            await self.fleet.reject_report(node_id, exc.message)
            metrics.rejected_fields.add(1, {"field": exc.field.split("[")[0]})
            if outbox.qsize() >= MAX_QUEUED_REJECTIONS:
                return  # a node that sends bad reports without reading: counted, not queued
            outbox.put_nowait(
                pb.ControlMessage(
                    rejected=pb.ReportRejected(
                        code=_status(exc.code).value[0], field=exc.field, message=exc.message
                    )
                )
            )
            return
        await self.fleet.accept_report(node_id, report)


# --------------------------------------------------------------------------------------------
# Routing (public)
# --------------------------------------------------------------------------------------------


class RoutingService(pb_grpc.RoutingServicer):
    def __init__(
        self,
        fleet: Fleet,
        locator: Locator,
        limiter: AddressLimiter | None = None,
        proxies: TrustedProxies = NO_PROXIES,
    ) -> None:
        self.fleet = fleet
        self.locator = locator
        # Anonymous callers, per client address (authenticated callers are not limited here);
        # behind a trusted proxy the address is the one its X-Forwarded-For names.
        self.limiter = limiter
        self.proxies = proxies
        self._peer_keys: dict[str, str] = {}  # grpc peer (ip:port) -> address key

    def admit(self, peer_key: str) -> None:
        """Charge one anonymous routing call to ``peer_key``; RateLimited when over."""
        if self.limiter is None:
            return
        wait = self.limiter.take(peer_key)
        if wait > 0:
            raise errors.RateLimited(
                f"too many routing requests from {peer_key or 'this client'}: "
                f"retry in {wait:.2f} s",
                wait,
            )

    def _peer_key(self, context: Context) -> str:
        peer = context.peer() or ""
        key = self._peer_keys.get(peer)
        if key is None:
            ip = peer_ip(peer)
            if self.proxies.trusts(ip):  # one connection carries many clients: per call
                forwarded = [
                    str(v) for k, v in context.invocation_metadata() or () if k == FORWARDED
                ]
                return address_key(self.proxies.client_address(ip, forwarded))
            if len(self._peer_keys) > 10_000:
                self._peer_keys.clear()
            key = self._peer_keys[peer] = address_key(ip)
        return key

    async def _admit_grpc(self, context: Context) -> None:
        if self.limiter is None or current_principal() is not ANONYMOUS:
            return
        try:
            self.admit(self._peer_key(context))
        except errors.RateLimited as exc:
            context.set_trailing_metadata(
                (("grpc-retry-pushback-ms", str(max(1, int(exc.retry_after_s * 1000)))),)
            )
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, exc.message)

    def route_viewer(
        self, request: pb.ViewerRouteRequest, redirect_client: str | None = None
    ) -> pb.ViewerRouteResponse:
        """The routing decision behind RouteViewer and /play (raises domain errors).

        ``redirect_client``: /play issues a redirect to a viewer at that address key, which
        counts as a pending redirect; RouteViewer only answers.
        """
        started = time.perf_counter()
        cid = validation.content_id("content_id", request.content_id)
        ip = validation.ip("viewer_ip", request.viewer_ip)
        location = self.locator.locate(
            "location", request.HasField("location"), request.location, ip
        )
        protocol = validation.protocol("protocol", request.protocol, validation.VIEWER_PROTOCOLS)
        fallbacks = validation.fallbacks("max_fallbacks", request.max_fallbacks)
        ranked, considered = self.fleet.route(
            cid,
            location,
            limit=1 + (fallbacks or DEFAULT_FALLBACKS),
            protocol=protocol,
            redirect_client=redirect_client,
        )
        get = self.fleet.store.get
        content = fastwire.content_bytes(cid)
        encoded = []
        for r in ranked:
            rec = get(r.node_id)
            if rec is not None:  # gone between ranking and reply: leave it out
                encoded.append(
                    fastwire.candidate(rec.identity, r.score, r.distance_km, content, protocol)
                )
        if not encoded:
            raise errors.NoEligibleNode(f"no eligible edge node for {cid!r} (fleet changed)")
        out = fastwire.viewer_reply(encoded, location, considered)
        # A measurement, not logic: perf_counter rather than the injected clock.
        self.fleet.route_latency.add((time.perf_counter() - started) * 1e6)
        return out

    async def RouteViewer(
        self, request: pb.ViewerRouteRequest, context: Context
    ) -> pb.ViewerRouteResponse:
        if self.limiter is not None:
            await self._admit_grpc(context)
        try:  # the hot path: no wrapper coroutine
            return self.route_viewer(request)
        except errors.FoghornError as exc:
            await context.abort(_status(exc.code), exc.message)
            raise  # unreachable: abort raises

    async def RouteIngest(
        self, request: pb.IngestRouteRequest, context: Context
    ) -> pb.IngestRouteResponse:
        await self._admit_grpc(context)

        async def body() -> pb.IngestRouteResponse:
            key = validation.stream_key("stream_key", request.stream_key)
            ip = validation.ip("ingest_ip", request.ingest_ip)
            location = self.locator.locate(
                "location", request.HasField("location"), request.location, ip
            )
            protocol = (
                validation.protocol("protocol", request.protocol, validation.INGEST_PROTOCOLS)
                or "rtmp"
            )
            ranked, _ = self.fleet.route(
                "", location, limit=1 + DEFAULT_FALLBACKS, role="ingest", protocol=protocol
            )
            store = self.fleet.store
            out = pb.IngestRouteResponse()
            best = store.get(ranked[0].node_id)
            out.best.CopyFrom(convert.candidate(ranked[0], best, "", protocol))
            for r in ranked[1:]:
                out.fallbacks.append(convert.candidate(r, store.get(r.node_id), "", protocol))
            if best is not None:
                out.ingest_url = ingest_url(best.identity.base_url, key, protocol)
            return out

        return await _call(context, body)


# --------------------------------------------------------------------------------------------
# Node admin
# --------------------------------------------------------------------------------------------


def _set_mode_message(mode: NodeMode, reason: str) -> Callable[[str], pb.ControlMessage]:
    def make(request_id: str) -> pb.ControlMessage:
        return pb.ControlMessage(
            command=pb.Command(
                request_id=request_id,
                set_mode=pb.SetModeCommand(mode=pb.NodeMode.ValueType(mode), reason=reason),
            )
        )

    return make


class NodeAdminService(pb_grpc.NodeAdminServicer):
    def __init__(
        self,
        fleet: NodeFleet,
        sessions: SessionRegistry,
        locator: Locator,
        command_timeout_s: float,
        dispatch: Callable[[str, Callable[[str], Any], float], Awaitable[Ack]] | None = None,
        withdraw: Callable[[], Awaitable[Any]] | None = None,
    ) -> None:
        self.fleet = fleet
        self.sessions = sessions
        self.locator = locator
        self.command_timeout_s = command_timeout_s
        # HA: a replica emptied by MoveNodes leaves the cluster's membership first, so that its
        # peers do not rebalance nodes back onto the replica being retired.
        self.withdraw = withdraw
        # Where commands go: this replica's streams by default; the HA layer relays instead.
        self.dispatch = dispatch or sessions.send

    def _info(self, node_id: str) -> pb.NodeInfo:
        rec = self.fleet.store.get(node_id)
        if rec is None:
            raise errors.NotFound(f"node_id: unknown node {node_id!r}", "node_id")
        return convert.node_info(
            rec,
            now=self.fleet.clock.time(),
            stale=self.fleet.is_stale(rec),
            pending=self.fleet.redirects.pending(node_id),
        )

    async def _command(
        self, node_id: str, make: Callable[[str], Any], timeout_s: float
    ) -> pb.CommandResult:
        """Send and wait; a node not connected or not answering is reported, not raised."""
        try:
            ack = await self.dispatch(node_id, make, timeout_s)
        except errors.CommandTimeout as exc:
            metrics.commands.add(1, {"outcome": "timeout"})
            return pb.CommandResult(delivered=True, acked=False, message=exc.message)
        except errors.FailedPrecondition as exc:
            metrics.commands.add(1, {"outcome": "not_connected"})
            return pb.CommandResult(delivered=False, acked=False, message=exc.message)
        metrics.commands.add(1, {"outcome": "acked" if ack.ok else "refused"})
        return pb.CommandResult(
            request_id=ack.request_id, delivered=True, acked=True, ok=ack.ok, message=ack.message
        )

    async def SetMode(self, request: pb.SetModeRequest, context: Context) -> pb.SetModeResponse:
        async def body() -> pb.SetModeResponse:
            node_id = validation.node_id("node_id", request.node_id)
            mode = validation.mode("mode", request.mode)
            reason = validation.reason("reason", request.reason)
            wait = validation.timeout("ack_timeout_s", request.ack_timeout_s, 2.0)
            await self.fleet.set_mode(node_id, mode, reason)
            result = await self._command(node_id, _set_mode_message(mode, reason), wait)
            return pb.SetModeResponse(node=self._info(node_id), command=result)

        return await _call(context, body)

    async def ListNodes(
        self, request: pb.ListNodesRequest, context: Context
    ) -> pb.ListNodesResponse:
        async def body() -> pb.ListNodesResponse:
            wanted = validation.mode("mode", request.mode) if request.mode else None
            out = pb.ListNodesResponse()
            for rec in sorted(self.fleet.store.snapshot(), key=lambda r: r.node_id):
                if wanted is not None and rec.mode is not wanted:
                    continue
                if request.connected_only and not rec.connected:
                    continue
                out.nodes.append(
                    convert.node_info(
                        rec,
                        now=self.fleet.clock.time(),
                        stale=self.fleet.is_stale(rec),
                        pending=self.fleet.redirects.pending(rec.node_id),
                    )
                )
            return out

        return await _call(context, body)

    async def GetNode(self, request: pb.GetNodeRequest, context: Context) -> pb.NodeInfo:
        async def body() -> pb.NodeInfo:
            return self._info(validation.node_id("node_id", request.node_id))

        return await _call(context, body)

    async def ExplainRoute(
        self, request: pb.ViewerRouteRequest, context: Context
    ) -> pb.ExplainRouteResponse:
        async def body() -> pb.ExplainRouteResponse:
            cid = validation.content_id("content_id", request.content_id)
            ip = validation.ip("viewer_ip", request.viewer_ip)
            location = self.locator.locate(
                "location", request.HasField("location"), request.location, ip
            )
            protocol = validation.protocol(
                "protocol", request.protocol, validation.VIEWER_PROTOCOLS
            )
            out = pb.ExplainRouteResponse(weights=self.fleet.settings.weights.describe())
            rank = 0
            for e in self.fleet.explain(cid, location, protocol=protocol):
                rank = rank + 1 if e.eligible else 0
                out.nodes.append(convert.explanation(e, rank))
            if location is not None:
                out.viewer_location.CopyFrom(convert.geo(location))
            return out

        return await _call(context, body)

    async def SendCommand(
        self, request: pb.SendCommandRequest, context: Context
    ) -> pb.CommandResult:
        async def body() -> pb.CommandResult:
            node_id = validation.node_id("node_id", request.node_id)
            if self.fleet.store.get(node_id) is None:
                raise errors.NotFound(f"node_id: unknown node {node_id!r}", "node_id")
            wait = validation.timeout("timeout_s", request.timeout_s, self.command_timeout_s)
            command = pb.Command()
            command.CopyFrom(request.command)
            action = command.WhichOneof("action")
            if action is None:
                raise errors.InvalidArgument(
                    "command.action", "must be one of set_mode, stop_sessions, drain"
                )
            if action == "set_mode":
                mode = validation.mode("command.set_mode.mode", command.set_mode.mode)
                reason = validation.reason("command.set_mode.reason", command.set_mode.reason)
                await self.fleet.set_mode(node_id, mode, reason)  # the fleet view follows
            elif action == "stop_sessions":
                validation.content_id(
                    "command.stop_sessions.stream_id", command.stop_sessions.stream_id
                )
            elif command.drain.target_viewers < 0:
                raise errors.InvalidArgument(
                    "command.drain.target_viewers",
                    f"must not be negative, got {command.drain.target_viewers}",
                )

            def make(request_id: str) -> pb.ControlMessage:
                command.request_id = request_id
                return pb.ControlMessage(command=command)

            try:
                ack = await self.dispatch(node_id, make, wait)
            except (errors.CommandTimeout, errors.FailedPrecondition) as exc:
                metrics.commands.add(1, {"outcome": exc.code.lower()})
                raise
            metrics.commands.add(1, {"outcome": "acked" if ack.ok else "refused"})
            return pb.CommandResult(
                request_id=ack.request_id,
                delivered=True,
                acked=True,
                ok=ack.ok,
                message=ack.message,
            )

        return await _call(context, body)

    async def MoveNodes(
        self, request: pb.MoveNodesRequest, context: Context
    ) -> pb.MoveNodesResponse:
        async def body() -> pb.MoveNodesResponse:
            targets = validation.addresses("targets", request.targets)
            if request.max_nodes < 0:
                raise errors.InvalidArgument(
                    "max_nodes", f"must not be negative, got {request.max_nodes}"
                )
            if not request.max_nodes and self.withdraw is not None:
                await self.withdraw()
            sessions = self.sessions.open_sessions()
            moving = sessions[: request.max_nodes] if request.max_nodes else sessions
            message = reconnect_message(targets, "moved by an operator")
            told = sum(1 for s in moving if s.hand_over(message))
            log.info("node streams moved by an operator", told=told, targets=targets)
            return pb.MoveNodesResponse(told=told, staying=len(sessions) - told)

        return await _call(context, body)
