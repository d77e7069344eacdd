"""gRPC and HTTPS over TLS and mTLS against a real Foghorn process (issue 13 items 2, 3, 6):
plaintext to a TLS port fails, the right CA works, a missing or foreign client certificate is
refused at the handshake, a client refuses a server its CA did not sign, TLS below 1.2 is
refused, and the command-line tools speak TLS with --tls-* flags."""

from __future__ import annotations

import asyncio
import datetime
import os
import ssl
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import grpc.aio
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from pkg.clients import Policy
from pkg.clients.foghorn import FoghornClient
from pkg.common.tls import client_credentials, client_ssl_context, tls_from_env
from pkg.devstack.certs import CertFiles, CertificateAuthority
from pkg.devstack.servers import CommandProcess, free_port
from tests.tls.conftest import handshake

pytestmark = pytest.mark.integration

PY = sys.executable
TOKENS = "tops=ops:operator,tnode=edge:node;nodes=*;tenants=*"


@pytest.fixture(scope="module")
def foghorn(ca: CertificateAuthority, tmp_path_factory: pytest.TempPathFactory
            ) -> Iterator[tuple[CommandProcess, int]]:  # fmt: skip
    """One Foghorn replica requiring client certificates, gRPC and HTTPS."""
    server = ca.issue("foghorn")
    http_port, plaintext_port = free_port(), free_port()
    proc = CommandProcess(
        "foghorn-tls",
        [PY, "-m", "api_balancing", "--grpc-port", "{port}", "--http-port", str(http_port)],
        run_dir=tmp_path_factory.mktemp("foghorn-tls"),
        env={"PLATFORM_TOKENS": TOKENS, **server.env("require"),
             "FOGHORN_GRPC_PLAINTEXT_PORT": str(plaintext_port)},
    )  # fmt: skip
    proc.start()
    proc.plaintext_port = plaintext_port  # type: ignore[attr-defined]
    try:
        yield proc, http_port
    finally:
        proc.stop(timeout=5)


@pytest.fixture(scope="module")
def client_cert(ca: CertificateAuthority) -> CertFiles:
    return ca.issue("client", ("spiffe://platform/node/edge-1",))


async def _health(port: int, credentials: grpc.ChannelCredentials | None) -> int:
    target = f"127.0.0.1:{port}"
    channel = (
        grpc.aio.secure_channel(target, credentials)
        if credentials is not None
        else grpc.aio.insecure_channel(target)  # raw-client: what a plaintext caller does
    )
    async with channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), timeout=5
        )
        return int(reply.status)


async def test_a_plaintext_client_is_refused_by_a_tls_port(foghorn: tuple) -> None:
    proc, _ = foghorn
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await _health(proc.port, None)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_during_a_rollout_a_replica_also_serves_plaintext_on_its_plaintext_port(
    foghorn: tuple,
) -> None:
    proc, _ = foghorn
    assert await _health(proc.plaintext_port, None) == health_pb2.HealthCheckResponse.SERVING
    with pytest.raises(grpc.aio.AioRpcError):  # the TLS port stays TLS-only
        await _health(proc.port, None)


async def test_a_client_with_the_platform_ca_and_its_certificate_is_served(
    foghorn: tuple, ca: CertificateAuthority, client_cert: CertFiles
) -> None:
    proc, _ = foghorn
    creds = client_credentials(str(ca.ca_path), str(client_cert.cert), str(client_cert.key))
    assert await _health(proc.port, creds) == health_pb2.HealthCheckResponse.SERVING
    async with FoghornClient(
        f"127.0.0.1:{proc.port}", token="tops", credentials=creds, policy=Policy(timeout=5.0)
    ) as client:
        assert await client.list_nodes() == []


async def test_a_client_without_a_certificate_is_refused_at_the_handshake(
    foghorn: tuple, ca: CertificateAuthority
) -> None:
    proc, _ = foghorn
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await _health(proc.port, client_credentials(str(ca.ca_path)))
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    with pytest.raises((ssl.SSLError, ConnectionError)):
        handshake(proc.port, ca.ca_path).close()


async def test_a_client_with_a_foreign_certificate_is_refused_at_the_handshake(
    foghorn: tuple, ca: CertificateAuthority, foreign_ca: CertificateAuthority
) -> None:
    proc, _ = foghorn
    foreign = foreign_ca.issue("intruder")
    creds = grpc.ssl_channel_credentials(
        ca.ca_path.read_bytes(), foreign.key.read_bytes(), foreign.cert.read_bytes()
    )
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await _health(proc.port, creds)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    with pytest.raises((ssl.SSLError, ConnectionError)):
        handshake(proc.port, ca.ca_path, foreign).close()


async def test_a_client_refuses_a_server_its_ca_did_not_sign(
    foghorn: tuple, foreign_ca: CertificateAuthority
) -> None:
    proc, _ = foghorn
    mine = foreign_ca.issue("other-client")
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await _health(
            proc.port, client_credentials(str(foreign_ca.ca_path), str(mine.cert), str(mine.key))
        )
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    with pytest.raises(ssl.SSLCertVerificationError):
        handshake(proc.port, foreign_ca.ca_path, mine).close()


def test_tls_below_1_2_is_refused_and_1_2_is_accepted(
    foghorn: tuple, ca: CertificateAuthority, client_cert: CertFiles
) -> None:
    proc, _ = foghorn
    with pytest.raises(ssl.SSLError) as err:
        handshake(proc.port, ca.ca_path, client_cert, max_version=ssl.TLSVersion.TLSv1_1)
    # The client did offer TLS 1.1 (not refused by our own OpenSSL): the server turned it down.
    assert err.value.reason != "NO_PROTOCOLS_AVAILABLE"
    tls = handshake(proc.port, ca.ca_path, client_cert, max_version=ssl.TLSVersion.TLSv1_2)
    with tls:
        assert tls.version() == "TLSv1.2"
        assert tls.selected_alpn_protocol() == "h2"


async def test_the_http_side_serves_https_with_the_same_certificates(
    foghorn: tuple, ca: CertificateAuthority, client_cert: CertFiles
) -> None:
    _, http_port = foghorn
    tls = tls_from_env(
        {"PLATFORM_TLS_CA": str(ca.ca_path), "PLATFORM_TLS_CERT": str(client_cert.cert),
         "PLATFORM_TLS_KEY": str(client_cert.key)}
    )  # fmt: skip
    async with httpx.AsyncClient(verify=client_ssl_context(tls)) as http:
        reply = await http.get(f"https://127.0.0.1:{http_port}/health", timeout=5)
        assert reply.status_code == 200
    # No client certificate: refused at the handshake; plaintext HTTP gets no answer.
    async with httpx.AsyncClient(verify=client_ssl_context(tls_from_env(
        {"PLATFORM_TLS_CA": str(ca.ca_path)}))) as http:  # fmt: skip
        with pytest.raises(httpx.TransportError):
            await http.get(f"https://127.0.0.1:{http_port}/health", timeout=5)
    async with httpx.AsyncClient() as http:
        with pytest.raises(httpx.TransportError):
            await http.get(f"http://127.0.0.1:{http_port}/health", timeout=5)


async def test_edge_sim_and_foghorn_admin_speak_mtls_with_their_flags(
    foghorn: tuple, ca: CertificateAuthority, client_cert: CertFiles,
    process_factory: Callable[..., CommandProcess],
) -> None:  # fmt: skip
    proc, _ = foghorn
    flags = ["--tls-ca", str(ca.ca_path), "--tls-cert", str(client_cert.cert),
             "--tls-key", str(client_cert.key)]  # fmt: skip
    process_factory(
        "edge-sim",
        [PY, "-m", "api_balancing.simulator", "--foghorn", f"127.0.0.1:{proc.port}",
         "--nodes", "2", "--interval", "1", "--token", "tnode", "--base-port", "{port}", *flags],
        ready_port=proc.port,
    )  # fmt: skip
    admin = [PY, "-m", "api_balancing.admin_cli", "--foghorn", f"127.0.0.1:{proc.port}",
             "--token", "tops"]  # fmt: skip
    out = ""
    for _ in range(60):
        result = await asyncio.to_thread(
            subprocess.run,
            [*admin, *flags, "nodes", "--connected"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 0, result.stderr[-500:]
        out = result.stdout
        if out.count("edge-") >= 2:
            break
        await asyncio.sleep(0.5)
    assert out.count("edge-") >= 2, out
    # Without the flags foghorn-admin cannot get through the handshake.
    result = await asyncio.to_thread(
        subprocess.run, [*admin, "nodes"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode != 0


def _start_foghorn(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [PY, "-m", "api_balancing", "--grpc-port", "0", "--http-port", "-1"],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.parametrize(
    ("case", "setting", "message"),
    [
        ("missing file", "PLATFORM_TLS_CERT", "no such file"),
        ("key of another certificate", "PLATFORM_TLS_KEY", "does not match the certificate"),
        ("expired certificate", "PLATFORM_TLS_CERT", "the certificate expired"),
        ("CA that did not sign it", "PLATFORM_TLS_CA", "no CA in this bundle issued"),
    ],
)
def test_bad_tls_configuration_stops_the_process_at_start_naming_the_setting(
    case: str, setting: str, message: str, ca: CertificateAuthority,
    foreign_ca: CertificateAuthority, tmp_path: Path,
) -> None:  # fmt: skip
    good = ca.issue(f"good-{case.split(maxsplit=1)[0]}", directory=tmp_path)
    env = good.env("require")
    if case == "missing file":
        env["PLATFORM_TLS_CERT"] = str(tmp_path / "nowhere.pem")
    elif case == "key of another certificate":
        env["PLATFORM_TLS_KEY"] = str(ca.issue("other", directory=tmp_path).key)
    elif case == "expired certificate":
        old = datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=10)
        expired = ca.issue("expired", days=1, not_before=old, directory=tmp_path)
        env.update(PLATFORM_TLS_CERT=str(expired.cert), PLATFORM_TLS_KEY=str(expired.key))
    else:
        env["PLATFORM_TLS_CA"] = str(foreign_ca.ca_path)
    result = _start_foghorn(env)
    assert result.returncode == 2, result.stderr[-800:]
    assert f"{setting}=" in result.stderr and message in result.stderr, result.stderr[-800:]
