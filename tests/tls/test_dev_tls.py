"""./dev up --tls's pieces that need no platform: per-process certificates naming their
address, the environment each kind of process gets, Prometheus scraping over HTTPS with a client
certificate, and the refusal of --tls with --ha-stores (its Sentinels run plaintext)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from cryptography import x509

from devtools import up
from devtools.devtls import DevTls
from pkg.common.tls import tls_from_env
from pkg.devstack.servers import PrometheusServer


def test_every_process_gets_its_own_certificate_naming_its_address(tmp_path: Path) -> None:
    tls = DevTls(tmp_path)
    files = tls.cert("foghorn-0", "10.77.0.5")
    sans = (
        x509.load_pem_x509_certificate(files.cert.read_bytes())
        .extensions.get_extension_for_class(x509.SubjectAlternativeName)
        .value
    )
    assert {str(ip) for ip in sans.get_values_for_type(x509.IPAddress)} == {
        "127.0.0.1",
        "10.77.0.5",
    }
    assert tls.cert("foghorn-0") is files  # issued once
    assert tls.cert("foghorn-1").cert != files.cert
    service = tls_from_env(tls.service_env("foghorn-0", "10.77.0.5"))
    assert service.mtls and service.calls_tls
    public = tls_from_env(tls.service_env("bridge-0", client_auth="none"))
    assert public.serves_tls and not public.mtls  # Bridge's public side asks for no certificate
    assert tls_from_env(tls.tool_env("edge-sim")).calls_tls


def test_prometheus_scrapes_over_https_with_a_client_certificate_and_the_operator_token(
    tmp_path: Path,
) -> None:
    cert = DevTls(tmp_path).cert("prometheus")
    server = PrometheusServer({"foghorn": ["127.0.0.1:1"]}, [], run_dir=tmp_path / "prom",
                              bearer_token="tok", scrape_tls=cert)  # fmt: skip
    server.prepare()
    (job,) = json.loads((tmp_path / "prom" / "prometheus.yml").read_text())["scrape_configs"]
    assert job["scheme"] == "https"
    assert job["tls_config"] == {"ca_file": str(cert.ca), "cert_file": str(cert.cert),
                                 "key_file": str(cert.key)}  # fmt: skip
    assert job["authorization"]["credentials"] == "tok"


def test_tls_with_ha_stores_is_refused_with_the_reason(capsys: pytest.CaptureFixture[str]) -> None:
    assert up.main(["--tls", "--ha-stores"]) == 2
    assert "Sentinels" in capsys.readouterr().out
