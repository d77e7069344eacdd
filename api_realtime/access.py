"""Signalman's access map: the role every gRPC method and HTTP route needs (docs/security.md).

Deny by default: a method or route missing here is refused (gRPC) or cannot be mounted (HTTP).
The tenant of a subscription always comes from the credential (``subscription_tenant``).
"""

from __future__ import annotations

from pkg.common.auth import OPERATOR, SYSTEM, TENANT_ADMIN, TENANT_USER, Principal
from pkg.common.authz import PUBLIC, AccessMap, needs

GRPC = {
    # Tenant credentials read their tenant's channels; operators (and the platform's system
    # credential) read the SYSTEM channel of platform events.
    "/signalman.v1.Signalman/Subscribe": needs(TENANT_USER, TENANT_ADMIN, OPERATOR, SYSTEM),
    # Counters of the replica (partitions, lag, totals; subscribers of the caller's tenant):
    # no event content, no other tenant's figures. Clients use it as a readiness probe.
    "/signalman.v1.Signalman/GetStats": needs(TENANT_USER, TENANT_ADMIN, OPERATOR, SYSTEM),
    # Embedded mode's event intake: the platform's own publisher only.
    "/signalman.v1.Signalman/Publish": needs(SYSTEM),
}

HTTP = {
    "GET /health": PUBLIC,  # ok/degraded only; the full document needs operator
    "GET /metrics": needs(OPERATOR),
}

SIGNALMAN_ACCESS = AccessMap("signalman", GRPC, HTTP)


def subscription_tenant(principal: Principal) -> str:
    """Whose events a subscriber reads: its credential's tenant; "" for a platform credential
    (operator/system), which may read the SYSTEM channel only."""
    if principal.has_any((TENANT_USER, TENANT_ADMIN)):
        return principal.tenant
    return ""
