"""What a node credential may claim: node ids, and the tenants of the streams it reports.

Rules (docs/security.md, "edge node"):

- a credential registers only the node ids its ``nodes=`` patterns allow;
- while a node is connected, only the credential that registered it may register it again (a
  restarting node replaces its own older stream; a different credential never displaces it);
- a stream's tenant is accepted only if the credential may carry that tenant (``tenants=``),
  never the reserved platform tenant, and never a tenant other than the one the stream is
  already bound to: while any node carries a stream, the tenant it was first reported with is
  authoritative (the fleet index's binding), so no node can re-assign another tenant's stream;
  the binding ends when no node carries the stream any more.

Pure logic over records and principals: no grpc, no store writes.
"""

from __future__ import annotations

from collections.abc import Callable

from api_balancing import errors
from api_balancing.model import LoadReport, NodeRecord
from pkg.common.auth import Principal
from pkg.common.tenant import RESERVED_TENANTS

CREDENTIAL_KEY = "credential"  # NodeRecord.extra: the credential that registered the node


def check_register(principal: Principal, node_id: str, current: NodeRecord | None) -> None:
    """Raise PermissionDenied unless ``principal`` may register ``node_id`` now."""
    if not principal.may_register(node_id):
        allowed = "|".join(principal.nodes) or "none"
        raise errors.PermissionDenied(
            f"register.node_id: credential {principal.name!r} may not register node "
            f"{node_id!r} (its node ids: {allowed})",
            "register.node_id",
        )
    if current is None or not current.connected:
        return
    holder = current.extra.get(CREDENTIAL_KEY, "")
    if holder and holder != principal.name:
        raise errors.PermissionDenied(
            f"register.node_id: node {node_id!r} is connected under another credential; "
            "a different credential cannot displace it",
            "register.node_id",
        )


def check_report(
    principal: Principal,
    node_id: str,
    report: LoadReport,
    bound_tenant: Callable[[str], str | None],
    checked: tuple[tuple[str, ...], tuple[str, ...]] | None = None,
) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Raise PermissionDenied naming the first stream whose tenant this node may not report.

    ``bound_tenant(stream_id)`` is the tenant the stream is bound to while some node carries
    it (None when no node does). Returns the report's ``(stream_ids, tenant_ids)``: passed
    back as ``checked`` with the same credential's next report, the same tuples (validation
    shares them while a node lists the same streams) skip the credential's checks, which
    depend on nothing else; only the bindings are compared again.
    """
    ids, tenants = report.stream_ids, report.tenant_ids
    if (
        checked is not None
        and checked[0] is ids
        and checked[1] is tenants
        and tuple(map(bound_tenant, ids)) == tenants
    ):
        return ids, tenants
    allowed: set[str] = set()  # tenants already checked in this report: a node has few
    for i, (stream_id, tenant) in enumerate(zip(ids, tenants, strict=True)):
        if tenant not in allowed:
            if tenant in RESERVED_TENANTS:
                where = f"report.streams[{i}].tenant_id"
                raise errors.PermissionDenied(
                    f"{where}: {tenant!r} is reserved for platform events", where
                )
            if not principal.may_carry(tenant):
                where = f"report.streams[{i}].tenant_id"
                raise errors.PermissionDenied(
                    f"{where}: credential {principal.name!r} may not report streams of tenant "
                    f"{tenant!r}",
                    where,
                )
            allowed.add(tenant)
        bound = bound_tenant(stream_id)
        if bound is not None and bound != tenant:
            where = f"report.streams[{i}].tenant_id"
            raise errors.PermissionDenied(
                f"{where}: stream {stream_id!r} belongs to another tenant "
                f"(node {node_id!r} may not re-assign it)",
                where,
            )
    return ids, tenants
