"""`./dev` hands everything after a pass-through subcommand to it, --help included."""

from __future__ import annotations

import argparse
import time
from typing import Any

import pytest

from devtools import cli


@pytest.fixture
def called(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    seen: dict[str, Any] = {}

    def record(name: str) -> Any:
        def run(args: argparse.Namespace) -> int:
            seen[name] = args
            return 0

        return run

    for name in ("test", "bench", "up", "drill"):
        monkeypatch.setattr(cli, f"cmd_{name}", record(name))
    return seen


def test_up_and_drill_receive_their_own_help_flag(called: dict[str, Any]) -> None:
    assert cli.main(["up", "--help"]) == 0
    assert called["up"].up_args == ["--help"]
    assert cli.main(["drill", "-h"]) == 0
    assert called["drill"].drill_args == ["-h"]


def test_test_passes_pytest_options_through_and_takes_no_lint(called: dict[str, Any]) -> None:
    assert cli.main(["test", "--no-lint", "-k", "breaker", "tests/clients"]) == 0
    assert called["test"].no_lint is True
    assert called["test"].pytest_args == ["-k", "breaker", "tests/clients"]


def test_test_runs_the_workers_asked_for_unless_the_caller_chooses(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(cli, "TEST_WORKERS", "0")  # DEV_TEST_WORKERS=0: serially
    assert cli._workers(["tests/clients"]) == ["tests/clients"]
    monkeypatch.setattr(cli, "TEST_WORKERS", "2")
    assert cli._workers(["tests/clients"]) == ["-n", "2", "--dist", "loadscope", "tests/clients"]
    for chosen in (["-n", "4"], ["-n0"], ["--numprocesses=3"], ["-p", "no:xdist"]):
        assert cli._workers([*chosen, "tests/clients"]) == [*chosen, "tests/clients"]


def test_bench_takes_the_name_then_its_own_options(called: dict[str, Any]) -> None:
    assert cli.main(["bench", "foghorn-ha", "--quick"]) == 0
    assert called["bench"].name == "foghorn-ha"
    assert called["bench"].bench_args == ["--quick"]


def test_a_run_that_outlives_its_bound_is_stopped_with_124(tmp_path: Any) -> None:
    import sys

    code = cli._run_bounded(
        [sys.executable, "-c", "import time; time.sleep(60)"], {}, 0.5, tmp_path / "stacks.txt"
    )
    assert code == 124


def test_a_sigterm_to_dev_test_stops_pytest_as_ctrl_c_does(tmp_path: Any) -> None:
    """pytest runs in a session of its own: ./dev passes a SIGTERM on as SIGINT, so pytest
    tears down (stops its servers, removes its namespaces) instead of running on."""
    import signal
    import subprocess
    import sys

    marker = tmp_path / "pytest.txt"
    child = (
        "import pathlib, signal, sys, time\n"
        f"p = pathlib.Path({str(marker)!r})\n"
        "def stop(*_): p.write_text('interrupted'); sys.exit(2)\n"
        "signal.signal(signal.SIGINT, stop)\n"
        "p.write_text('ready')\n"
        "time.sleep(60)\n"
    )
    runner = (
        "import sys\nfrom pathlib import Path\nfrom devtools import cli\n"
        f"sys.exit(cli._run_bounded([sys.executable, '-c', {child!r}], {{}}, 60, "
        f"Path({str(tmp_path / 'stacks.txt')!r})))\n"
    )
    dev = subprocess.Popen([sys.executable, "-c", runner], cwd=cli.ROOT,
                           stdout=subprocess.DEVNULL)  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while not (marker.exists() and marker.read_text()) and time.monotonic() < deadline:
            time.sleep(0.05)
        dev.send_signal(signal.SIGTERM)
        assert dev.wait(timeout=30) == 2  # pytest's exit code, after its teardown
    finally:
        if dev.poll() is None:
            dev.kill()
    assert marker.read_text() == "interrupted"


def test_ha_stores_with_hosts_is_refused_with_the_reason(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from devtools import drills, up

    assert up.main(["--hosts", "--ha-stores"]) == 2
    assert "--ha-stores cannot be combined with --hosts" in capsys.readouterr().out
    assert drills.main(["redis-failover", "--hosts"]) == 2
    assert "127.0.0.1" in capsys.readouterr().out
