"""The README's tour, pasted as written, shows live events on ``./dev up --single``: in the GraphQL
subscription (gql's CLI over graphql-transport-ws) and in ``signalman-tail``.

The 10 s the issue asks for is a figure measured on a quiet machine (the commands' own start-up
included), not an assertion here: each command is given 30 s, so that a busy CI machine (Python
start-up alone can take seconds there) does not make the test flaky.

Only the ports are adapted: when the documented ones are taken on this machine, ``./dev up``
picks free ones and prints them, as the README says."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


def tour_commands() -> list[str]:
    """The tour's shell lines that mint the tokens, subscribe and tail, as the README has them."""
    readme = (ROOT / "README.md").read_text()
    block = readme.split("## A tour of the running platform", 1)[1].split("```sh", 1)[1]
    block = block.split("```", 1)[0]
    commands, current = [], ""
    for line in block.splitlines():
        if line.startswith("#") or not line.strip():
            continue
        current += line.rstrip("\\") + ("\n" if not line.endswith("\\") else " ")
        if not line.endswith(("\\", "|")):
            commands.append(current.strip())
            current = ""
    starts = ("OPS=", "TOKEN=", "echo 'subscription", ".venv/bin/signalman-tail")
    wanted = [c for c in commands if c.startswith(starts)]
    assert len(wanted) == 4, commands
    return wanted


def test_the_readme_tour_shows_live_events(tmp_path: Path) -> None:
    commands = tour_commands()
    sub_path, tail_path = tmp_path / "subscription.out", tmp_path / "tail.out"
    up = subprocess.Popen(
        # The defaults (50 simulated nodes) but no viewer load: the machine is shared.
        [sys.executable, "-m", "devtools", "up", "--single", "--plain",
         "--viewers", "0", "--duration", "170", "--run-dir", str(tmp_path / "run")],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,
    )  # fmt: skip
    try:
        assert up.stdout is not None
        out = ""
        deadline = time.monotonic() + 120
        while "every health check ok" not in out and time.monotonic() < deadline:
            line = up.stdout.readline()
            if not line:
                break
            out += line
        status = ""
        while "dev credentials:" not in status and time.monotonic() < deadline:
            status += up.stdout.readline()
        assert "every health check ok" in out, out[-3000:]
        bridge = re.search(r"^bridge graphql\s+http://([\d.]+:\d+)/graphql", status, re.M)
        signalman = re.search(r"^signalman grpc\s+(\S+)", status, re.M)
        assert bridge and signalman, status
        script = "\n".join(
            [
                "set -e",
                *commands[:2],
                "export OPS TOKEN",  # for the bounded sub-shell below
                # The README's commands, each bounded, on this run's ports.
                "timeout 30 bash -c "
                + _quote(commands[2].replace("127.0.0.1:8080", bridge[1]))
                + f" > {sub_path} 2>&1 || true",
                "timeout 30 "
                + commands[3].replace("127.0.0.1:18070,127.0.0.1:18071", signalman[1])
                + f" > {tail_path} 2>&1 || true",
            ]
        )
        started = time.monotonic()
        # Unbuffered: what the clients printed before their time ran out is in the files.
        subprocess.run(["bash", "-c", script], cwd=ROOT, check=True,
                       env={**os.environ, "PYTHONUNBUFFERED": "1"},
                       stdout=subprocess.DEVNULL)  # fmt: skip
        assert time.monotonic() - started < 70
        sub_out, tail_out = sub_path.read_text(), tail_path.read_text()
        assert '"tenantEvents"' in sub_out and '"type": "stream.' in sub_out, sub_out[-2000:]
        assert "node.registered" in tail_out, tail_out[-2000:]
    finally:
        os.killpg(up.pid, signal.SIGINT)  # ./dev up stops everything it started
        try:
            up.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(up.pid, signal.SIGKILL)
            up.wait()


def _quote(text: str) -> str:
    return "'" + text.replace("'", "'\"'\"'") + "'"
