"""A node's identity from its client certificate (issue 13 item 2): with mTLS and
PLATFORM_TLS_IDENTITIES, a real Foghorn authenticates a call that carries no bearer token by the
SAN of the verified certificate, then applies the role model as for a token: the mapped node
registers its own id, not another's, and cannot use operator methods; a certificate that maps
to nothing is refused, naming the setting."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator, Iterator

import grpc
import grpc.aio
import pytest

from pkg.clients import Policy
from pkg.clients.foghorn import FoghornClient
from pkg.common.tls import client_credentials
from pkg.devstack.certs import CertFiles, CertificateAuthority
from pkg.devstack.servers import CommandProcess
from pkg.proto.foghorn.v1 import foghorn_pb2 as pb

pytestmark = pytest.mark.integration

NODE_SAN = "spiffe://platform/node/edge-cert-1"
IDENTITIES = f"{NODE_SAN}=edge-cert-1:node;nodes=edge-cert-1;tenants=*"


@pytest.fixture(scope="module")
def foghorn(ca: CertificateAuthority, tmp_path_factory: pytest.TempPathFactory
            ) -> Iterator[CommandProcess]:  # fmt: skip
    proc = CommandProcess(
        "foghorn-identity",
        [sys.executable, "-m", "api_balancing", "--grpc-port", "{port}", "--http-port", "-1"],
        run_dir=tmp_path_factory.mktemp("foghorn-identity"),
        env={**ca.issue("foghorn").env("require"), "PLATFORM_TLS_IDENTITIES": IDENTITIES,
             "PLATFORM_TOKENS": "tops=ops:operator"},
    )  # fmt: skip
    proc.start()
    try:
        yield proc
    finally:
        proc.stop(timeout=5)


def _client(proc: CommandProcess, ca: CertificateAuthority, cert: CertFiles) -> FoghornClient:
    creds = client_credentials(str(ca.ca_path), str(cert.cert), str(cert.key))
    return FoghornClient(f"127.0.0.1:{proc.port}", credentials=creds, policy=Policy(timeout=5.0))


async def _register(client: FoghornClient, node_id: str) -> pb.ControlMessage:
    async def messages() -> AsyncIterator[pb.NodeMessage]:
        yield pb.NodeMessage(
            register=pb.Register(
                node_id=node_id, roles=["edge"], capabilities=["hls"],
                base_url="http://10.0.0.1:8080",
                location=pb.GeoPoint(latitude=48.8, longitude=2.3), capacity=100,
            )
        )  # fmt: skip
        await asyncio.sleep(30)  # keep the stream open while the test reads

    call = client.connect(messages())
    try:
        reply: pb.ControlMessage = await call.read()
        return reply
    finally:
        call.cancel()


async def test_a_node_certificate_registers_its_own_node_without_a_token(
    foghorn: CommandProcess, ca: CertificateAuthority
) -> None:
    async with _client(foghorn, ca, ca.issue("edge-cert-1", ("127.0.0.1", NODE_SAN))) as client:
        reply = await _register(client, "edge-cert-1")
        assert reply.WhichOneof("msg") == "registered", reply
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await _register(client, "edge-someone-else")
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await client.list_nodes()  # operator only
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED


async def test_a_certificate_mapped_to_no_identity_is_refused_naming_the_setting(
    foghorn: CommandProcess, ca: CertificateAuthority
) -> None:
    async with _client(foghorn, ca, ca.issue("unmapped", ("127.0.0.1",))) as client:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await _register(client, "edge-cert-1")
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "PLATFORM_TLS_IDENTITIES" in (err.value.details() or "")
