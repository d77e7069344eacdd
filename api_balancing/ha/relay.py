"""Command relay: an admin call for a node whose stream is on another replica goes to it.

Sending side (``Relay``): local stream -> dispatch here; otherwise read the owner record from
Redis and call the owner's internal ``foghorn.v1.Relay`` service through ``pkg.clients``. If
the owner is unreachable (it died), its ownership record is evicted with a match-checked delete
so the node's next registration anywhere starts clean, and the caller learns the node is not
connected. Receiving side (``RelayServicer``): dispatch to a local stream *only*, never relay
again, so a relay cannot loop even while ownership records are in flux.

Mode changes are relayed too: the owner is the single writer of a node's record.

``StoreReachable`` is the question a replica cut from Redis asks its peers before handing its
streams to them (``ha.partition``): the peer answers by pinging Redis.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import grpc.aio
import structlog

from api_balancing import errors
from api_balancing.fleet import Fleet
from api_balancing.ha.ownership import NodeOwnership
from api_balancing.ha.partition import PeerAnswer
from api_balancing.model import NodeMode, NodeRecord
from api_balancing.sessions import Ack, SessionRegistry
from api_balancing.store.redis_store import REDIS_ERRORS
from pkg.clients import Policy, RetryPolicy, aio_channel
from pkg.coord import OwnerRecord
from pkg.proto.foghorn.v1 import foghorn_pb2 as pb
from pkg.proto.foghorn.v1 import relay_pb2 as relay_pb
from pkg.proto.foghorn.v1 import relay_pb2_grpc as relay_grpc

log = structlog.get_logger("foghorn.ha.relay")

Context = grpc.aio.ServicerContext[Any, Any]
_DEAD = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED}


class RelayServicer(relay_grpc.RelayServicer):
    """The owner side: act on a local stream only."""

    def __init__(
        self,
        sessions: SessionRegistry,
        fleet: Fleet,
        ownership: NodeOwnership,
        reaches_store: Callable[[], Awaitable[bool]] | None = None,
    ) -> None:
        self.sessions = sessions
        self.fleet = fleet
        self.ownership = ownership
        self.reaches_store = reaches_store
        self.delivered = 0
        self.store_checks = 0

    async def Deliver(
        self, request: relay_pb.RelayCommandRequest, context: Context
    ) -> pb.CommandResult:
        node_id = request.node_id
        if self.sessions.get(node_id) is None:
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"node_id: node {node_id!r} has no control stream on this replica",
            )
        timeout = request.timeout_s if 0 < request.timeout_s <= 60 else 5.0
        command = pb.Command()
        command.CopyFrom(request.command)

        def make(request_id: str) -> pb.ControlMessage:
            command.request_id = request_id
            return pb.ControlMessage(command=command)

        try:
            ack = await self.sessions.send(node_id, make, timeout)
        except errors.CommandTimeout as exc:
            return pb.CommandResult(delivered=True, acked=False, message=exc.message)
        except errors.FailedPrecondition as exc:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, exc.message)
            raise  # unreachable
        self.delivered += 1
        log.info("relayed command delivered", node_id=node_id, sender=request.from_replica)
        return pb.CommandResult(
            request_id=ack.request_id, delivered=True, acked=True, ok=ack.ok, message=ack.message
        )

    async def SetMode(
        self, request: relay_pb.RelaySetModeRequest, context: Context
    ) -> relay_pb.RelaySetModeResponse:
        node_id = request.node_id
        if self.ownership.fence_of(node_id) is None:
            return relay_pb.RelaySetModeResponse(applied=False)
        try:
            mode = NodeMode(int(request.mode))
        except ValueError:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "mode: unknown node mode")
            raise  # unreachable
        await self.fleet.set_mode(node_id, mode, request.reason[:512])
        return relay_pb.RelaySetModeResponse(applied=True)

    async def StoreReachable(
        self, request: relay_pb.StoreReachableRequest, context: Context
    ) -> relay_pb.StoreReachableResponse:
        self.store_checks += 1
        reachable = self.reaches_store is not None and await self.reaches_store()
        log.info("asked whether Redis is reachable here", sender=request.from_replica[:64],
                 reachable=reachable)  # fmt: skip
        return relay_pb.StoreReachableResponse(
            reachable=reachable,
            replica_id=self.fleet.settings.replica_id,
            address=self.ownership.address,
            node_streams=len(self.sessions),
        )


class Relay:
    """The sending side, used by the admin service as its ``dispatch`` and mode setter."""

    def __init__(
        self,
        replica_id: str,
        sessions: SessionRegistry,
        fleet: Fleet,
        ownership: NodeOwnership,
        token: str | None,
        timeout_s: float = 5.0,
        credentials: grpc.ChannelCredentials | None = None,
    ) -> None:
        self.replica_id = replica_id
        self._credentials = credentials  # TLS to the other replicas (PLATFORM_TLS_*)
        self.sessions = sessions
        self.fleet = fleet
        self.ownership = ownership
        self._token = token
        self._timeout_s = timeout_s
        self._stubs: dict[str, tuple[grpc.aio.Channel, relay_grpc.RelayStub]] = {}
        self.relayed = 0
        self.evicted = 0

    def _stub(self, address: str) -> relay_grpc.RelayStub:
        entry = self._stubs.get(address)
        if entry is None:
            # Deliver is not idempotent: never retried once sent (pkg.clients knows).
            policy = Policy(timeout=self._timeout_s, retry=RetryPolicy(max_attempts=2))
            channel = aio_channel(address, policy, token=self._token, credentials=self._credentials)
            entry = (channel, relay_grpc.RelayStub(channel))
            self._stubs[address] = entry
        return entry[1]

    async def close(self) -> None:
        for channel, _ in self._stubs.values():
            await channel.close(None)
        self._stubs.clear()

    async def ask_store_reachable(
        self, addresses: list[str], timeout_s: float = 2.0
    ) -> list[PeerAnswer]:
        """Ask every peer at once whether it reaches Redis now; a peer that does not answer
        within ``timeout_s`` counts as not reaching it."""

        async def one(address: str) -> PeerAnswer:
            request = relay_pb.StoreReachableRequest(from_replica=self.replica_id)
            try:
                call: Any = self._stub(address).StoreReachable(request, timeout=timeout_s)
                reply: relay_pb.StoreReachableResponse = await call
            except grpc.aio.AioRpcError as exc:
                return PeerAnswer(address, False, error=exc.code().name)
            # Nodes are sent where the peer says it is reached (its advertised address).
            return PeerAnswer(
                reply.address or address, reply.reachable, reply.replica_id, reply.node_streams
            )

        return list(await asyncio.gather(*(one(a) for a in addresses)))

    async def _owner(self, node_id: str) -> OwnerRecord | None:
        """The remote owner to relay to, or None when the stream is (or must be) local."""
        if self.sessions.get(node_id) is not None:
            return None
        try:
            owner = await self.ownership.lookup(node_id)
        except REDIS_ERRORS as exc:
            raise errors.FailedPrecondition(
                f"node_id: node {node_id!r} is not connected here and its owner is unknown "
                f"(Redis unreachable: {type(exc).__name__})",
                "node_id",
            ) from None
        if owner is None or owner.replica == self.replica_id or not owner.address:
            return None
        return owner

    async def _owner_died(
        self, node_id: str, owner: OwnerRecord, exc: grpc.aio.AioRpcError
    ) -> None:
        try:
            if await self.ownership.evict(node_id, owner):
                self.evicted += 1
                log.warning(
                    "dead owner's record evicted",
                    node_id=node_id,
                    owner=owner.replica,
                    error=exc.code().name,
                )
        except REDIS_ERRORS:
            pass

    async def dispatch(self, node_id: str, make: Callable[[str], Any], timeout_s: float) -> Ack:
        """Send a command to the node wherever its stream is; wait for the ack."""
        owner = await self._owner(node_id)
        if owner is None:
            return await self.sessions.send(node_id, make, timeout_s)
        message = make("")
        request = relay_pb.RelayCommandRequest(
            node_id=node_id,
            command=message.command,
            timeout_s=timeout_s,
            from_replica=self.replica_id,
            owner_fence=owner.fence,
        )
        try:
            call: Any = self._stub(owner.address).Deliver(request, timeout=timeout_s + 2.0)
            result: pb.CommandResult = await call
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.FAILED_PRECONDITION:
                raise errors.FailedPrecondition(
                    exc.details() or "not connected", "node_id"
                ) from None
            if exc.code() in _DEAD:
                await self._owner_died(node_id, owner, exc)
                raise errors.FailedPrecondition(
                    f"node_id: node {node_id!r}'s owner replica {owner.replica} is unreachable "
                    f"({exc.code().name}); the node will reconnect to a live replica",
                    "node_id",
                ) from None
            raise
        self.relayed += 1
        if not result.acked:
            raise errors.CommandTimeout(result.message)
        return Ack(result.request_id, result.ok, result.message)

    async def set_mode(self, node_id: str, mode: NodeMode, reason: str) -> NodeRecord:
        """Set the mode as the node's single writer: here if we own it, else at its owner."""
        owner = None
        if self.ownership.fence_of(node_id) is None:
            owner = await self._owner(node_id)
        if owner is not None:
            request = relay_pb.RelaySetModeRequest(
                node_id=node_id,
                mode=pb.NodeMode.ValueType(mode),
                reason=reason,
                from_replica=self.replica_id,
            )
            try:
                call: Any = self._stub(owner.address).SetMode(request, timeout=self._timeout_s)
                reply: relay_pb.RelaySetModeResponse = await call
            except grpc.aio.AioRpcError as exc:
                if exc.code() not in _DEAD:
                    raise
                await self._owner_died(node_id, owner, exc)
            else:
                if reply.applied:
                    self.relayed += 1
                    return await self._await_mode(node_id, mode)
        return await self.fleet.set_mode(node_id, mode, reason)

    async def _await_mode(self, node_id: str, mode: NodeMode) -> NodeRecord:
        """The owner wrote it; wait (briefly) until the change reached this replica."""
        for _ in range(100):
            record = self.fleet.store.get(node_id)
            if record is None:
                raise errors.NotFound(f"node_id: unknown node {node_id!r}", "node_id")
            if record.mode is mode:
                return record
            await asyncio.sleep(0.01)
        record = self.fleet.store.get(node_id)
        if record is None:
            raise errors.NotFound(f"node_id: unknown node {node_id!r}", "node_id")
        return record
