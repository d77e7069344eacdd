"""The history checker on hand-made histories: each kind of violation is found, clean ones pass."""

from __future__ import annotations

import json
from pathlib import Path

from devtools.checker import Delivery, Rec, Subscription, check, read_logs


def acq(res: str, token: int, holder: str, t: float, kind: str = "ownership", **kw: float) -> Rec:
    return Rec(kind, res, "acquire", token, holder, t, t_sent=kw.get("t_sent", t - 0.001),
               valid_until=kw.get("valid_until"))  # fmt: skip


def write(res: str, token: int, holder: str, t_sent: float, kind: str = "ownership") -> Rec:
    return Rec(kind, res, "write", token, holder, t_sent + 0.002, t_sent=t_sent)


def kinds(records: list[Rec], subs: list[Subscription] | None = None) -> list[str]:
    return [f.check for f in check(records, subs or []).findings]


def test_a_clean_takeover_history_has_no_finding() -> None:
    records = [
        acq("n1", 1, "a", 1.0),
        write("n1", 1, "a", 1.5),
        Rec("ownership", "n1", "lost", 1, "a", 3.5),
        acq("n1", 2, "b", 3.0),  # b took over while a still believed: fencing makes that safe
        write("n1", 2, "b", 3.2),
        acq("leader", 7, "a", 1.0, kind="lease", valid_until=5.0),
        Rec("lease", "leader", "lost", 7, "a", 4.0, valid_until=4.0),
        acq("leader", 8, "b", 6.0, kind="lease", valid_until=20.0),
    ]
    report = check(records)
    assert report.clean, report.findings
    assert report.acquisitions == 4 and report.writes == 2


def test_a_token_issued_to_two_holders_is_found() -> None:
    assert kinds([acq("n1", 5, "a", 1.0), acq("n1", 5, "b", 2.0)]) == ["token-reissued"]


def test_a_token_that_goes_backwards_is_found() -> None:
    found = kinds([acq("p/0", 9, "a", 1.0, kind="partition"),
                   acq("p/0", 4, "b", 2.0, kind="partition")])  # fmt: skip
    assert found == ["token-regressed"]


def test_acquisitions_that_overlap_in_flight_are_not_judged_out_of_order() -> None:
    # b's request left before a's answer was logged: the store may have served b first.
    records = [acq("n1", 9, "a", 2.0), acq("n1", 4, "b", 2.5, t_sent=1.5)]
    assert kinds(records) == []


def test_two_leaders_at_once_are_found() -> None:
    records = [
        acq("leader", 1, "a", 1.0, kind="lease", valid_until=10.0),
        Rec("lease", "leader", "renew", 1, "a", 5.0, valid_until=14.0),
        acq("leader", 2, "b", 12.0, kind="lease", valid_until=25.0),
    ]
    assert kinds(records) == ["overlapping-holders"]


def test_a_lease_that_ran_out_locally_does_not_overlap_its_successor() -> None:
    records = [
        acq("leader", 1, "a", 1.0, kind="lease", valid_until=10.0),
        acq("leader", 2, "b", 10.5, kind="lease", valid_until=25.0),
    ]
    assert kinds(records) == []


def test_a_write_accepted_from_a_superseded_holder_is_found() -> None:
    records = [acq("n1", 1, "a", 1.0), acq("n1", 2, "b", 3.0), write("n1", 1, "a", 3.5)]
    assert kinds(records) == ["superseded-write"]


def test_a_write_sent_before_the_takeover_was_known_is_not_judged() -> None:
    records = [acq("n1", 1, "a", 1.0), acq("n1", 2, "b", 3.0), write("n1", 1, "a", 2.9)]
    assert kinds(records) == []


def test_lost_and_duplicated_events_and_offsets_going_back_are_found() -> None:
    sub = Subscription(
        "sub-1",
        expected=["e1", "e2", "e3"],
        delivered=[Delivery("e1", 10, "x"), Delivery("e2", 11, "x"), Delivery("e2", 11, "x")],
    )
    assert kinds([], [sub]) == ["lost-event", "duplicate-event", "offset-regressed"]


def test_a_complete_subscription_is_clean() -> None:
    sub = Subscription("s", ["e1", "e2"], [Delivery("e1", 1, "x"), Delivery("e2", 5, "x")])
    assert check([], [sub]).clean


def test_history_lines_are_read_from_json_logs(tmp_path: Path) -> None:
    log = tmp_path / "foghorn-0.log"
    lines = [
        {"event": "history", "kind": "ownership", "resource": "n1", "op": "acquire", "token": 3,
         "holder": "foghorn-0", "t": 100.0, "t_sent": 99.9},
        {"event": "node registered", "node_id": "n1"},
        {"event": "history", "kind": "ownership", "resource": "n1", "op": "write", "token": 3,
         "holder": "foghorn-0", "t": 200.0, "t_sent": 199.9},
    ]  # fmt: skip
    log.write_text("\n".join(json.dumps(x) for x in lines) + "\nnot json\n")
    records = read_logs([log, tmp_path / "missing.log"], since=50.0, until=150.0)
    assert records == [Rec("ownership", "n1", "acquire", 3, "foghorn-0", 100.0, t_sent=99.9)]
