"""Simulated hosts: every server and replica in its own network namespace, and partitions.

``./dev up --hosts`` and ``./dev drill ... --hosts`` put each process on a host of its own: a
network namespace (``<prefix>-<name>``, e.g. ``hap-foghorn-0``) with one address in a private
/24 (default ``10.213.7.0/24``) on a veth pair whose other end sits on a bridge inside a hub
namespace (``<prefix>-hub``). The machine's own namespace gets no interface and no address: it
only gets an ``unreachable`` route for the /24, so a stray packet from it to a host address
fails locally instead of going to the default gateway. The namespaces have no default route, so
nothing inside them can send beyond the /24 (and their own loopback).

The harness (supervision, health polling, the drills' load generators) runs on a host of its own
(``load``); the edge-node simulator on ``nodes``. Setup removes what a crashed earlier run left
(namespaces with the prefix, processes still inside them, the guard route) and teardown removes
everything; both are idempotent. One run per prefix at a time: a lock file under /run says who
owns the prefix (the lock dies with its process, so a crash never blocks the next run).

Faults are nftables tables inside a host's namespace (``nft``; iptables works too but nft keeps
one table per fault, which is what makes "heal this one" a single delete). Rules match every
packet, established connections included, and DROP (never REJECT): a cut peer sees silence, no
FIN and no RST, which is what a real partition looks like. ``Faults`` records each fault and
heal with its time.
"""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

# Hosts of the HA platform, in start order. Addresses are given by position: .10 + index.
PLATFORM_HOSTS: tuple[str, ...] = (
    "load",  # the harness: supervision, health polling, viewers and drill traffic
    "nodes",  # the edge-node simulator
    "redis",
    "postgres",
    "tansu",
    "foghorn-0",
    "foghorn-1",
    "signalman-0",
    "signalman-1",
    "bridge-0",
    "bridge-1",
)
DEFAULT_PREFIX = os.environ.get("DEV_HOSTS_PREFIX", "hap")
DEFAULT_SUBNET = os.environ.get("DEV_HOSTS_SUBNET", "10.213.7.0/24")
HARNESS_HOST = "load"
_INSIDE_ENV = "DEV_HOSTS_INSIDE"  # set for the harness process started on the load host
_NETNS_DIR = Path("/run/netns")


class HostsError(RuntimeError):
    """A namespace or fault could not be set up; the message says which command failed."""


@dataclass(frozen=True)
class Host:
    name: str
    netns: str
    address: str

    def exec_prefix(self) -> list[str]:
        """The command prefix that runs a program on this host (network namespace only: the
        process keeps the machine's files and mounts)."""
        return ["nsenter", f"--net={_NETNS_DIR / self.netns}", "--"]


@dataclass(frozen=True)
class HostPlan:
    """Which hosts exist and their addresses (pure: nothing is created by building one)."""

    prefix: str = DEFAULT_PREFIX
    subnet: str = DEFAULT_SUBNET
    names: tuple[str, ...] = PLATFORM_HOSTS

    def __post_init__(self) -> None:
        net = ipaddress.ip_network(self.subnet)
        if net.prefixlen != 24 or net.version != 4 or not net.is_private:
            raise ValueError(f"hosts need one private IPv4 /24, got {self.subnet}")
        if not self.prefix.isalnum() or len(self.prefix) > 6:
            raise ValueError(f"host prefix must be 1-6 letters/digits, got {self.prefix!r}")
        if len(set(self.names)) != len(self.names) or len(self.names) > 200:
            raise ValueError("host names must be unique (at most 200)")

    @property
    def network(self) -> ipaddress.IPv4Network:
        return ipaddress.IPv4Network(self.subnet)

    @property
    def hub(self) -> str:
        return f"{self.prefix}-hub"

    def host(self, name: str) -> Host:
        try:
            index = self.names.index(name)
        except ValueError:
            raise KeyError(f"no host {name!r} in the plan ({', '.join(self.names)})") from None
        address = str(self.network.network_address + 10 + index)
        return Host(name, f"{self.prefix}-{name}", address)

    def hosts(self) -> list[Host]:
        return [self.host(n) for n in self.names]

    def owns(self, netns: str) -> bool:
        return netns.startswith(f"{self.prefix}-")

    @classmethod
    def from_env(cls) -> HostPlan:
        return cls(os.environ.get("DEV_HOSTS_PREFIX", DEFAULT_PREFIX),
                   os.environ.get("DEV_HOSTS_SUBNET", DEFAULT_SUBNET))  # fmt: skip


# -- commands -------------------------------------------------------------------------------------
def _run(cmd: Sequence[str], stdin: str | None = None, check: bool = True) -> str:
    proc = subprocess.run(list(cmd), input=stdin, capture_output=True, text=True, check=False)
    if check and proc.returncode != 0:
        raise HostsError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc.stdout


def require_tools() -> None:
    """``ip``, ``nsenter`` and ``nft`` (installed from Debian when missing); root."""
    if os.geteuid() != 0:
        raise HostsError("--hosts needs root (network namespaces and nftables)")
    from pkg.devstack import install

    install.nft_binary()
    install.netns_tools()
    for tool in ("ip", "nsenter"):
        if shutil.which(tool) is None:
            raise HostsError(f"{tool} not found (Debian: iproute2, util-linux)")


def list_netns() -> list[str]:
    out = _run(["ip", "netns", "list"], check=False)
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def netns_pids(netns: str) -> list[int]:
    out = _run(["ip", "netns", "pids", netns], check=False)
    return [int(p) for p in out.split() if p.isdigit()]


def subnet_in_use(plan: HostPlan) -> list[str]:
    """Where the machine's own namespace already uses the plan's /24 (addresses or routes that
    are not our own guard route): a plan must never shadow a real network."""
    uses = []
    for line in _run(["ip", "-4", "-o", "addr", "show"], check=False).splitlines():
        parts = line.split()
        if "inet" in parts:
            iface = ipaddress.ip_interface(parts[parts.index("inet") + 1])
            if iface.network.overlaps(plan.network):
                uses.append(f"address {iface} on {parts[1]}")
    for line in _run(["ip", "-4", "route", "show"], check=False).splitlines():
        parts = line.split()
        if not parts or parts[0] == "default":
            continue
        dest = parts[1] if parts[0] in ("unreachable", "blackhole", "prohibit") else parts[0]
        with contextlib.suppress(ValueError):
            if ipaddress.ip_network(dest, strict=False).overlaps(plan.network):
                if parts[0] == "unreachable" and dest == plan.subnet:
                    continue  # our own guard (left by a crashed run): setup replaces it
                uses.append(f"route {line.strip()}")
    return uses


# -- setup / teardown -----------------------------------------------------------------------------
@dataclass
class Hosts:
    """Created namespaces of one plan (``setup``/``teardown``; a context manager)."""

    plan: HostPlan = field(default_factory=HostPlan)
    _lock: IO[str] | None = None

    @property
    def lock_path(self) -> Path:
        return Path("/run") / f"dev-hosts-{self.plan.prefix}.lock"

    def _take_lock(self) -> None:
        handle = self.lock_path.open("a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            raise HostsError(
                f"hosts with prefix {self.plan.prefix!r} are in use by {holder}; "
                "stop that run first (or set DEV_HOSTS_PREFIX/DEV_HOSTS_SUBNET)"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()}\n")
        handle.flush()
        self._lock = handle

    def setup(self) -> Hosts:
        """Create every host (removing leftovers of an earlier run of this prefix first)."""
        require_tools()
        self._take_lock()
        try:
            self._remove(kill_label="stale")
            used = subnet_in_use(self.plan)
            if used:
                raise HostsError(f"{self.plan.subnet} is already used here: {'; '.join(used)}")
            self._create()
        except BaseException:
            self.teardown()
            raise
        return self

    def _create(self) -> None:
        plan = self.plan
        # The guard first: from here on a packet from this namespace to the /24 fails locally.
        _run(["ip", "route", "replace", "unreachable", plan.subnet])
        hub = plan.hub
        _run(["ip", "netns", "add", hub])
        _run(["ip", "-n", hub, "link", "set", "lo", "up"])
        _run(["ip", "-n", hub, "link", "add", "br0", "type", "bridge"])
        _run(["ip", "-n", hub, "link", "set", "br0", "up"])
        for index, host in enumerate(plan.hosts()):
            veth = f"{plan.prefix}v{index}"
            _run(["ip", "netns", "add", host.netns])
            _run(["ip", "-n", host.netns, "link", "set", "lo", "up"])
            _run(["ip", "link", "add", veth, "netns", hub, "type", "veth",
                  "peer", "name", "eth0", "netns", host.netns])  # fmt: skip
            _run(["ip", "-n", hub, "link", "set", veth, "master", "br0", "up"])
            _run(["ip", "-n", host.netns, "addr", "add", f"{host.address}/24", "dev", "eth0"])
            _run(["ip", "-n", host.netns, "link", "set", "eth0", "up"])

    def _remove(self, kill_label: str) -> list[str]:
        """Remove every namespace of the prefix (killing what still runs inside) and the guard
        route; returns what was removed."""
        removed = []
        for netns in list_netns():
            if not self.plan.owns(netns):
                continue
            for pid in netns_pids(netns):
                # Only processes inside our own namespaces: ours (or a crashed run's).
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                removed.append(f"{kill_label} pid {pid} in {netns}")
            _run(["ip", "netns", "delete", netns], check=False)
            removed.append(netns)
        routes = _run(["ip", "-4", "route", "show", "type", "unreachable"], check=False)
        if any(
            line.split()[:2] == ["unreachable", self.plan.subnet] for line in routes.splitlines()
        ):
            _run(["ip", "route", "del", "unreachable", self.plan.subnet], check=False)
            removed.append(f"route unreachable {self.plan.subnet}")
        return removed

    def teardown(self) -> list[str]:
        """Remove everything ``setup`` created (idempotent); returns what was removed."""
        try:
            return self._remove(kill_label="left")
        finally:
            if self._lock is not None:
                self._lock.close()
                self._lock = None
                with contextlib.suppress(OSError):
                    self.lock_path.unlink()

    def __enter__(self) -> Hosts:
        return self.setup()

    def __exit__(self, *exc: object) -> None:
        self.teardown()


def leftovers(plan: HostPlan) -> list[str]:
    """Namespaces, bridge ports and guard route of ``plan`` that exist now ([] when clean)."""
    found = [n for n in list_netns() if plan.owns(n)]
    routes = _run(["ip", "-4", "route", "show", "type", "unreachable"], check=False)
    found += [line.strip() for line in routes.splitlines() if plan.subnet in line]
    links = _run(["ip", "-o", "link", "show"], check=False)
    found += [
        line.split(":")[1].strip()
        for line in links.splitlines()
        if line.split(":")[1].strip().startswith(f"{plan.prefix}v")
    ]
    return found


# -- running the harness on its own host ----------------------------------------------------------
def inside() -> bool:
    """True in a harness process that runs on the plan's ``load`` host."""
    return os.environ.get(_INSIDE_ENV) == "1"


def run_harness(argv: Sequence[str], plan: HostPlan | None = None) -> int:
    """Create the hosts, run ``python -m devtools ARGV`` on the ``load`` host until it ends,
    then remove every host. Ctrl-C / SIGTERM are passed to the harness, which stops what it
    started; whatever it leaves behind (it was killed) goes with its namespaces."""
    plan = plan or HostPlan.from_env()
    hosts = Hosts(plan)
    print(f"hosts: creating {len(plan.names)} namespaces {plan.prefix}-* on {plan.subnet}",
          flush=True)  # fmt: skip
    from pkg.devstack import install

    install.ensure_all()  # package downloads happen here: the hosts reach no registry
    hosts.setup()
    env = dict(
        os.environ,
        **{_INSIDE_ENV: "1", "DEV_HOSTS_PREFIX": plan.prefix, "DEV_HOSTS_SUBNET": plan.subnet},
    )
    harness = plan.host(HARNESS_HOST)
    cmd = [*harness.exec_prefix(), sys.executable, "-m", "devtools", *argv]
    proc = subprocess.Popen(cmd, env=env)
    forwarded: dict[signal.Signals, Any] = {}

    def forward(signum: int, _frame: object) -> None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signum)

    for sig in (signal.SIGINT, signal.SIGTERM):
        forwarded[sig] = signal.signal(sig, forward)
    try:
        code = proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for sig, previous in forwarded.items():
            signal.signal(sig, previous)
        removed = hosts.teardown()
        left = leftovers(plan)
        print(f"hosts: removed {len([r for r in removed if r.startswith(plan.prefix)])} "
              f"namespaces" + (f"; STILL PRESENT: {left}" if left else ""), flush=True)  # fmt: skip
    return code


# -- faults ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class FaultEvent:
    """One fault or heal as applied: wall and monotonic time (the drill's clock)."""

    action: str  # cut | cut_one_way | isolate | heal
    table: str
    a: str
    b: str = ""
    at: float = 0.0  # time.time()
    mono: float = 0.0  # time.monotonic()

    def describe(self) -> str:
        if self.action == "cut":
            return f"cut {self.a} <-> {self.b}"
        if self.action == "cut_one_way":
            return f"cut {self.a} -> {self.b} (only this direction)"
        if self.action == "isolate":
            return f"isolate {self.a}"
        return f"heal {self.a} ({self.table})"


@dataclass
class Faults:
    """Partition faults on a plan's hosts, each an nftables table in one namespace."""

    plan: HostPlan
    log: list[FaultEvent] = field(default_factory=list)
    active: dict[str, tuple[str, FaultEvent]] = field(default_factory=dict)  # table -> netns
    _seq: int = 0

    def _table(self) -> str:
        self._seq += 1
        return f"{self.plan.prefix}fault{self._seq}"

    def _apply(self, host: Host, table: str, rules_in: list[str], rules_out: list[str]) -> None:
        def chain(name: str, hook: str, rules: list[str]) -> str:
            body = "".join(f"    {r}\n" for r in rules)
            return (
                f"  chain {name} {{\n    type filter hook {hook} priority -10; policy accept;\n"
                f"{body}  }}\n"
            )

        text = (
            f"table inet {table} {{\n"
            + chain("input", "input", rules_in)
            + chain("output", "output", rules_out)
            + "}\n"
        )
        _run([*host.exec_prefix(), "nft", "-f", "-"], stdin=text)

    def _record(self, action: str, table: str, a: str, b: str, netns: str) -> FaultEvent:
        event = FaultEvent(action, table, a, b, time.time(), time.monotonic())
        self.log.append(event)
        self.active[table] = (netns, event)
        return event

    def cut(self, a: str, b: str) -> FaultEvent:
        """Nothing passes between hosts ``a`` and ``b``, in either direction."""
        ha, hb = self.plan.host(a), self.plan.host(b)
        table = self._table()
        self._apply(ha, table, [f"ip saddr {hb.address} drop"], [f"ip daddr {hb.address} drop"])
        return self._record("cut", table, a, b, ha.netns)

    def cut_one_way(self, src: str, dst: str) -> FaultEvent:
        """Packets from ``src`` to ``dst`` are lost; ``dst`` still reaches ``src``."""
        hs, hd = self.plan.host(src), self.plan.host(dst)
        table = self._table()
        self._apply(hs, table, [], [f"ip daddr {hd.address} drop"])
        return self._record("cut_one_way", table, src, dst, hs.netns)

    def isolate(self, a: str) -> FaultEvent:
        """Host ``a`` reaches nobody and nobody reaches it (its own loopback still works)."""
        ha = self.plan.host(a)
        table = self._table()
        self._apply(ha, table, ['iifname "lo" accept', "drop"], ['oifname "lo" accept', "drop"])
        return self._record("isolate", table, a, "", ha.netns)

    def heal_all(self) -> None:
        """Remove every active fault (a blocking action for ``Platform.run_locked``)."""
        self.heal()

    def heal(self, event: FaultEvent | None = None) -> list[FaultEvent]:
        """Remove one fault (or every active one); returns the heal events recorded."""
        tables = [event.table] if event is not None else list(self.active)
        healed = []
        for table in tables:
            if table not in self.active:
                continue
            netns, fault = self.active.pop(table)
            _run(["nsenter", f"--net={_NETNS_DIR / netns}", "--", "nft", "delete", "table",
                  "inet", table], check=False)  # fmt: skip
            heal = FaultEvent("heal", table, fault.a, fault.b, time.time(), time.monotonic())
            self.log.append(heal)
            healed.append(heal)
        return healed

    def timeline(self, since_mono: float = 0.0) -> list[dict[str, Any]]:
        """The log as JSON rows, times relative to ``since_mono`` (the drill's fault clock)."""
        return [
            {
                "action": e.action,
                "what": e.describe(),
                "at": round(e.at, 3),
                "t_s": round(e.mono - since_mono, 3),
            }
            for e in self.log
        ]
