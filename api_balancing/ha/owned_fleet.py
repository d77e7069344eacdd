"""The fleet as the node-facing handlers see it in HA mode: ownership on every node write.

A decorator around ``Fleet`` with the same ``fleet.NodeFleet`` interface (reads and
explanations are delegated unchanged):

- ``register`` acquires the node's ownership first and registers with that fence;
- ``accept_report`` / ``reject_report`` refresh the ownership and write with our fence; a lost
  ownership or a write refused (a newer fence exists) raises ``OwnershipLost``, which the
  control stream turns into ABORTED, so the node reconnects to whoever owns it now (a load
  report is staged, not awaited: when Redis refuses it later, ``NodeOwnership.refused`` closes
  the stream instead);
- ``disconnect`` releases the ownership record after marking the node disconnected;
  ``hand_over`` (the node was told to move to another replica) releases it and leaves the
  record connected;
- ``set_mode`` goes to the node's owner (single writer) through the relay.
"""

from __future__ import annotations

from collections.abc import Mapping

from api_balancing import errors
from api_balancing.fleet import Fleet, FleetSettings
from api_balancing.ha.ownership import NodeOwnership
from api_balancing.ha.relay import Relay
from api_balancing.model import (
    GeoPoint,
    HeldMode,
    LoadReport,
    NodeIdentity,
    NodeMode,
    NodeRecord,
)
from api_balancing.redirects import RedirectTracker
from api_balancing.scoring import Evaluation
from api_balancing.store.base import NodeStore, StaleWriteError
from pkg.common.clock import Clock


class OwnershipLost(errors.FoghornError):
    """This replica no longer owns the node's stream: close it with ABORTED."""

    code = "ABORTED"


class OwnedFleet:
    """``Fleet`` with fenced ownership (see the module docstring)."""

    def __init__(self, fleet: Fleet, ownership: NodeOwnership, relay: Relay) -> None:
        self._fleet = fleet
        self._ownership = ownership
        self._relay = relay

    @property
    def store(self) -> NodeStore:
        return self._fleet.store

    @property
    def clock(self) -> Clock:
        return self._fleet.clock

    @property
    def settings(self) -> FleetSettings:
        return self._fleet.settings

    @property
    def redirects(self) -> RedirectTracker:
        return self._fleet.redirects

    def is_stale(self, record: NodeRecord) -> bool:
        return self._fleet.is_stale(record)

    def bound_tenant(self, stream_id: str) -> str | None:
        return self._fleet.bound_tenant(stream_id)

    @property
    def stream_tenants(self) -> Mapping[str, str]:
        return self._fleet.stream_tenants

    def explain(
        self, content_id: str, location: GeoPoint | None, *, role: str = "edge", protocol: str = ""
    ) -> list[Evaluation]:
        return self._fleet.explain(content_id, location, role=role, protocol=protocol)

    async def register(
        self,
        identity: NodeIdentity,
        owner_fence: int = 0,
        credential: str = "",
        held: HeldMode | None = None,
    ) -> NodeRecord:
        fence = await self._ownership.acquire(identity.node_id)
        try:
            return await self._fleet.register(
                identity, owner_fence=max(fence, owner_fence), credential=credential, held=held
            )
        except StaleWriteError as exc:
            raise OwnershipLost(f"node {identity.node_id!r}: {exc}") from None

    async def _owned(self, node_id: str) -> None:
        if not await self._ownership.refresh(node_id):
            raise OwnershipLost(
                f"node {node_id!r}: another Foghorn replica owns this node's stream now"
            )

    async def accept_report(self, node_id: str, report: LoadReport) -> NodeRecord:
        if not self._ownership.fresh(node_id):  # the common case needs no coroutine
            await self._owned(node_id)
        try:
            return await self._fleet.accept_report(node_id, report)
        except StaleWriteError as exc:
            self._ownership.forget(node_id)
            raise OwnershipLost(f"node {node_id!r}: write refused: {exc}") from None

    async def reject_report(self, node_id: str, reason: str) -> None:
        await self._owned(node_id)
        try:
            await self._fleet.reject_report(node_id, reason)
        except StaleWriteError as exc:
            self._ownership.forget(node_id)
            raise OwnershipLost(f"node {node_id!r}: write refused: {exc}") from None

    async def disconnect(self, node_id: str) -> None:
        if self._ownership.fence_of(node_id) is None:
            return  # not ours (any more): the owner marks it
        try:
            await self._fleet.disconnect(node_id)
        except StaleWriteError:
            pass
        finally:
            await self._ownership.release(node_id)

    async def hand_over(self, node_id: str) -> None:
        """The node was told to move to another replica: let the ownership go (only if still
        ours) without marking the node disconnected, so it stays routable while it moves."""
        await self._ownership.release(node_id)

    async def set_mode(self, node_id: str, mode: NodeMode, reason: str = "") -> NodeRecord:
        if self._fleet.store.get(node_id) is None:
            raise errors.NotFound(f"node_id: unknown node {node_id!r}", "node_id")
        return await self._relay.set_mode(node_id, mode, reason)
