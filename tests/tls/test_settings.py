"""The PLATFORM_TLS_* section: read by every service's one loader, checked when built."""

from __future__ import annotations

import pytest

from api_balancing.config import load_config as foghorn_config
from api_gateway.config import load_config as bridge_config
from api_realtime.config import load_config as signalman_config
from pkg.common.config import ConfigError
from pkg.common.tls import identity_map, tls_from_env
from pkg.devstack.certs import CertificateAuthority


@pytest.mark.parametrize("load", [foghorn_config, bridge_config, signalman_config])
def test_every_service_reads_the_same_platform_tls_settings(
    load: object, ca: CertificateAuthority
) -> None:
    files = ca.issue("svc")
    config = load(files.env("require"))  # type: ignore[operator]
    assert config.tls.mtls and config.tls.cert == str(files.cert)
    if hasattr(config, "grpc"):
        assert config.grpc.tls is config.tls
    assert config.http.tls is config.tls


def test_a_misspelled_tls_setting_is_refused_with_the_closest_name() -> None:
    with pytest.raises(ConfigError, match=r"PLATFORM_TLS_CERTS is not a setting \(did you mean "
                       r"PLATFORM_TLS_CERT\?\)"):  # fmt: skip
        foghorn_config({"PLATFORM_TLS_CERTS": "/x.pem"})


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"PLATFORM_TLS_CLIENT_AUTH": "optional"}, "PLATFORM_TLS_CLIENT_AUTH"),
        ({"PLATFORM_TLS_CERT": "/a.pem"}, "PLATFORM_TLS_KEY"),
        ({"PLATFORM_TLS_CLIENT_AUTH": "require"}, "PLATFORM_TLS_CLIENT_AUTH=require needs"),
        ({"PLATFORM_TLS_CA": "/nowhere/ca.pem"}, "PLATFORM_TLS_CA=/nowhere/ca.pem: no such file"),
    ],
)
def test_inconsistent_tls_settings_are_refused_naming_the_setting(
    env: dict[str, str], named: str
) -> None:
    with pytest.raises(ConfigError, match=named):
        tls_from_env(env)


def test_a_file_that_is_not_pem_is_refused(ca: CertificateAuthority) -> None:
    with pytest.raises(ConfigError, match=r"PLATFORM_TLS_CA=.*no PEM certificate"):
        tls_from_env({"PLATFORM_TLS_CA": str(ca.directory / "ca-key.pem")})


def test_certificate_identities_map_sans_to_credentials_and_bad_entries_are_refused(
    ca: CertificateAuthority,
) -> None:
    from pkg.common.tls import principal_from_certificate

    ids = identity_map("spiffe://platform/node/edge-1=edge-1:node")
    context = {"x509_subject_alternative_name": [b"127.0.0.1", b"spiffe://platform/node/edge-1"]}
    found = principal_from_certificate(context, ids)
    assert found is not None and found.name == "edge-1" and found.has_role("node")
    assert principal_from_certificate({"x509_subject_alternative_name": [b"x"]}, ids) is None
    files = ca.issue("idp")
    with pytest.raises(ConfigError, match="PLATFORM_TLS_IDENTITIES"):
        tls_from_env({**files.env("require"), "PLATFORM_TLS_IDENTITIES": "=nobody"})
    with pytest.raises(ConfigError, match="needs PLATFORM_TLS_CLIENT_AUTH=require"):
        tls_from_env({**files.env("none"), "PLATFORM_TLS_IDENTITIES": "san=x:node"})


@pytest.mark.parametrize(
    ("load", "var"),
    [
        (foghorn_config, "FOGHORN_GRPC_PLAINTEXT_PORT"),
        (signalman_config, "SIGNALMAN_GRPC_PLAINTEXT_PORT"),
    ],
)
def test_a_plaintext_port_without_tls_is_refused(load: object, var: str) -> None:
    with pytest.raises(ConfigError, match=var):
        load({var: "5000"})  # type: ignore[operator]
