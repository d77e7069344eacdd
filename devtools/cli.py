"""./dev subcommands: test, lint, bench, proto, up, drill, servers."""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import pkgutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable


def _run(cmd: list[str]) -> int:
    print("+ " + " ".join(cmd), flush=True)
    return subprocess.call(cmd, cwd=ROOT)


def cmd_servers(_: argparse.Namespace) -> int:
    from pkg.devstack import install

    for name, path in install.ensure_all().items():
        print(f"{name:14} {path}")
    return 0


def cmd_lint(_: argparse.Namespace) -> int:
    steps = [
        [PY, "-m", "ruff", "check", "."],
        [PY, "-m", "ruff", "format", "--check", "."],
        [PY, "-m", "mypy"],
        # Architecture contracts in pyproject.toml: layers, no cycles, domain modules do no I/O.
        [str(Path(PY).parent / "lint-imports"), "--no-logo", "--no-cache"],
    ]
    for step in steps:
        code = _run(step)
        if code:
            return code
    return 0


def cmd_test(args: argparse.Namespace) -> int:
    code = cmd_servers(args)
    if code:
        return code
    from pkg.devstack import install

    # The GraphiQL browser test needs Chromium; installing it here keeps a first-time download
    # out of that test's time limit (./dev up never needs it).
    print(f"{'chromium':14} {install.chromium_binary()}", flush=True)
    # The interface tests check every /metrics with promtool and drive the reference node
    # client of graphql-ws: installed here, outside any test's time limit.
    print(f"{'promtool':14} {install.promtool_binary()}", flush=True)
    print(f"{'node clients':14} {install.node_clients()}", flush=True)
    # The anonymous-flood test offers its 2,000 calls/s with h2load (tests/security).
    print(f"{'h2load':14} {install.h2load_binary()}", flush=True)
    if not args.no_lint:
        code = cmd_lint(args)
        if code:
            print("lint failed: fix it (./dev lint) or pass --no-lint while iterating", flush=True)
            return code
    pytest_args = list(args.pytest_args)
    if pytest_args[:1] == ["--"]:
        pytest_args = pytest_args[1:]
    pytest_args = _workers(pytest_args)
    with tempfile.TemporaryDirectory(prefix="dev-test-") as tmp:
        stacks = Path(tmp) / "stacks.txt"
        env = dict(os.environ, PYTHONUNBUFFERED="1", DEV_TEST_STACKS_FILE=str(stacks))
        return _run_bounded([PY, "-m", "pytest", *pytest_args], env, TEST_WALL_S, stacks)


# Most of the suite's time is spent waiting (TTLs, session timeouts, process starts), not
# computing: two pytest-xdist workers overlap those waits, each test module on one worker and
# the tests that must not overlap in one scope (tests/conftest.py). On 2 quiet cores the whole
# suite took 581 s on two workers (load 0.2-3.6) where the last serial CI run took 1,006 s.
# DEV_TEST_WORKERS=0 runs serially.
TEST_WORKERS = os.environ.get("DEV_TEST_WORKERS", "2")


def _workers(pytest_args: list[str]) -> list[str]:
    """``pytest_args`` with ./dev's worker count unless they choose one (-n, -p no:xdist)."""
    chosen = any(
        a in ("-n", "--numprocesses", "no:xdist") or a.startswith(("-n", "--numprocesses="))
        for a in pytest_args
    )
    if chosen or TEST_WORKERS in ("", "0"):
        return pytest_args
    return ["-n", TEST_WORKERS, "--dist", "loadscope", *pytest_args]


# pytest-timeout bounds each test, not a hang in session teardown or between tests; this bounds
# the whole run well inside CI's 90 minutes, and says where it hung before stopping it.
TEST_WALL_S = float(os.environ.get("DEV_TEST_WALL_S", "2400"))


def _run_bounded(cmd: list[str], env: dict[str, str], wall_s: float, stacks: Path) -> int:
    print("+ " + " ".join(cmd), flush=True)
    # A session of its own: pytest and its xdist workers form a process group that the hang
    # guard signals as a whole (the servers the tests start have sessions of their own).
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, start_new_session=True)
    # A SIGTERM to ./dev (CI cancelling, `timeout`) stops pytest as Ctrl-C does, with teardown:
    # in a session of its own, pytest would otherwise never hear of it and run on.
    previous = signal.signal(signal.SIGTERM, _stop_on_term)
    try:
        return proc.wait(timeout=wall_s)
    except subprocess.TimeoutExpired:
        print(f"\n./dev test: no result after {wall_s:.0f} s; stacks follow, then stopping pytest",
              flush=True)  # fmt: skip
        # tests/conftest.py dumps every thread's stack on it, in pytest and in each worker
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGUSR1)
        deadline = time.monotonic() + 2.0  # the dump takes milliseconds; a dead pytest never writes
        while time.monotonic() < deadline and proc.poll() is None:
            if any(f.stat().st_size for f in stacks.parent.glob(stacks.name + "*")):
                time.sleep(0.2)  # let the dump of the remaining threads and workers finish
                break
            time.sleep(0.02)
        for found in sorted(stacks.parent.glob(stacks.name + "*")):
            print(f"--- {found.name}\n{found.read_text()}", flush=True)
        _interrupt(proc)  # pytest stops and runs its teardown: servers stop
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        return 124
    except KeyboardInterrupt:
        _interrupt(proc)
        return proc.wait()
    finally:
        signal.signal(signal.SIGTERM, previous)


def _stop_on_term(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt(f"stopped by signal {signum}")


def _interrupt(proc: subprocess.Popen[bytes]) -> None:
    """SIGINT to pytest and each of its xdist workers, so every worker runs its own teardown
    (a worker its controller stops has no time to: the servers it started would stay)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGINT)


def _benchmarks() -> list[str]:
    import benchmarks

    return sorted(m.name for m in pkgutil.iter_modules(benchmarks.__path__) if m.name != "common")


def cmd_bench(args: argparse.Namespace) -> int:
    available = _benchmarks()
    if not args.name or args.name not in [n.replace("_", "-") for n in available] + available:
        print(
            "usage: ./dev bench NAME   where NAME is one of: "
            + ", ".join(n.replace("_", "-") for n in available)
        )
        return 0 if not args.name else 2
    cmd_servers(args)
    module = importlib.import_module(f"benchmarks.{args.name.replace('-', '_')}")
    result = module.main(list(args.bench_args))
    return int(result or 0)


def cmd_proto(_: argparse.Namespace) -> int:
    from devtools import protogen

    return protogen.main()


def cmd_up(args: argparse.Namespace) -> int:
    from devtools import up

    return up.main(list(args.up_args))


def cmd_drill(args: argparse.Namespace) -> int:
    try:
        from devtools import drills
    except ImportError:
        print("drills are not built yet (issue: failover drills)")
        return 2
    return int(drills.main(list(args.drill_args)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="./dev", description=__doc__)
    sub = parser.add_subparsers(dest="command")

    p = sub.add_parser("test", help="lint, then the whole test suite (real servers included)")
    p.add_argument("--no-lint", action="store_true", help="skip ruff and mypy")
    p.add_argument("pytest_args", nargs=argparse.REMAINDER, help="passed to pytest")
    p.set_defaults(func=cmd_test)

    p = sub.add_parser("lint", help="ruff check, ruff format --check, mypy, import contracts")
    p.set_defaults(func=cmd_lint)

    p = sub.add_parser("bench", help="run a benchmark; writes .bench/NAME.json")
    p.add_argument("name", nargs="?")
    p.add_argument("bench_args", nargs=argparse.REMAINDER)
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("proto", help="regenerate pkg/proto from proto/")
    p.set_defaults(func=cmd_proto)

    p = sub.add_parser("up", help="run the whole platform locally until Ctrl-C")
    p.add_argument("up_args", nargs=argparse.REMAINDER)
    p.set_defaults(func=cmd_up)

    p = sub.add_parser("drill", help="failover drills that measure recovery")
    p.add_argument("drill_args", nargs=argparse.REMAINDER)
    p.set_defaults(func=cmd_drill)

    p = sub.add_parser("servers", help="install (if needed) and locate redis, postgres, tansu")
    p.set_defaults(func=cmd_servers)

    # Everything after a pass-through subcommand belongs to it (pytest, ./dev up, drills,
    # benchmarks), options included, so argparse only sees the subcommand's name.
    argv = list(sys.argv[1:] if argv is None else argv)
    # `up` and `drill` answer --help themselves (their own options); `test --help` and
    # `bench --help` show this parser's help for them.
    if argv and (
        argv[0] in ("up", "drill")
        or (argv[0] in ("test", "bench") and not {"-h", "--help"} & set(argv[1:2]))
    ):
        command, rest = argv[0], argv[1:]
        args = parser.parse_args([command])
        if command == "test":
            args.no_lint = "--no-lint" in rest
            args.pytest_args = [a for a in rest if a != "--no-lint"]
        elif command == "bench":
            args.name = rest[0] if rest else None
            args.bench_args = rest[1:]
        else:
            setattr(args, f"{command}_args", rest)
    else:
        args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return int(args.func(args))
