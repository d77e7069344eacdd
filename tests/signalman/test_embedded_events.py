"""The embedded platform (no Kafka, as ``./dev up --single``): Foghorn's events still reach
Signalman's subscribers, through Signalman's Publish RPC (``pkg.events.signalman``).

Signalman, Foghorn and a simulated fleet run as real processes.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable

import pytest

from pkg.clients.signalman import SignalmanClient
from pkg.devstack.servers import CommandProcess
from pkg.proto.signalman.v1 import signalman_pb2 as pb
from tests.signalman.conftest import TOKENS

pytestmark = pytest.mark.integration

FOGHORN_TOKENS = TOKENS + ",tnode=edge:node;nodes=*;tenants=*"


async def test_foghorn_events_reach_embedded_signalman_subscribers_without_kafka(
    process_factory: Callable[..., CommandProcess],
) -> None:
    signalman = process_factory(
        "signalman",
        [sys.executable, "-m", "api_realtime", "--grpc-port", "{port}", "--http-port", "0"],
        env={"PLATFORM_TOKENS": TOKENS, "SIGNALMAN_REPLICA_ID": "sm-embedded"},
    )
    client = SignalmanClient(f"127.0.0.1:{signalman.port}", token="tsys")
    try:
        async with client.subscribe(["system"], resume_from={"system": ("", 0)}) as sub:
            foghorn = process_factory(
                "foghorn",
                [sys.executable, "-m", "api_balancing", "--grpc-port", "{port}",
                 "--http-port", "-1"],
                env={"PLATFORM_TOKENS": FOGHORN_TOKENS, "FOGHORN_REPLICA_ID": "fh-embedded",
                     "FOGHORN_SIGNALMAN_ADDRESSES": f"127.0.0.1:{signalman.port}",
                     "FOGHORN_SIGNALMAN_TOKEN": "tsys"},
            )  # fmt: skip
            process_factory(
                "edge-sim",
                [sys.executable, "-m", "api_balancing.simulator", "--foghorn",
                 f"127.0.0.1:{foghorn.port}", "--nodes", "3", "--interval", "1",
                 "--token", "tnode", "--base-port", "{port}"],
                ready_port=foghorn.port,
            )  # fmt: skip
            registered: set[str] = set()
            while len(registered) < 3:
                item = await sub.get(40)
                assert isinstance(item, pb.Event)
                assert item.tenant == "system" and item.channel == "system"
                data = json.loads(item.data_json)
                if item.type == "node.registered":
                    assert data["replica"] == "fh-embedded"
                    registered.add(data["node_id"])
    finally:
        await client.close()
