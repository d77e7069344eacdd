"""./dev up --tls's pieces that need no platform: per-process certificates naming their
address, the environment each kind of process gets, Prometheus scraping over HTTPS with a client
certificate, and the refusal of --tls with --ha-stores (its Sentinels run plaintext)."""

from __future__ import annotations

import json
from pathlib import Path

from cryptography import x509

from devtools.devtls import DevTls
from devtools.ha_stores import HaStores
from pkg.common import redisconn
from pkg.common.tls import tls_from_env
from pkg.devstack.servers import (
    PostgresServer,
    PostgresStandby,
    PrometheusServer,
    RedisHA,
    multi_host_dsn,
)


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


def test_ha_stores_under_tls_give_every_store_process_a_certificate_and_tls_client_settings(
    tmp_path: Path,
) -> None:
    tls = DevTls(tmp_path)
    ha = RedisHA(tmp_path / "ha", replicas=2, sentinels=3, tls=tls.cert)
    assert all(s.tls is not None for s in [*ha.servers, *ha.sentinel_servers])
    assert len({s.tls.cert for s in [*ha.servers, *ha.sentinel_servers] if s.tls}) == 6
    parsed = redisconn.parse_spec(ha.spec)
    assert parsed.ssl and dict(parsed.ssl_options)["ssl_ca_certs"] == str(tls.ca.ca_path)
    sentinel = ha.sentinel_servers[0]
    sentinel.prepare()
    conf = sentinel.config_path.read_text()
    assert "port 0\n" in conf and f"tls-port {sentinel.port}\n" in conf
    assert "tls-replication yes" in conf and "tls-auth-clients yes" in conf
    assert "--tls-replication" in ha.servers[1].command()
    pg = PostgresServer(run_dir=tmp_path / "pg", tls=tls.cert("postgres"))
    standby = PostgresStandby(pg, run_dir=tmp_path / "pgs", tls=tls.cert("postgres-standby"))
    try:
        assert "sslmode=verify-full" in multi_host_dsn(pg, standby)
        assert "sslmode=verify-full" in standby.conninfo()
        # The status view names the store hops that run TLS (nothing started: all down).
        shown = "\n".join(HaStores(ha, pg, standby, tls=True).status_lines())
        assert "stores over TLS" in shown and "Sentinels" in shown and "standby" in shown
        assert "stores over TLS" not in "\n".join(HaStores(ha, pg, standby).status_lines())
    finally:
        standby.cleanup()
        pg.cleanup()
