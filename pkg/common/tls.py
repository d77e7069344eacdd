"""Transport security for every hop: the ``PLATFORM_TLS_*`` settings, checked at start, and the
credentials the gRPC servers, the HTTP sides and every caller build from them.

One section of settings, the same in all three services and in the command-line tools
(docs/tls.md lists them):

- ``PLATFORM_TLS_CERT`` / ``PLATFORM_TLS_KEY``: this process's certificate chain and private key
  (PEM files). Servers present them; callers present them as their client certificate when a
  server asks (mTLS).
- ``PLATFORM_TLS_CA``: the CA bundle that peers are verified against: the servers this process
  calls, and (with client authentication) the clients that call it. Set on its own, the process
  calls out over TLS and serves plaintext (the first step of a rollout).
- ``PLATFORM_TLS_CLIENT_AUTH``: ``none`` (default) or ``require``: a client without a
  certificate signed by the CA bundle is refused at the handshake.
- ``PLATFORM_TLS_IDENTITIES``: certificate identities (a SAN of the client certificate) mapped
  to platform credentials, in the token-spec syntax of ``pkg.common.auth``, so that an edge node
  can authenticate with its certificate instead of a bearer token.

Every file is read and checked when the settings are built (missing file, not PEM, key that
does not match the certificate, certificate expired or not yet valid, certificate not issued by
the CA bundle): ``ConfigError`` names the setting and the process stops at start. While running,
a server notices changed files (on the next handshake for gRPC, within ``RELOAD_CHECK_S`` for
HTTP) and serves the new certificate without a restart; a changed set that does not pass the
same checks is logged and the previous certificate is kept.
"""

from __future__ import annotations

import argparse
import datetime
import os
import ssl
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import grpc
import structlog
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes

from pkg.common.auth import Principal, parse_tokens
from pkg.common.config import ConfigError, load

log = structlog.get_logger("pkg.common.tls")

PREFIX = "PLATFORM_TLS"
CLIENT_AUTH_MODES = ("none", "require")
# How often an HTTP side looks at its certificate files (gRPC looks on every new handshake).
RELOAD_CHECK_S = 2.0


@dataclass(frozen=True)
class TlsSettings:
    """``PLATFORM_TLS_*``: this process's certificate, the CA bundle it trusts, client auth.

    A section of every service's settings (read with its own prefix, ``PLATFORM_TLS``); the
    command-line tools read it with ``tls_from_env``. Files are checked at construction.
    """

    PREFIX: ClassVar[str] = PREFIX

    cert: str = ""  # PEM certificate chain (leaf first)
    key: str = ""  # PEM private key of the leaf (unencrypted)
    ca: str = ""  # PEM CA bundle peers are verified against
    client_auth: str = "none"  # none | require (servers)
    identities: str = ""  # SAN=NAME[:ROLES][;OPTION=VALUE...] entries, as PLATFORM_TOKENS

    def __post_init__(self) -> None:
        if self.client_auth not in CLIENT_AUTH_MODES:
            raise ConfigError(
                f"{PREFIX}_CLIENT_AUTH={self.client_auth!r}: expected one of "
                f"{', '.join(CLIENT_AUTH_MODES)}"
            )
        if bool(self.cert) != bool(self.key):
            missing = f"{PREFIX}_KEY" if self.cert else f"{PREFIX}_CERT"
            raise ConfigError(f"{missing} is required with {PREFIX}_CERT / {PREFIX}_KEY")
        if self.client_auth == "require" and not (self.cert and self.ca):
            raise ConfigError(
                f"{PREFIX}_CLIENT_AUTH=require needs {PREFIX}_CERT, {PREFIX}_KEY (the server's "
                f"own certificate) and {PREFIX}_CA (the bundle client certificates are checked "
                "against)"
            )
        if self.identities and self.client_auth != "require":
            raise ConfigError(
                f"{PREFIX}_IDENTITIES maps client certificates to credentials: it needs "
                f"{PREFIX}_CLIENT_AUTH=require"
            )
        check_files(self)
        identity_map(self.identities)  # raises ConfigError on a bad entry

    @property
    def serves_tls(self) -> bool:
        """Servers listen with TLS (a certificate is configured)."""
        return bool(self.cert)

    @property
    def calls_tls(self) -> bool:
        """Callers connect with TLS (a CA bundle is configured)."""
        return bool(self.ca)

    @property
    def mtls(self) -> bool:
        return self.client_auth == "require"

    def describe(self) -> str:
        """What this process's servers speak, for status views: ``mtls``, ``tls``, ``plaintext``."""
        if self.mtls:
            return "mtls"
        return "tls" if self.serves_tls else "plaintext"


def tls_from_env(env: Mapping[str, str] | None = None, **overrides: Any) -> TlsSettings:
    """``PLATFORM_TLS_*`` from ``env`` (default ``os.environ``): for tools and tests."""
    return load(TlsSettings, PREFIX, env, **overrides)


# --------------------------------------------------------------------------------------------
# Files and their checks
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Material:
    """The PEM bytes of one consistent, checked set of files."""

    cert: bytes | None
    key: bytes | None
    ca: bytes | None
    not_after: datetime.datetime | None = None

    @property
    def pair(self) -> tuple[bytes, bytes] | None:
        return (self.key, self.cert) if self.key and self.cert else None


def _read(setting: str, path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise ConfigError(f"{setting}={path}: no such file") from None
    except OSError as exc:
        raise ConfigError(f"{setting}={path}: cannot read it ({exc.strerror})") from None


def _certificates(setting: str, path: str, data: bytes) -> list[x509.Certificate]:
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError:
        certs = []
    if not certs:
        raise ConfigError(f"{setting}={path}: no PEM certificate in the file")
    return certs


def _private_key(setting: str, path: str, data: bytes) -> PrivateKeyTypes:
    try:
        return serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        reason = "encrypted keys are not supported" if isinstance(exc, TypeError) else str(exc)
        raise ConfigError(f"{setting}={path}: not a PEM private key ({reason})") from None


def _public_der(key: Any) -> bytes:
    der: bytes = key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return der


def _issued_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, Exception):  # InvalidSignature, mismatched names/key types
        return False
    return True


def _chains_to(leaf: x509.Certificate, chain: list[x509.Certificate],
               roots: list[x509.Certificate]) -> bool:  # fmt: skip
    """``leaf`` is issued by one of ``roots``, directly or through certificates of ``chain``."""
    current, seen = leaf, 0
    while seen <= len(chain):
        if any(_issued_by(current, root) for root in roots):
            return True
        parent = next((c for c in chain if c is not current and _issued_by(current, c)), None)
        if parent is None:
            return False
        current, seen = parent, seen + 1
    return False


def load_material(settings: TlsSettings, now: datetime.datetime | None = None) -> Material:
    """Read and check the files of ``settings``; ``ConfigError`` names the setting at fault."""
    now = now or datetime.datetime.now(datetime.UTC)
    cert_pem = key_pem = ca_pem = None
    roots: list[x509.Certificate] = []
    not_after = None
    if settings.ca:
        ca_pem = _read(f"{PREFIX}_CA", settings.ca)
        roots = _certificates(f"{PREFIX}_CA", settings.ca, ca_pem)
    if settings.cert:
        cert_pem = _read(f"{PREFIX}_CERT", settings.cert)
        chain = _certificates(f"{PREFIX}_CERT", settings.cert, cert_pem)
        key_pem = _read(f"{PREFIX}_KEY", settings.key)
        key = _private_key(f"{PREFIX}_KEY", settings.key, key_pem)
        leaf = chain[0]
        if _public_der(key.public_key()) != _public_der(leaf.public_key()):
            raise ConfigError(
                f"{PREFIX}_KEY={settings.key}: this key does not match the certificate in "
                f"{PREFIX}_CERT={settings.cert}"
            )
        if now > leaf.not_valid_after_utc:
            raise ConfigError(
                f"{PREFIX}_CERT={settings.cert}: the certificate expired at "
                f"{leaf.not_valid_after_utc.isoformat()}"
            )
        if now < leaf.not_valid_before_utc:
            raise ConfigError(
                f"{PREFIX}_CERT={settings.cert}: the certificate is not valid before "
                f"{leaf.not_valid_before_utc.isoformat()}"
            )
        if roots and not _chains_to(leaf, chain[1:], roots):
            raise ConfigError(
                f"{PREFIX}_CA={settings.ca}: no CA in this bundle issued the certificate in "
                f"{PREFIX}_CERT={settings.cert} (peers checking it against the same bundle "
                "would refuse it)"
            )
        not_after = leaf.not_valid_after_utc
    return Material(cert_pem, key_pem, ca_pem, not_after)


def check_files(settings: TlsSettings) -> None:
    load_material(settings)


# --------------------------------------------------------------------------------------------
# Reloading
# --------------------------------------------------------------------------------------------


class CertificateFiles:
    """The files of ``settings`` and the last set that passed the checks.

    ``changed()`` returns a newly checked ``Material`` when a file's modification time, size or
    inode changed since the last look, else None; a new set that fails the checks is logged and
    the previous one stays (a half-written rotation must not take a server down).
    """

    def __init__(self, settings: TlsSettings) -> None:
        self.settings = settings
        self.current = load_material(settings)
        self._stamp = self._stamps()
        self._lock = threading.Lock()
        self.reloads = 0
        self.reload_failures = 0

    def _stamps(self) -> tuple[tuple[int, int, int], ...]:
        out = []
        for path in (self.settings.cert, self.settings.key, self.settings.ca):
            if not path:
                continue
            try:
                st = os.stat(path)
            except OSError:
                out.append((0, 0, 0))
                continue
            out.append((st.st_mtime_ns, st.st_size, st.st_ino))
        return tuple(out)

    def changed(self) -> Material | None:
        stamp = self._stamps()
        if stamp == self._stamp:
            return None
        with self._lock:
            if stamp == self._stamp:
                return None
            self._stamp = stamp
            try:
                material = load_material(self.settings)
            except ConfigError as exc:
                self.reload_failures += 1
                log.error("tls_reload_refused", reason=str(exc))
                return None
            self.current = material
            self.reloads += 1
            log.info("tls_reloaded", cert=self.settings.cert, not_after=str(material.not_after))
            return material


# --------------------------------------------------------------------------------------------
# gRPC
# --------------------------------------------------------------------------------------------


def _server_config(material: Material) -> grpc.ServerCertificateConfiguration:
    pair = material.pair
    assert pair is not None
    return grpc.ssl_server_certificate_configuration([pair], root_certificates=material.ca)


def grpc_server_credentials(settings: TlsSettings) -> grpc.ServerCredentials | None:
    """TLS credentials for a gRPC server port (None: serve plaintext).

    grpc core asks the fetcher for a new configuration on each new handshake; it answers with
    the changed files' certificate (or None: keep the current one), so a rotation reaches new
    connections without a restart. TLS 1.2 is grpc core's floor; client certificates are
    requested and required only with ``client_auth=require``.
    """
    if not settings.serves_tls:
        return None
    files = CertificateFiles(settings)

    def fetch() -> grpc.ServerCertificateConfiguration | None:
        material = files.changed()
        return _server_config(material) if material is not None else None

    return grpc.dynamic_ssl_server_credentials(
        _server_config(files.current),
        fetch,  # type: ignore[arg-type]  # grpc-stubs omit the None ("no change") answer
        require_client_authentication=settings.mtls,
    )


def grpc_channel_credentials(settings: TlsSettings) -> grpc.ChannelCredentials | None:
    """TLS credentials for channels to platform servers (None: plaintext).

    The CA bundle verifies the server (its certificate must name the address dialled: an IP or
    DNS SAN); the process's own certificate is offered as the client certificate when one is
    configured. Read when the channel is made: a rotated client certificate is used by channels
    made after the change.
    """
    if not settings.calls_tls:
        return None
    material = load_material(settings)
    pair = material.pair
    return grpc.ssl_channel_credentials(
        root_certificates=material.ca,
        private_key=pair[0] if pair else None,
        certificate_chain=pair[1] if pair else None,
    )


def client_credentials(
    ca: str = "", cert: str = "", key: str = ""
) -> grpc.ChannelCredentials | None:
    """Channel credentials from file paths (command-line tools' ``--tls-ca`` and friends)."""
    return grpc_channel_credentials(TlsSettings(cert=cert, key=key, ca=ca))


_FLAGS = {"CA": "--tls-ca", "CERT": "--tls-cert", "KEY": "--tls-key"}


def add_tls_arguments(
    parser: argparse.ArgumentParser, env: Mapping[str, str] | None = None
) -> None:
    """``--tls-ca`` / ``--tls-cert`` / ``--tls-key`` for a command-line tool, defaulting to
    ``PLATFORM_TLS_CA`` / ``_CERT`` / ``_KEY``."""
    env = os.environ if env is None else env
    group = parser.add_argument_group(
        "TLS", "TLS to the servers (plaintext without a CA bundle); see docs/tls.md"
    )
    for what, flag in _FLAGS.items():
        var = f"{PREFIX}_{what}"
        help_text = {
            "CA": "CA bundle the servers' certificates are checked against",
            "CERT": "client certificate (mTLS)",
            "KEY": "private key of the client certificate",
        }[what]
        group.add_argument(flag, default=env.get(var, ""), help=f"{help_text} (env {var})")


def credentials_from_args(args: argparse.Namespace) -> grpc.ChannelCredentials | None:
    """The channel credentials of ``add_tls_arguments``'s flags; ``ConfigError`` names the flag."""
    try:
        return client_credentials(args.tls_ca, args.tls_cert, args.tls_key)
    except ConfigError as exc:
        text = str(exc)
        for what, flag in _FLAGS.items():
            text = text.replace(f"{PREFIX}_{what}=", f"{flag} ({PREFIX}_{what})=")
        raise ConfigError(text) from None


# --------------------------------------------------------------------------------------------
# HTTP (uvicorn, httpx) and stores
# --------------------------------------------------------------------------------------------


def server_ssl_context(settings: TlsSettings) -> ssl.SSLContext | None:
    """An ``SSLContext`` for an HTTPS listener (TLS 1.2+, client certificates as configured)."""
    if not settings.serves_tls:
        return None
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(settings.cert, settings.key)
    if settings.ca:
        ctx.load_verify_locations(settings.ca)
    ctx.verify_mode = ssl.CERT_REQUIRED if settings.mtls else ssl.CERT_NONE
    return ctx


def client_ssl_context(settings: TlsSettings) -> ssl.SSLContext | None:
    """An ``SSLContext`` for HTTPS and store clients (None: plaintext)."""
    if not settings.calls_tls:
        return None
    ctx = ssl.create_default_context(cafile=settings.ca)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if settings.cert:
        ctx.load_cert_chain(settings.cert, settings.key)
    return ctx


# --------------------------------------------------------------------------------------------
# Identity from the client certificate
# --------------------------------------------------------------------------------------------


def identity_map(spec: str) -> dict[str, Principal]:
    """``PLATFORM_TLS_IDENTITIES``: SAN -> principal, in the token-spec entry syntax."""
    try:
        return parse_tokens(spec)
    except ValueError as exc:  # the token spec's own error names the entry
        raise ConfigError(f"{PREFIX}_IDENTITIES: {exc}") from None


def peer_sans(auth_context: Mapping[str, Any]) -> list[str]:
    """The subject alternative names of a gRPC peer's verified client certificate."""
    values = auth_context.get("x509_subject_alternative_name") or []
    return [v.decode() if isinstance(v, bytes) else str(v) for v in values]


def principal_from_certificate(
    auth_context: Mapping[str, Any], identities: Mapping[str, Principal]
) -> Principal | None:
    """The credential of a peer's certificate: the first of its SANs that ``identities`` maps
    (None: the certificate names no known identity)."""
    for san in peer_sans(auth_context):
        found = identities.get(san)
        if found is not None:
            return found
    return None


# No certificate, no CA: plaintext both ways (the default of every setting).
PLAINTEXT = TlsSettings()
