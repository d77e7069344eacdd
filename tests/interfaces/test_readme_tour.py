"""The README's tour, pasted as written, shows live events on ``./dev up`` (HA: Redis, PostgreSQL,
tansu, two replicas of each service) and on ``./dev up --single``: in the GraphQL subscription
(gql's CLI over graphql-transport-ws) and in ``signalman-tail``.

The 10 s the issue asks for is a figure measured on a quiet machine (the commands' own start-up
included; the test prints it), not an assertion here: each command is given 30 s, so that a busy
CI machine (Python start-up alone can take seconds there) does not make the test flaky. Each is
stopped with Ctrl-C (SIGINT) once it has shown what the test waits for.

Only the ports are adapted: when the documented ones are taken on this machine, ``./dev up``
picks free ones and prints them, as the README says. Both runs leave out the background viewer
load and HA leaves out Prometheus (the tour uses neither): the machine is shared."""

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


@pytest.mark.parametrize("mode", [["--single"], ["--no-prometheus"]], ids=["single", "ha"])
def test_the_readme_tour_shows_live_events(tmp_path: Path, mode: list[str]) -> None:
    commands = tour_commands()
    sub_path, tail_path = tmp_path / "subscription.out", tmp_path / "tail.out"
    up = subprocess.Popen(
        # The defaults (50 simulated nodes) but no viewer load: the machine is shared.
        [sys.executable, "-m", "devtools", "up", *mode, "--plain",
         "--viewers", "0", "--duration", "240", "--run-dir", str(tmp_path / "run")],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,
    )  # fmt: skip
    try:
        assert up.stdout is not None
        out = ""
        deadline = time.monotonic() + 180
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
        signalman = re.search(r"^signalman grpc\s+(.+)$", status, re.M)
        assert bridge and signalman, status
        # The README's token lines, as written, in one shell: they set OPS and TOKEN.
        minted = subprocess.run(
            ["bash", "-c", "\n".join(["set -e", *commands[:2], 'echo "$OPS $TOKEN"'])],
            cwd=ROOT, check=True, capture_output=True, text=True,
        ).stdout.split()  # fmt: skip
        # Unbuffered: what the clients print reaches the files at once.
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "OPS": minted[0], "TOKEN": minted[1]}
        subscription = commands[2].replace("127.0.0.1:8080", bridge[1])
        tail = commands[3].replace(
            "127.0.0.1:18070,127.0.0.1:18071", ",".join(signalman[1].split())
        )
        sub_s, sub_out = until_printed(subscription, '"type": "stream.', sub_path, env)
        tail_s, tail_out = until_printed(tail, "node.registered", tail_path, env)
        print(f"first event after: subscription {sub_s:.1f} s, signalman-tail {tail_s:.1f} s")
        assert '"tenantEvents"' in sub_out and '"type": "stream.' in sub_out, sub_out[-2000:]
        assert "node.registered" in tail_out, tail_out[-2000:]
    finally:
        os.killpg(up.pid, signal.SIGINT)  # ./dev up stops everything it started
        try:
            up.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(up.pid, signal.SIGKILL)
            up.wait()


def until_printed(
    command: str, marker: str, path: Path, env: dict[str, str], limit_s: float = 30
) -> tuple[float, str]:
    """Run a README command that runs until Ctrl-C (``bash -c``, output to ``path``) until it
    prints ``marker`` or ``limit_s`` passes, then Ctrl-C it: the seconds it took and what it
    printed."""
    started = time.monotonic()
    with path.open("w") as out:
        proc = subprocess.Popen(["bash", "-c", command], cwd=ROOT, env=env, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
    try:
        while time.monotonic() - started < limit_s and proc.poll() is None:
            if marker in path.read_text():
                break
            time.sleep(0.1)
        took = time.monotonic() - started
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C, as the README says
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return took, path.read_text()
