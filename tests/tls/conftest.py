"""A throwaway CA per test module and helpers to reach TLS servers (pkg.devstack.certs)."""

from __future__ import annotations

import socket
import ssl
import warnings
from pathlib import Path

import pytest

from pkg.devstack.certs import CertFiles, CertificateAuthority


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> CertificateAuthority:
    return CertificateAuthority(tmp_path_factory.mktemp("ca"))


@pytest.fixture(scope="module")
def foreign_ca(tmp_path_factory: pytest.TempPathFactory) -> CertificateAuthority:
    """A CA nobody on the platform trusts."""
    return CertificateAuthority(tmp_path_factory.mktemp("foreign-ca"), name="foreign CA")


def handshake(port: int, ca_path: Path, client: CertFiles | None = None,
              max_version: ssl.TLSVersion | None = None) -> ssl.SSLSocket:  # fmt: skip
    """Open a TLS connection to 127.0.0.1:``port`` (ALPN h2, as gRPC) and return it; raises
    ``ssl.SSLError`` / ``OSError`` when the handshake fails."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(str(ca_path))
    if client is not None:
        ctx.load_cert_chain(str(client.cert), str(client.key))
    if max_version is not None:
        ctx.set_ciphers("DEFAULT:@SECLEVEL=0")  # let this client offer old versions at all
        with warnings.catch_warnings():  # TLS 1.1 is deprecated: that is what is tested
            warnings.simplefilter("ignore", DeprecationWarning)
            ctx.minimum_version = ssl.TLSVersion.MINIMUM_SUPPORTED
            ctx.maximum_version = max_version
    ctx.set_alpn_protocols(["h2", "http/1.1"])
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    try:
        tls = ctx.wrap_socket(sock, server_hostname="127.0.0.1")
        # TLS 1.3: a refused client certificate is only reported on the first read.
        tls.settimeout(0.5)
        try:
            if tls.recv(1) == b"":
                raise ConnectionResetError("the server closed the connection after the handshake")
        except TimeoutError:
            pass  # nothing to read yet (an HTTP server waits for the request): accepted
        return tls
    except BaseException:
        sock.close()
        raise


def serial_of(tls: ssl.SSLSocket) -> int:
    from cryptography import x509

    der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number
