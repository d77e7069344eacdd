"""Certificates rotate without a restart (issue 13 item 5): a real Foghorn replica whose
certificate files are replaced serves the new certificate to new connections (gRPC and HTTPS)
while the connections it already has keep serving; a half-written rotation (a key that does not
match) is refused and the previous certificate stays."""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Callable
from pathlib import Path

import grpc.aio
import pytest
from cryptography import x509
from grpc_health.v1 import health_pb2, health_pb2_grpc

from pkg.common.tls import client_credentials
from pkg.devstack.certs import CertFiles, CertificateAuthority
from pkg.devstack.servers import CommandProcess, free_port
from tests.tls.conftest import handshake, serial_of

pytestmark = pytest.mark.integration


def _serial(port: int, ca: CertificateAuthority, client: CertFiles) -> int:
    with handshake(port, ca.ca_path, client) as tls:
        return serial_of(tls)


async def _wait_serial(port: int, ca: CertificateAuthority, client: CertFiles, want: int,
                       within_s: float = 15.0) -> int:  # fmt: skip
    deadline = time.monotonic() + within_s
    seen = _serial(port, ca, client)
    while seen != want and time.monotonic() < deadline:
        await asyncio.sleep(0.2)
        seen = _serial(port, ca, client)
    return seen


async def test_a_rotated_certificate_is_served_to_new_connections_while_old_ones_keep_serving(
    ca: CertificateAuthority, tmp_path: Path, process_factory: Callable[..., CommandProcess]
) -> None:
    certs = tmp_path / "certs"
    first = ca.issue("foghorn", directory=certs)
    client = ca.issue("client", directory=certs)
    http_port = free_port()
    proc = process_factory(
        "foghorn-rotation",
        [sys.executable, "-m", "api_balancing", "--grpc-port", "{port}",
         "--http-port", str(http_port)],
        env=first.env("require"),
    )  # fmt: skip
    creds = client_credentials(str(ca.ca_path), str(client.cert), str(client.key))
    old_serial = _serial(proc.port, ca, client)
    async with grpc.aio.secure_channel(f"127.0.0.1:{proc.port}", creds) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        await health.Check(health_pb2.HealthCheckRequest(), timeout=5)

        # Calls on the open connection go on during and after the rotation.
        failures: list[BaseException] = []
        done = asyncio.Event()

        async def keep_calling() -> int:
            n = 0
            while not done.is_set():
                try:
                    await health.Check(health_pb2.HealthCheckRequest(), timeout=5)
                    n += 1
                except grpc.aio.AioRpcError as exc:
                    failures.append(exc)
                await asyncio.sleep(0.02)
            return n

        caller = asyncio.create_task(keep_calling())
        # A half-written rotation: the new key is in place, the certificate is still the old
        # one. Refused (logged), the old certificate keeps being served.
        second = ca.issue("foghorn-next", directory=tmp_path / "next")
        first.key.write_bytes(second.key.read_bytes())
        await asyncio.sleep(0.5)
        assert _serial(proc.port, ca, client) == old_serial
        first.cert.write_bytes(second.cert.read_bytes())
        new_serial = await _wait_serial(proc.port, ca, client, _file_serial(first.cert))
        assert new_serial != old_serial and new_serial == _file_serial(first.cert)
        # HTTPS reloads within its check period.
        assert await _wait_serial(http_port, ca, client, new_serial) == new_serial
        # A new channel works with the new certificate.
        async with grpc.aio.secure_channel(f"127.0.0.1:{proc.port}", creds) as fresh:
            await health_pb2_grpc.HealthStub(fresh).Check(
                health_pb2.HealthCheckRequest(), timeout=5
            )
        done.set()
        calls = await caller
    assert not failures, failures[:3]
    assert calls > 0


def _file_serial(path: Path) -> int:
    return x509.load_pem_x509_certificate(path.read_bytes()).serial_number
