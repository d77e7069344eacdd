"""``--tls`` for ``./dev up`` and ``./dev drill``: a throwaway CA under the run directory, a
certificate per process, and the harness's own client certificate.

Every server (Redis, PostgreSQL, the Kafka broker behind its TLS terminator, each service's gRPC
and HTTP side) gets a certificate of its own naming the address it listens on; services require
client certificates from each other (mTLS). The harness (status view, health polls, drills'
traffic, Prometheus) uses a certificate of its own. Its settings are put in this process's
environment as ``PLATFORM_TLS_*`` (no client authentication of its own to enforce): the
clients built here read them through ``client_tls()``, and the command-line tools and Kafka
clients read the same variables.
"""

from __future__ import annotations

import functools
import os
import ssl
from pathlib import Path

import grpc

from pkg.common.tls import (
    TlsSettings,
    client_ssl_context,
    grpc_channel_credentials,
    tls_from_env,
)
from pkg.devstack.certs import LOCAL_NAMES, CertFiles, CertificateAuthority


class DevTls:
    """The CA of one run and the certificates it issued (``<run dir>/tls``)."""

    def __init__(self, run_dir: Path) -> None:
        self.dir = Path(run_dir) / "tls"
        self.ca = CertificateAuthority(self.dir, name="platform dev CA")
        self.issued: dict[str, CertFiles] = {}

    def cert(self, name: str, address: str = "127.0.0.1") -> CertFiles:
        """The certificate of process ``name`` (issued once), valid for ``address`` too."""
        if name not in self.issued:
            sans = tuple(dict.fromkeys((*LOCAL_NAMES, address)))
            self.issued[name] = self.ca.issue(name, sans)
        return self.issued[name]

    def service_env(
        self, name: str, address: str = "127.0.0.1", client_auth: str = "require"
    ) -> dict[str, str]:
        """``PLATFORM_TLS_*`` of a service process: TLS servers (requiring client certificates
        unless ``client_auth`` is ``none``: Bridge's public side), its certificate as client
        certificate for its own calls."""
        return self.cert(name, address).env(client_auth)

    def tool_env(self, name: str, address: str = "127.0.0.1") -> dict[str, str]:
        """``PLATFORM_TLS_*`` of a tool (edge-sim, the viewers): CA and client certificate."""
        return self.cert(name, address).env("none")

    def enable_for_this_process(self) -> CertFiles:
        """Give this (the harness's) process its client certificate through the environment."""
        files = self.cert("harness")
        os.environ.update(files.env("none"))
        client_tls.cache_clear()
        return files


@functools.cache
def client_tls() -> TlsSettings:
    """The harness's TLS settings (``PLATFORM_TLS_*`` of this process; plaintext when unset)."""
    return tls_from_env({k: v for k, v in os.environ.items() if k.startswith("PLATFORM_TLS_")})


def grpc_credentials() -> grpc.ChannelCredentials | None:
    """Channel credentials for the harness's gRPC clients (None: plaintext)."""
    return grpc_channel_credentials(client_tls())


def http_verify() -> ssl.SSLContext | bool:
    """``verify=`` for the harness's HTTP clients: the CA and client certificate, or True."""
    return client_ssl_context(client_tls()) or True


def scheme() -> str:
    """``https`` when the harness runs the platform with TLS."""
    return "https" if client_tls().calls_tls else "http"
