"""Throwaway certificates for the dev stack and the tests: a CA and leaf certificates it signs.

``./dev up --tls`` makes one CA under the run directory and a certificate per service, server and
tool (``localhost`` / ``127.0.0.1`` SANs, usable as server and as client certificate), so every
hop runs TLS and services authenticate each other with mTLS. Nothing here is for production:
keys are written unencrypted, next to the certificates.
"""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

DEFAULT_DAYS = 7
LOCAL_NAMES = ("localhost", "127.0.0.1")


@dataclass(frozen=True)
class CertFiles:
    """Paths of one issued certificate: ``cert`` (leaf PEM), ``key``, and the CA bundle."""

    cert: Path
    key: Path
    ca: Path

    def env(self, client_auth: str = "require") -> dict[str, str]:
        """The ``PLATFORM_TLS_*`` variables of a process using these files."""
        return {
            "PLATFORM_TLS_CERT": str(self.cert),
            "PLATFORM_TLS_KEY": str(self.key),
            "PLATFORM_TLS_CA": str(self.ca),
            "PLATFORM_TLS_CLIENT_AUTH": client_auth,
        }


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    data = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_bytes(data)
    tmp.chmod(0o600)
    tmp.replace(path)


def _write_cert(path: Path, cert: x509.Certificate) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    tmp.replace(path)


def _san(name: str) -> x509.GeneralName:
    if "://" in name:
        return x509.UniformResourceIdentifier(name)
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)


class CertificateAuthority:
    """A CA whose key stays in memory (and on disk under ``directory``): issues leaves."""

    def __init__(self, directory: Path, name: str = "platform dev CA", days: int = DEFAULT_DAYS):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.key = _key()
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = _now()
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(self.key.public_key()), critical=False
            )
            .sign(self.key, hashes.SHA256())
        )
        self.ca_path = self.directory / "ca.pem"
        _write_cert(self.ca_path, self.cert)
        _write_key(self.directory / "ca-key.pem", self.key)

    def issue(
        self,
        name: str,
        sans: tuple[str, ...] = LOCAL_NAMES,
        *,
        days: float = DEFAULT_DAYS,
        not_before: datetime.datetime | None = None,
        directory: Path | None = None,
    ) -> CertFiles:
        """Write ``<name>.pem`` / ``<name>-key.pem``: a leaf for ``sans`` (DNS names, IPs,
        ``scheme://`` URIs) valid as server and client certificate."""
        key = _key()
        start = not_before or (_now() - datetime.timedelta(minutes=5))
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(start + datetime.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.SubjectAlternativeName([_san(s) for s in sans]), critical=False)
            .add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
                ),
                critical=False,
            )
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()),
                critical=False,
            )
            .sign(self.key, hashes.SHA256())
        )
        where = Path(directory) if directory is not None else self.directory
        where.mkdir(parents=True, exist_ok=True)
        files = CertFiles(where / f"{name}.pem", where / f"{name}-key.pem", self.ca_path)
        _write_key(files.key, key)
        _write_cert(files.cert, cert)
        return files
