"""Bridge over TLS (issue 13 items 2 and 3): real processes, Foghorn requiring client
certificates, Bridge serving HTTPS without asking for one (its public side) and calling Foghorn
with the CA bundle and its own certificate. A GraphQL routing query over HTTPS is answered from
Foghorn; plaintext HTTP to the HTTPS port gets nothing."""

from __future__ import annotations

import sys
from collections.abc import Callable

import grpc
import grpc.aio
import httpx
import pytest

from pkg.clients import Policy
from pkg.clients.foghorn import FoghornClient
from pkg.common.tls import client_credentials, client_ssl_context, tls_from_env
from pkg.devstack.certs import CertificateAuthority
from pkg.devstack.servers import CommandProcess, free_port
from tests.bridge.fakes import SECRET, token
from tests.waiting import eventually

pytestmark = pytest.mark.integration

PY = sys.executable
TOKENS = "op-token=ops:operator,tnode=edge:node;nodes=*;tenants=*"
QUERY = '{ route(contentId: "live-0001", latitude: 48.8, longitude: 2.3) { best { nodeId } } }'


async def test_a_graphql_query_over_https_reaches_foghorn_over_mtls(
    ca: CertificateAuthority, process_factory: Callable[..., CommandProcess]
) -> None:
    foghorn = process_factory(
        "foghorn",
        [PY, "-m", "api_balancing", "--grpc-port", "{port}", "--http-port", "-1"],
        env={**ca.issue("foghorn").env("require"), "PLATFORM_TOKENS": TOKENS},
    )
    process_factory(
        "edge-sim",
        [PY, "-m", "api_balancing.simulator", "--foghorn", f"127.0.0.1:{foghorn.port}",
         "--nodes", "2", "--interval", "1", "--token", "tnode", "--base-port", "{port}"],
        env=ca.issue("edge-sim").env("none"),
        ready_port=foghorn.port,
    )  # fmt: skip
    port = free_port()
    process_factory(
        "bridge",
        [PY, "-m", "api_gateway", "--port", str(port), "--id", "bridge-tls"],
        port=port,
        env={**ca.issue("bridge").env("none"), "PLATFORM_TOKENS": TOKENS,
             "BRIDGE_FOGHORN_ADDRESSES": f"127.0.0.1:{foghorn.port}",
             "BRIDGE_FOGHORN_TOKEN": "op-token", "BRIDGE_JWT_HS256_SECRET": SECRET},
    )  # fmt: skip
    # Bridge is asked once edge-sim's nodes are routable at Foghorn (asked directly, over mTLS):
    # before they registered Foghorn rightly answers "no eligible node".
    me = ca.issue("test-client")
    creds = client_credentials(str(ca.ca_path), str(me.cert), str(me.key))
    async with FoghornClient(
        f"127.0.0.1:{foghorn.port}", token="op-token", credentials=creds, policy=Policy(timeout=5)
    ) as direct:

        async def routable() -> bool:
            try:
                await direct.route_viewer("live-0001", lat=48.8, lon=2.3)
            except grpc.aio.AioRpcError as exc:
                assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, exc  # no eligible node yet
                return False
            return True

        await eventually(routable, timeout=30, interval=0.2, what="edge-sim's nodes routable")
    verify = client_ssl_context(tls_from_env({"PLATFORM_TLS_CA": str(ca.ca_path)}))
    headers = {"authorization": f"Bearer {token('acme', ['user'])}"}
    async with httpx.AsyncClient(verify=verify, timeout=10) as http:
        reply = await http.post(
            f"https://127.0.0.1:{port}/graphql", json={"query": QUERY}, headers=headers
        )
        assert reply.status_code == 200, reply.text
        doc = reply.json()
        assert not doc.get("errors"), doc  # Foghorn answered Bridge over mTLS
        assert doc["data"]["route"]["best"]["nodeId"].startswith("edge-")
    async with httpx.AsyncClient(timeout=5) as plain:
        with pytest.raises(httpx.TransportError):
            await plain.post(f"http://127.0.0.1:{port}/graphql", json={"query": QUERY})
