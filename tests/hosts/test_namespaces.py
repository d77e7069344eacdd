"""Simulated hosts for real: namespaces, addresses, cuts, heals, and nothing left behind.

Needs root (CI runs as root). Uses its own prefix and /24 (``hapt``, 10.213.8.0/24) so it never
touches a ``./dev up --hosts`` or drill running beside it, and removes everything in finalizers,
also when an assertion fails half-way.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from devtools import hosts
from pkg.devstack.servers import RedisServer, remove_run_dir

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root (CI is root)"),
]

PLAN = hosts.HostPlan(prefix="hapt", subnet="10.213.8.0/24", names=("a", "b", "c"))


@pytest.fixture
def created() -> Iterator[hosts.Hosts]:
    made = hosts.Hosts(PLAN)
    try:
        yield made.setup()
    finally:
        made.teardown()
        assert hosts.leftovers(PLAN) == []


@pytest.fixture
def redis_on_b(created: hosts.Hosts, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    b = PLAN.host("b")
    server = RedisServer(
        run_dir=tmp_path_factory.mktemp("redis-b"), port=6379, host=b.address,
        exec_prefix=b.exec_prefix(),
    )  # fmt: skip
    # Started without waiting: this process is in the machine's namespace, which cannot reach
    # the hosts (by design), so readiness is probed from host a.
    server.start(wait=False)
    try:
        deadline = time.monotonic() + 20
        while not ping_from("a", b.address) and time.monotonic() < deadline:
            time.sleep(0.1)
        yield b.address
    finally:
        server.stop()
        remove_run_dir(server)


def ping_from(host: str, address: str, port: int = 6379, timeout: float = 0.6) -> bool:
    """Whether ``host`` gets +PONG from Redis at ``address`` within ``timeout``."""
    code = (
        "import socket,sys\n"
        "try:\n"
        f"  s=socket.create_connection(({address!r},{port}),timeout={timeout})\n"
        "  s.sendall(b'PING\\r\\n'); sys.exit(0 if s.recv(16).startswith(b'+PONG') else 1)\n"
        "except OSError: sys.exit(1)\n"
    )
    cmd = [*PLAN.host(host).exec_prefix(), sys.executable, "-c", code]
    return subprocess.run(cmd, check=False, timeout=10).returncode == 0


def test_every_host_has_its_own_address_and_reaches_the_others(redis_on_b: str) -> None:
    assert [h.address for h in PLAN.hosts()] == ["10.213.8.10", "10.213.8.11", "10.213.8.12"]
    assert ping_from("a", redis_on_b) and ping_from("c", redis_on_b)
    # A server bound to its host's address is not on the harness's loopback.
    assert not ping_from("a", "127.0.0.1")


def test_a_cut_silences_both_directions_and_heal_restores(redis_on_b: str) -> None:
    faults = hosts.Faults(PLAN)
    cut = faults.cut("a", "b")
    assert not ping_from("a", redis_on_b)
    assert ping_from("c", redis_on_b)  # only the link a<->b is cut
    faults.heal(cut)
    assert ping_from("a", redis_on_b)
    assert [e.action for e in faults.log] == ["cut", "heal"]
    assert faults.log[0].at <= faults.log[1].at and faults.active == {}


def test_a_one_way_cut_drops_only_that_direction(created: hosts.Hosts) -> None:
    faults = hosts.Faults(PLAN)
    faults.cut_one_way("a", "b")
    # Only a's packets to b are dropped (on a's output); b's packets to a still arrive.
    listing = subprocess.run(
        [*PLAN.host("a").exec_prefix(), "nft", "list", "ruleset"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    assert f"ip daddr {PLAN.host('b').address} drop" in listing
    assert "ip saddr" not in listing
    faults.heal()
    assert faults.active == {}


def test_an_isolated_host_reaches_nobody_and_keeps_its_loopback(redis_on_b: str) -> None:
    faults = hosts.Faults(PLAN)
    faults.isolate("b")
    assert not ping_from("a", redis_on_b) and not ping_from("c", redis_on_b)
    faults.heal()
    assert ping_from("a", redis_on_b)


def test_setup_removes_what_a_crashed_run_left_and_teardown_is_idempotent() -> None:
    crashed = hosts.Hosts(PLAN)
    crashed.setup()
    # A crash: the namespaces (and a process inside one) stay, the lock dies with its owner.
    sleeper = subprocess.Popen([*PLAN.host("a").exec_prefix(), "sleep", "300"])
    crashed._lock.close()  # type: ignore[union-attr]
    crashed._lock = None
    fresh = hosts.Hosts(PLAN)
    try:
        fresh.setup()
        assert sleeper.wait(timeout=10) != 0  # the leftover process was killed
        assert set(hosts.list_netns()) >= {h.netns for h in PLAN.hosts()}
    finally:
        fresh.teardown()
        fresh.teardown()
        if sleeper.poll() is None:
            sleeper.kill()
    assert hosts.leftovers(PLAN) == []


def test_a_second_run_on_the_same_prefix_is_refused(created: hosts.Hosts) -> None:
    with pytest.raises(hosts.HostsError, match="in use"):
        hosts.Hosts(PLAN).setup()
    assert sorted(h.netns for h in PLAN.hosts()) == sorted(
        n for n in hosts.list_netns() if n.startswith("hapt-") and n != "hapt-hub"
    )


def test_the_machine_namespace_never_routes_to_the_hosts(created: hosts.Hosts) -> None:
    route = subprocess.run(
        ["ip", "route", "get", PLAN.host("a").address], check=False, capture_output=True, text=True
    )
    assert route.returncode != 0 or "unreachable" in route.stdout


def running(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie waiting for its parent to reap it does not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


# A run that holds hosts (a fixture made them, a process runs inside one) until it is stopped.
HELD = hosts.HostPlan(prefix="hapk", subnet="10.213.10.0/24", names=("a", "b"))
HOLDING_RUN = f"""
import subprocess, time
import pytest
from devtools import hosts

PLAN = hosts.HostPlan(prefix={HELD.prefix!r}, subnet={HELD.subnet!r}, names={HELD.names!r})


@pytest.fixture
def created():
    made = hosts.Hosts(PLAN)
    made.setup()
    try:
        yield made
    finally:
        made.teardown()


def test_holds_its_hosts(created):
    inside = subprocess.Popen([*PLAN.host("a").exec_prefix(), "sleep", "300"],
                              stdout=subprocess.DEVNULL)
    print("holding", inside.pid, flush=True)
    time.sleep(120)
"""


def test_a_run_stopped_with_sigterm_removes_its_hosts_and_their_processes(
    tmp_path: Path,
) -> None:
    """CI cancelling a job or `timeout` sends SIGTERM: the fixtures' finalizers must still run
    (tests/conftest.py), or the namespaces, the guard route and the processes inside stay."""
    (tmp_path / "test_holding.py").write_text(HOLDING_RUN)
    env = {k: v for k, v in os.environ.items()
           if k not in ("DEV_TEST_STACKS_FILE", "PYTEST_XDIST_WORKER")}  # fmt: skip
    cmd = [sys.executable, "-m", "pytest", "-p", "tests.conftest", "-p", "no:cacheprovider",
           "-p", "no:xdist", "-s", "-q", "--rootdir", str(tmp_path),
           str(tmp_path / "test_holding.py")]  # fmt: skip
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        line = ""
        while not line.startswith("holding") and proc.poll() is None:
            line = proc.stdout.readline()
        assert line.startswith("holding"), "the run never held its hosts"
        inside = int(line.split()[1])
        assert set(hosts.list_netns()) >= {h.netns for h in HELD.hosts()}
        proc.send_signal(signal.SIGTERM)
        out = proc.communicate(timeout=60)[0]
        left = hosts.leftovers(HELD)
        inside_alive = running(inside)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        hosts.Hosts(HELD).teardown()  # whatever a failing run left
    assert "KeyboardInterrupt" in out, out[-2000:]
    assert left == [] and not inside_alive
