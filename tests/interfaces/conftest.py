"""One small real platform (Foghorn, Signalman, Bridge, each embedded) shared by the interface
tests, which drive it with third-party clients the way a new user would."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from pkg.devstack.servers import CommandProcess, free_port
from tests.bridge.fakes import SECRET
from tests.bridge.stack import FOGHORN_TOKEN

# Platform credentials (PLATFORM_TOKENS syntax, docs/security.md): an operator (Bridge's
# Foghorn credential too), the test edge nodes, platform publishers, and the per-tenant
# credentials Bridge subscribes with.
TOKENS = ",".join(
    [
        "op-token=ops:operator",
        "relay-token=relay:replica",  # Foghorn's HA relay (test_ha_processes_metrics...)
        f"{FOGHORN_TOKEN}=edge:node;nodes=*;tenants=*",
        "pub-acme=pub-acme:system",
        "pub-globex=pub-globex:system",
        "sig-acme=bridge@acme:tenant-user",
        "sig-globex=bridge@globex:tenant-user",
    ]
)
OPERATOR_TOKEN = "op-token"


@dataclass
class Platform:
    foghorn_grpc: int
    foghorn_http: int
    signalman_grpc: int
    signalman_http: int
    bridge_port: int
    procs: list[CommandProcess] = field(default_factory=list)

    @property
    def graphql_url(self) -> str:
        return f"http://127.0.0.1:{self.bridge_port}/graphql"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.bridge_port}/graphql"

    def metrics_urls(self) -> dict[str, str]:
        return {
            "foghorn": f"http://127.0.0.1:{self.foghorn_http}/metrics",
            "signalman": f"http://127.0.0.1:{self.signalman_http}/metrics",
            "bridge": f"http://127.0.0.1:{self.bridge_port}/metrics",
        }


def start_platform(run_dir: Path, **bridge_env: str) -> Platform:
    fg, fh, sg, sh = free_port(), free_port(), free_port(), free_port()
    platform = Platform(fg, fh, sg, sh, free_port())
    specs = [
        ("foghorn", [sys.executable, "-m", "api_balancing", "--grpc-port", str(fg),
                     "--http-port", str(fh), "--replica-id", "fog-1"],
         {"FOGHORN_REDIS_URL": "", "FOGHORN_KAFKA_BOOTSTRAP": ""}, fg),
        ("signalman", [sys.executable, "-m", "api_realtime", "--grpc-port", str(sg),
                       "--http-port", str(sh), "--replica-id", "sig-1"], {}, sg),
        ("bridge", [sys.executable, "-m", "api_gateway", "--port", str(platform.bridge_port),
                    "--id", "bridge-1"],
         {"BRIDGE_FOGHORN_ADDRESSES": f"127.0.0.1:{fg}", "BRIDGE_FOGHORN_TOKEN": OPERATOR_TOKEN,
          "BRIDGE_SIGNALMAN_ADDRESSES": f"127.0.0.1:{sg}",
          "BRIDGE_SIGNALMAN_TOKENS": "acme=sig-acme,globex=sig-globex",
          "BRIDGE_JWT_HS256_SECRET": SECRET, **bridge_env},
         platform.bridge_port),
    ]  # fmt: skip
    try:
        for name, command, env, port in specs:
            proc = CommandProcess(
                name,
                command,
                run_dir=run_dir / name,
                port=port,
                env={"PLATFORM_TOKENS": TOKENS, "LOG_LEVEL": "WARNING", **env},
            )
            platform.procs.append(proc)
            proc.start()
    except BaseException:
        stop_platform(platform)
        raise
    return platform


def stop_platform(platform: Platform) -> None:
    for proc in reversed(platform.procs):
        proc.stop(timeout=5)


@pytest.fixture
def extra_bridge(platform: Platform, tmp_path: Path) -> Iterator[Callable[..., int]]:
    """``extra_bridge(BRIDGE_X="...")``: another Bridge on the platform's Foghorn and Signalman
    with these settings (tight limits, short leeway); returns its port."""
    started: list[CommandProcess] = []

    def start(**env: str) -> int:
        port = free_port()
        proc = CommandProcess(
            f"bridge-extra-{len(started)}",
            [sys.executable, "-m", "api_gateway", "--port", str(port), "--id", "extra"],
            run_dir=tmp_path / f"bridge-{len(started)}",
            port=port,
            env={
                "BRIDGE_FOGHORN_ADDRESSES": f"127.0.0.1:{platform.foghorn_grpc}",
                "BRIDGE_FOGHORN_TOKEN": OPERATOR_TOKEN,
                "BRIDGE_SIGNALMAN_ADDRESSES": f"127.0.0.1:{platform.signalman_grpc}",
                "BRIDGE_SIGNALMAN_TOKENS": "acme=sig-acme,globex=sig-globex",
                "BRIDGE_JWT_HS256_SECRET": SECRET,
                **env,
            },
        )
        started.append(proc)
        proc.start()
        start.procs = started  # type: ignore[attr-defined]
        return port

    try:
        yield start
    finally:
        for proc in started:
            proc.stop(timeout=5)


@pytest.fixture(scope="module")
def platform(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Platform]:
    """Foghorn, Signalman and Bridge (embedded state), started once per test module."""
    p = start_platform(tmp_path_factory.mktemp("platform"))
    try:
        yield p
    finally:
        stop_platform(p)
