"""Every service: each setting is in its docs table, and a misspelled one stops the process at
start with its name and the closest known setting (issue 19 item 5)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from pkg.common.config import PLATFORM_SETTINGS, setting_names

ROOT = Path(__file__).parents[2]


def _services() -> list[tuple[str, type, str, frozenset[str]]]:
    from api_balancing import config as foghorn
    from api_gateway import config as bridge
    from api_realtime import config as signalman

    return [
        ("FOGHORN", foghorn.FoghornConfig, "docs/foghorn.md", foghorn.TOOL_SETTINGS),
        ("BRIDGE", bridge.BridgeConfig, "docs/bridge.md", frozenset()),
        ("SIGNALMAN", signalman.SignalmanConfig, "docs/signalman.md", signalman.TOOL_SETTINGS),
    ]  # fmt: skip


@pytest.mark.parametrize("service", _services(), ids=lambda s: s[0].lower())
def test_every_setting_is_in_the_services_docs_table(service: tuple) -> None:
    prefix, cls, doc, tools = service
    text = (ROOT / doc).read_text()
    names = setting_names(cls, prefix) | tools | PLATFORM_SETTINGS
    missing = sorted(n for n in names if f"`{n}`" not in text)
    assert not missing, f"settings missing from {doc}: {missing}"


@pytest.mark.parametrize(
    ("module", "typo", "closest"),
    [
        ("api_balancing", "FOGHORN_CLUSTR", "FOGHORN_CLUSTER"),
        ("api_gateway", "BRIDGE_REDIS_ULR", "BRIDGE_REDIS_URL"),
        ("api_realtime", "SIGNALMAN_KAFKA_BOOTSRAP", "SIGNALMAN_KAFKA_BOOTSTRAP"),
        ("api_realtime", "PLATFORM_TOKEN", "PLATFORM_TOKENS"),
    ],
)
def test_a_misspelled_setting_stops_the_process_naming_the_closest_one(
    module: str, typo: str, closest: str
) -> None:
    result = subprocess.run(
        [sys.executable, "-m", module],
        env={**os.environ, typo: "x"},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2, result.stderr[-500:]
    assert f"{typo} is not a setting (did you mean {closest}?)" in result.stderr
