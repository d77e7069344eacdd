"""Every hop over TLS at once (issue 13 items 2 and 4): edge nodes -> Foghorn (mTLS gRPC, HA
state in Redis over rediss://) -> Kafka (SSL with a client certificate) -> Signalman (mTLS
gRPC, history in Redis over rediss://, partition fencing in PostgreSQL with
sslmode=verify-full) -> a subscriber over mTLS. Real processes, every server TLS-only; the
subscriber sees the nodes Foghorn registered. Plaintext Kafka clients cannot reach the broker."""

from __future__ import annotations

import json
import sys
import uuid
from collections.abc import Callable

import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError

from pkg.clients.signalman import SignalmanClient
from pkg.common.kafkaconn import hosts
from pkg.common.tls import client_credentials
from pkg.devstack.certs import CertificateAuthority
from pkg.devstack.servers import CommandProcess, ServerProcess
from pkg.proto.signalman.v1 import signalman_pb2 as pb
from tests.signalman.conftest import TOKENS

pytestmark = pytest.mark.integration

PY = sys.executable
FOGHORN_TOKENS = TOKENS + ",tnode=edge:node;nodes=*;tenants=*,trelay=relay:replica"


async def test_node_events_travel_every_hop_over_tls(
    ca: CertificateAuthority,
    redis_factory: Callable[..., ServerProcess],
    kafka_factory: Callable[..., ServerProcess],
    postgres_factory: Callable[..., ServerProcess],
    process_factory: Callable[..., CommandProcess],
) -> None:
    store_cert = ca.issue("stores")
    redis = redis_factory(tls=store_cert)
    kafka = kafka_factory(tls=store_cert)
    postgres = postgres_factory(tls=store_cert)
    bootstrap = kafka.bootstrap  # type: ignore[attr-defined]
    assert bootstrap.startswith("ssl://")

    # A plaintext Kafka client gets nowhere.
    plain = AIOKafkaProducer(bootstrap_servers=hosts(bootstrap), request_timeout_ms=2000)
    with pytest.raises(KafkaError):
        await plain.start()
    await plain.stop()

    service = ca.issue("service")
    tls_env = service.env("require")
    suffix = uuid.uuid4().hex[:8]
    signalman = process_factory(
        "signalman",
        [PY, "-m", "api_realtime", "--grpc-port", "{port}", "--http-port", "-1"],
        env={**tls_env, "PLATFORM_TOKENS": TOKENS, "SIGNALMAN_REPLICA_ID": f"sm-{suffix}",
             "SIGNALMAN_KAFKA_BOOTSTRAP": bootstrap,
             "SIGNALMAN_REDIS_URL": redis.url,  # type: ignore[attr-defined]
             "SIGNALMAN_POSTGRES_DSN": postgres.dsn,  # type: ignore[attr-defined]
             "SIGNALMAN_GROUP_ID": f"sm-tls-{suffix}", "SIGNALMAN_SESSION_TIMEOUT_MS": "6000",
             "SIGNALMAN_HEARTBEAT_INTERVAL_MS": "500"},
        ready_timeout=60,
    )  # fmt: skip
    creds = client_credentials(str(ca.ca_path), str(service.cert), str(service.key))
    client = SignalmanClient(f"127.0.0.1:{signalman.port}", token="tsys", credentials=creds)
    try:
        async with client.subscribe(["system"], resume_from={"system": ("", 0)}) as sub:
            foghorn = process_factory(
                "foghorn",
                [PY, "-m", "api_balancing", "--grpc-port", "{port}", "--http-port", "-1"],
                env={**tls_env, "PLATFORM_TOKENS": FOGHORN_TOKENS,
                     "FOGHORN_REPLICA_ID": f"foghorn-{suffix}",
                     "FOGHORN_KAFKA_BOOTSTRAP": bootstrap,
                     "FOGHORN_REDIS_URL": redis.url,  # type: ignore[attr-defined]
                     "FOGHORN_CLUSTER": f"tls-{suffix}"},
            )  # fmt: skip
            process_factory(
                "edge-sim",
                [PY, "-m", "api_balancing.simulator", "--foghorn", f"127.0.0.1:{foghorn.port}",
                 "--nodes", "3", "--interval", "1", "--token", "tnode", "--base-port", "{port}",
                 "--tls-ca", str(ca.ca_path), "--tls-cert", str(service.cert),
                 "--tls-key", str(service.key)],
                ready_port=foghorn.port,
            )  # fmt: skip
            registered: set[str] = set()
            while len(registered) < 3:
                item = await sub.get(60)
                assert isinstance(item, pb.Event)
                data = json.loads(item.data_json)
                if item.type == "node.registered" and data.get("replica") == f"foghorn-{suffix}":
                    registered.add(data["node_id"])
    finally:
        await client.close()
