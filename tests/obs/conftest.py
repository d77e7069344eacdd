"""One ``./dev up`` platform for the observability tests: traces, exports, alerts.

Redis, PostgreSQL, tansu, two replicas each of Foghorn, Signalman and Bridge, a small edge
fleet and Prometheus (scraping every process, the platform's rules loaded), with
``PLATFORM_TRACES_DIR`` set so every service process writes its spans to a file.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from devtools import up

NODES = 3


@pytest.fixture(scope="package")
def platform(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[up.Stack, Path]]:
    run_dir = tmp_path_factory.mktemp("traced")
    traces = run_dir / "traces"
    args = up.parser().parse_args(
        ["--nodes", str(NODES), "--viewers", "0", "--plain",
         "--run-dir", str(run_dir), "--env", f"PLATFORM_TRACES_DIR={traces}"]
    )  # fmt: skip
    stack = up.build_stack(args)
    try:
        deadline = time.monotonic() + 180
        while not stack.sup.all_healthy():
            assert time.monotonic() < deadline, "platform not healthy within 180 s"
            stack.sup.tick()
            time.sleep(0.5)
        nodes_url = stack.endpoints["foghorn http"][0] + "/nodes"
        operator = {"Authorization": f"Bearer {up.OPERATOR_TOKEN}"}  # /nodes is for operators
        while httpx.get(nodes_url, headers=operator, timeout=5).json()["count"] < NODES:
            assert time.monotonic() < deadline, "the edge fleet did not register in time"
            time.sleep(0.3)
        yield stack, traces
    finally:
        up.stop_stack(stack)
