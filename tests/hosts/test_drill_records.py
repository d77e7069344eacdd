"""What the drills record: one drills file for every platform, and a partition drill's record.

Pure logic on hand-made results and replica logs (no namespaces, no servers): the merge of a
run's rows into ``.bench/drills.json``, the history check turning a violation found in the
replicas' logs into a drill problem, and the record every partition drill carries.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from devtools import drill_partitions, drills


def row(name: str, ok: bool = True, **kw: Any) -> drills.Result:
    return drills.Result(name=name, expected="-", ok=ok, **kw)


def test_loopback_and_hosts_runs_keep_each_others_rows(tmp_path: Path) -> None:
    out = tmp_path / "drills.json"
    full, short = drills.Settings(), drills.Settings.short()
    drills.write_json([row("foghorn-kill"), row("pause")], full, out, "loopback")
    drills.write_json([row("foghorn-kill", ok=False), row("asymmetric")], full, out, "hosts")
    # A later run of one drill replaces only that drill's row of its own platform.
    doc = drills.write_json([row("pause", failed_requests=3)], short, out, "loopback")
    assert doc == json.loads(out.read_text())
    loop, hosts = doc["platforms"]["loopback"], doc["platforms"]["hosts"]
    assert sorted(loop["drills"]) == ["foghorn-kill", "pause"]
    assert loop["drills"]["pause"]["failed_requests"] == 3
    assert loop["drills"]["pause"]["mode"] == "short"
    assert loop["drills"]["foghorn-kill"]["mode"] == "full"
    assert loop["modes"] == ["full", "short"] and set(loop["settings"]) == {"full", "short"}
    assert sorted(hosts["drills"]) == ["asymmetric", "foghorn-kill"]
    assert loop["ok"] and not hosts["ok"] and not doc["ok"]


def test_a_drills_file_in_the_old_layout_is_started_afresh(tmp_path: Path) -> None:
    out = tmp_path / "drills.json"
    out.write_text(json.dumps({"mode": "full", "ok": True, "drills": {"pause": {"ok": True}}}))
    doc = drills.write_json([row("bridge-kill")], drills.Settings(), out, "hosts")
    assert list(doc["platforms"]) == ["hosts"]
    assert "drills" not in doc and list(doc["platforms"]["hosts"]["drills"]) == ["bridge-kill"]


# -- the history check and the partition record, on hand-made replica logs -----------------------
@dataclass
class FakeProc:
    log_path: Path


@dataclass
class FakeItem:
    name: str
    proc: FakeProc
    kind: str = "service"


@dataclass
class FakePlatform:
    """What the history check reads of a platform: its services' logs and its start time."""

    items: list[FakeItem]
    started_at: float = 900.0
    stack: Any = None

    def __post_init__(self) -> None:
        self.stack = type("Stack", (), {"sup": type("Sup", (), {"items": self.items})()})()

    def __hash__(self) -> int:
        return id(self)


@dataclass
class Logs:
    dir: Path
    lines: dict[str, list[dict[str, Any]]] = field(default_factory=dict)

    def history(self, replica: str, **rec: Any) -> None:
        self.lines.setdefault(replica, []).append({"event": "history", "holder": replica, **rec})

    def platform(self) -> FakePlatform:
        items = []
        for replica, lines in self.lines.items():
            path = self.dir / f"{replica}.log"
            path.write_text("".join(json.dumps(x) + "\n" for x in lines))
            items.append(FakeItem(replica, FakeProc(path)))
        return FakePlatform(items)


def after_drill(platform: FakePlatform, facts: dict[str, Any], result: drills.Result) -> None:
    ctx = drills.Ctx(platform, drills.Settings(), facts=facts)  # type: ignore[arg-type]
    for hook in drills.AFTER_DRILL:
        hook(ctx, result)
    result.facts.update(ctx.facts)


def own(logs: Logs, replica: str, node: str, token: int, t: float) -> None:
    logs.history(replica, kind="ownership", resource=node, op="acquire", token=token, t=t,
                 t_sent=t - 0.01)  # fmt: skip


def test_a_violation_in_the_replicas_logs_is_a_drill_problem(tmp_path: Path) -> None:
    logs = Logs(tmp_path)
    own(logs, "foghorn-0", "n1", 1, 1000.0)
    own(logs, "foghorn-1", "n1", 2, 1010.0)
    # A write from the superseded owner accepted after the takeover was known.
    logs.history("foghorn-0", kind="ownership", resource="n1", op="write", token=1, t=1012.0,
                 t_sent=1011.5)  # fmt: skip
    result = row("foghorn-kill")
    after_drill(logs.platform(), {}, result)
    assert result.facts["checker"]["clean"] is False
    [problem] = result.problems
    assert problem.startswith("history: superseded-write ownership:n1: write #1 by foghorn-0")


def test_a_partition_drills_record_has_its_times_takeovers_failures_and_verdict(
    tmp_path: Path,
) -> None:
    logs = Logs(tmp_path)
    own(logs, "foghorn-0", "n1", 1, 1000.0)
    own(logs, "foghorn-0", "n2", 2, 1000.0)
    own(logs, "foghorn-1", "n1", 3, 1011.0)
    own(logs, "foghorn-1", "n2", 4, 1012.5)
    logs.history("foghorn-0", kind="lease", resource="leader", op="acquire", token=7, t=1000.0,
                 valid_until=1015.0)  # fmt: skip
    facts = {
        "victims": ["foghorn-0"],
        "fault_at": 1005.0,
        "partition": [
            {"action": "cut", "what": "cut foghorn-0 <-> redis", "at": 1005.0, "t_s": 0.0},
            {"action": "heal", "what": "heal foghorn-0 (hapfault1)", "at": 1026.5, "t_s": 21.5},
        ],
    }
    result = row("partition-foghorn-redis", failed_foghorn=0, failed_bridge=2, requests=500,
                 lost_events=0, duplicate_events=1, events_produced=200)  # fmt: skip
    after_drill(logs.platform(), facts, result)
    record = result.facts["record"]
    assert record["cuts"] == [{"what": "cut foghorn-0 <-> redis", "at": 1005.0, "t_s": 0.0}]
    assert (record["healed_at"], record["healed_t_s"]) == (1026.5, 21.5)
    assert record["takeover_s"]["ownership"] == {"first": 6.0, "last": 7.5, "moved": 2, "held": 2}
    assert record["takeover_s"]["lease"]["moved"] == 0  # nobody took the lease in this history
    assert (record["failed_routings"], record["failed_queries"]) == (0, 2)
    assert (record["lost_events"], record["duplicate_events"]) == (0, 1)
    assert record["checker_clean"] is True and record["checker_findings"] == []


def test_a_classic_drill_gets_no_partition_record(tmp_path: Path) -> None:
    logs = Logs(tmp_path)
    own(logs, "foghorn-0", "n1", 1, 1000.0)
    result = row("foghorn-kill")
    after_drill(logs.platform(), {}, result)
    assert "record" not in result.facts and result.facts["checker"]["clean"]
    assert drill_partitions.partition_record in drills.AFTER_DRILL
