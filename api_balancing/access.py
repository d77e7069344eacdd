"""Foghorn's access map: the role every gRPC method and HTTP route needs (docs/security.md).

Deny by default: a method or route missing here is refused (gRPC) or cannot be mounted (HTTP),
and tests/security/test_access_maps.py fails for any served method not listed.
"""

from __future__ import annotations

from pkg.common.auth import NODE, OPERATOR, REPLICA
from pkg.common.authz import PUBLIC, AccessMap, needs

GRPC = {
    # Edge nodes: the credential also names the node ids and tenants (api_balancing.identity).
    "/foghorn.v1.NodeControl/Connect": needs(NODE),
    # Public routing: anonymous callers are rate limited per address (api_balancing.limits).
    "/foghorn.v1.Routing/RouteViewer": PUBLIC,
    "/foghorn.v1.Routing/RouteIngest": PUBLIC,
    # Fleet-wide reads and mutations: platform operators.
    "/foghorn.v1.NodeAdmin/SetMode": needs(OPERATOR),
    "/foghorn.v1.NodeAdmin/ListNodes": needs(OPERATOR),
    "/foghorn.v1.NodeAdmin/GetNode": needs(OPERATOR),
    "/foghorn.v1.NodeAdmin/ExplainRoute": needs(OPERATOR),
    "/foghorn.v1.NodeAdmin/SendCommand": needs(OPERATOR),
    "/foghorn.v1.NodeAdmin/MoveNodes": needs(OPERATOR),
    # Replica to replica (HA command relay): its own credential, never a node's or operator's.
    "/foghorn.v1.Relay/Deliver": needs(REPLICA),
    "/foghorn.v1.Relay/SetMode": needs(REPLICA),
    "/foghorn.v1.Relay/StoreReachable": needs(REPLICA),
}

HTTP = {
    "GET /health": PUBLIC,  # ok/degraded only; the full document needs operator (see http.py)
    "GET /play/{content:path}": PUBLIC,
    "GET /nodes": needs(OPERATOR),
    "GET /metrics": needs(OPERATOR),
}

FOGHORN_ACCESS = AccessMap("foghorn", GRPC, HTTP)
