"""The supervisor restarts a crashed real process after its backoff delay, by pid."""

from __future__ import annotations

import os
import signal
import sys
import time

from devtools.supervisor import Managed, Supervisor
from pkg.common.clock import FakeClock
from pkg.devstack.servers import CommandProcess

LISTENER = (
    "import socket,sys,time; s=socket.socket(); "
    "s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); "
    "s.bind(('127.0.0.1', int(sys.argv[1]))); s.listen(); time.sleep(120)"
)


def test_crashed_process_is_restarted_after_backoff(tmp_path) -> None:
    clock = FakeClock()
    sup = Supervisor(clock=clock, health_fetcher=lambda url: {"status": "ok"})
    proc = CommandProcess("listener", [sys.executable, "-c", LISTENER, "{port}"], run_dir=tmp_path)
    item = sup.add(Managed("listener", proc))
    try:
        first_pid = item.pid
        assert first_pid is not None
        os.kill(first_pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while item.state != "backoff" and time.monotonic() < deadline:
            sup.tick()
            time.sleep(0.05)
        assert item.state == "backoff"
        assert item.restart_at == clock.monotonic() + 1.0  # first restart waits 1 s
        sup.tick()
        assert item.restarts == 0  # not yet due
        clock.advance(1.0)
        sup.tick()
        assert item.restarts == 1
        proc.wait_ready(10)
        assert item.pid is not None and item.pid != first_pid
    finally:
        sup.stop_all()
    assert proc.proc is None


def test_platform_is_ready_only_when_every_health_check_says_ok(tmp_path) -> None:
    statuses = {"http://a/health": "ok", "http://b/health": "starting"}
    sup = Supervisor(clock=FakeClock(), health_fetcher=lambda url: {"status": statuses[url]})
    procs = [
        CommandProcess(name, [sys.executable, "-c", LISTENER, "{port}"], run_dir=tmp_path / name)
        for name in ("a", "b")
    ]
    try:
        for name, proc in zip(("a", "b"), procs, strict=True):
            sup.add(Managed(name, proc, health_url=f"http://{name}/health"))
        sup.tick()
        assert not sup.all_healthy()
        statuses["http://b/health"] = "serving"
        sup.tick()
        assert sup.all_healthy()
        statuses["http://a/health"] = "degraded"
        sup.tick()
        assert not sup.all_healthy()
    finally:
        sup.stop_all()
