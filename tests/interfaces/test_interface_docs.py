"""The interface pages say what the servers do (issue 20, item 6: a user had to find Signalman's
/metrics port with ``ss -ltnp``, and no page named the WebSocket close codes).

Each check reads the code's own values (close codes in Bridge and in the strawberry handler it
builds on, the subprotocol, every service's HTTP and gRPC port defaults, every gRPC service in
the generated descriptors) and fails when the page does not name one of them.
"""

from __future__ import annotations

import inspect
import re
from pathlib import Path
from types import ModuleType

import pytest
from strawberry.subscriptions.protocols.graphql_transport_ws import handlers as strawberry_ws

import api_gateway
from api_balancing.config import FoghornConfig
from api_gateway.config import BridgeConfig
from api_gateway.websocket import PROTOCOL
from api_realtime.config import SignalmanConfig
from pkg.proto.foghorn.v1 import foghorn_pb2, relay_pb2
from pkg.proto.signalman.v1 import signalman_pb2

DOCS = Path(__file__).resolve().parents[2] / "docs"
CLOSE = re.compile(r"close\(\s*(?:code=)?(\d{4})|\"code\":\s*(\d{4})|^CLOSE_\w+ = (\d{4})", re.M)


def _close_codes(source: str) -> set[int]:
    return {int(next(g for g in m.groups() if g)) for m in CLOSE.finditer(source)}


def _bridge_close_codes() -> set[int]:
    package = Path(api_gateway.__file__).parent
    codes: set[int] = set()
    for path in package.glob("*.py"):
        codes |= _close_codes(path.read_text())
    return codes | _close_codes(inspect.getsource(strawberry_ws))


def test_every_websocket_close_code_bridge_sends_is_documented() -> None:
    page = (DOCS / "graphql-websocket.md").read_text()
    documented = {int(c) for c in re.findall(r"^\| (\d{4}) \|", page, re.M)}
    sent = _bridge_close_codes()
    assert {4400, 4401, 4403, 4429, 1009} <= sent  # the scan finds what we know is there
    assert sent - documented == set(), "close codes without a row in graphql-websocket.md"
    assert PROTOCOL in page


@pytest.mark.parametrize(
    ("name", "default_port"),
    [
        ("Foghorn", FoghornConfig().http_port),
        ("Signalman", SignalmanConfig().http_port),
        ("Bridge", BridgeConfig().http_port),
    ],
)
def test_the_metrics_page_names_each_services_metrics_address(name: str, default_port: int) -> None:
    rows = [
        line
        for line in (DOCS / "metrics.md").read_text().splitlines()
        if line.startswith(f"| {name} ")
    ]
    assert rows, f"no row for {name} in metrics.md"
    assert f"127.0.0.1:{default_port}/metrics" in rows[0]


@pytest.mark.parametrize("module", [foghorn_pb2, relay_pb2, signalman_pb2])
def test_the_grpc_page_names_every_service_and_its_port(module: ModuleType) -> None:
    page = (DOCS / "grpc.md").read_text()
    for service in module.DESCRIPTOR.services_by_name.values():
        assert f"`{service.full_name}`" in page, f"{service.full_name} is not in grpc.md"
    for port in (FoghornConfig().grpc_port, SignalmanConfig().grpc_port):
        assert f"127.0.0.1:{port}" in page
