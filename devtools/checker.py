"""The history checker: did a drill keep the coordination guarantees, judged by the tokens?

Input: the ``history`` lines the replicas logged (``pkg.common.history``: every acquisition,
renewal, release and loss of a lease, node ownership or partition, and every write a store
accepted, with its fencing token or epoch and wall-clock times) and, per subscription, the
events produced and the events delivered with their offsets. Output: findings, each a drill
problem. What is checked, per resource (``kind`` + ``resource``):

- ``token-reissued``: two holders acquired the same token (the store issued it twice);
- ``token-regressed``: an acquisition started after a higher token had been acquired, and got a
  lower one (tokens and epochs only increase);
- ``overlapping-holders``: two terms of a lease overlapped in time, each as its holder saw it
  (from its acquisition to its release, loss or the end of its own validity), i.e. two leaders
  at once; ownership and partitions are judged by tokens only (an old owner may believe a
  little longer, that is what fencing is for), through the next check;
- ``superseded-write``: a store accepted a write whose token was lower than one already
  acquired for the resource when the write was sent;
- ``lost-event`` / ``duplicate-event`` / ``offset-regressed`` per subscription.

Every judgement is sound against logging delays: a record's ``t`` is taken *after* the store
answered, ``t_sent`` *before* the request left, so "A happened before B" is only concluded from
``A.t < B.t_sent`` (a real violation can be missed in a window of one round trip, a correct run
is never flagged).
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

KINDS_WITH_EXCLUSIVE_TERMS = ("lease",)


@dataclass(frozen=True)
class Rec:
    """One history line."""

    kind: str
    resource: str
    op: str  # acquire | renew | release | lost | write
    token: int
    holder: str
    t: float
    t_sent: float | None = None
    valid_until: float | None = None

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> Rec:
        return cls(
            kind=str(doc["kind"]),
            resource=str(doc["resource"]),
            op=str(doc["op"]),
            token=int(doc["token"]),
            holder=str(doc["holder"]),
            t=float(doc["t"]),
            t_sent=None if doc.get("t_sent") is None else float(doc["t_sent"]),
            valid_until=None if doc.get("valid_until") is None else float(doc["valid_until"]),
        )


@dataclass(frozen=True)
class Delivery:
    event_id: str
    offset: int
    epoch: str = ""


@dataclass
class Subscription:
    """What one subscriber should have seen (``expected``) and what it saw, in order."""

    name: str
    expected: list[str] = field(default_factory=list)
    delivered: list[Delivery] = field(default_factory=list)


@dataclass(frozen=True)
class Finding:
    check: str
    resource: str
    detail: str

    def __str__(self) -> str:
        return f"{self.check} {self.resource}: {self.detail}"


@dataclass
class Report:
    findings: list[Finding] = field(default_factory=list)
    records: int = 0
    resources: int = 0
    acquisitions: int = 0
    writes: int = 0
    subscriptions: int = 0
    deliveries: int = 0

    @property
    def clean(self) -> bool:
        return not self.findings

    def summary(self) -> dict[str, Any]:
        doc = asdict(self)
        doc["findings"] = [str(f) for f in self.findings]
        doc["clean"] = self.clean
        return doc


# -- reading --------------------------------------------------------------------------------------
def read_logs(paths: Iterable[Path], since: float = 0.0, until: float = float("inf")) -> list[Rec]:
    """The history lines of JSON log files with ``since <= t <= until``; other lines skipped."""
    out = []
    for path in paths:
        try:
            text = path.read_text(errors="replace")
        except OSError:
            continue
        for line in text.splitlines():
            if '"history"' not in line:
                continue
            try:
                doc = json.loads(line)
            except ValueError:
                continue
            if not isinstance(doc, dict) or doc.get("event") != "history":
                continue
            try:
                rec = Rec.from_json(doc)
            except (KeyError, TypeError, ValueError):
                continue
            if since <= rec.t <= until:
                out.append(rec)
    return out


# -- checks ---------------------------------------------------------------------------------------
def _fmt(rec: Rec) -> str:
    return f"{rec.holder} {rec.op} #{rec.token} at {rec.t:.3f}"


def _acquisitions(recs: Sequence[Rec], report: Report, resource: str) -> None:
    acquires = sorted((r for r in recs if r.op == "acquire"), key=lambda r: r.t)
    report.acquisitions += len(acquires)
    by_token: dict[int, Rec] = {}
    for rec in acquires:
        first = by_token.setdefault(rec.token, rec)
        if first is not rec and first.holder != rec.holder:
            report.findings.append(
                Finding("token-reissued", resource, f"{_fmt(first)} and {_fmt(rec)}")
            )
    for later in acquires:
        started = later.t_sent if later.t_sent is not None else later.t
        for earlier in acquires:
            if earlier.t < started and earlier.token > later.token:
                report.findings.append(
                    Finding(
                        "token-regressed",
                        resource,
                        f"{_fmt(later)} started after {_fmt(earlier)} yet got a lower token",
                    )
                )
                break


def _terms(recs: Sequence[Rec]) -> list[tuple[str, int, float, float]]:
    """(holder, token, start, end) of each term as its holder saw it."""
    terms: dict[tuple[str, int], list[float]] = {}
    for rec in sorted(recs, key=lambda r: r.t):
        key = (rec.holder, rec.token)
        if rec.op == "acquire":
            end = rec.valid_until if rec.valid_until is not None else float("inf")
            terms[key] = [rec.t, end]
        elif key in terms:
            span = terms[key]
            if rec.op == "renew" and rec.valid_until is not None:
                span[1] = rec.valid_until
            elif rec.op in ("release", "lost"):
                span[1] = min(span[1], rec.t)
    return [(h, tok, s, e) for (h, tok), (s, e) in terms.items()]


def _exclusive_terms(recs: Sequence[Rec], report: Report, resource: str) -> None:
    terms = sorted(_terms(recs), key=lambda x: x[2])
    for i, (h1, t1, s1, e1) in enumerate(terms):
        for h2, t2, s2, e2 in terms[i + 1 :]:
            if s2 < e1 and s1 < e2 and (h1, t1) != (h2, t2):
                report.findings.append(
                    Finding(
                        "overlapping-holders",
                        resource,
                        f"{h1} #{t1} held {s1:.3f}..{e1:.3f} while {h2} #{t2} held "
                        f"{s2:.3f}..{e2:.3f}",
                    )
                )


def _writes(recs: Sequence[Rec], report: Report, resource: str) -> None:
    acquires = sorted((r for r in recs if r.op == "acquire"), key=lambda r: r.t)
    writes = [r for r in recs if r.op == "write"]
    report.writes += len(writes)
    for write in writes:
        sent = write.t_sent if write.t_sent is not None else write.t
        newer = next((a for a in acquires if a.token > write.token and a.t < sent), None)
        if newer is not None:
            report.findings.append(
                Finding(
                    "superseded-write",
                    resource,
                    f"write #{write.token} by {write.holder} sent at {sent:.3f} was accepted "
                    f"after {_fmt(newer)}",
                )
            )


def _subscription(sub: Subscription, report: Report) -> None:
    report.subscriptions += 1
    report.deliveries += len(sub.delivered)
    counts: dict[str, int] = defaultdict(int)
    for d in sub.delivered:
        counts[d.event_id] += 1
    lost = [e for e in sub.expected if e not in counts]
    if lost:
        report.findings.append(
            Finding("lost-event", sub.name, f"{len(lost)} of {len(sub.expected)}, e.g. {lost[:3]}")
        )
    dups = {e: n for e, n in counts.items() if n > 1}
    if dups:
        report.findings.append(
            Finding(
                "duplicate-event",
                sub.name,
                f"{sum(n - 1 for n in dups.values())} extra deliveries, e.g. {list(dups)[:3]}",
            )
        )
    last: dict[str, Delivery] = {}
    for d in sub.delivered:
        prev = last.get(d.epoch)
        if prev is not None and d.offset <= prev.offset:
            report.findings.append(
                Finding(
                    "offset-regressed",
                    sub.name,
                    f"offset {d.offset} ({d.event_id}) after {prev.offset} ({prev.event_id}) "
                    f"in epoch {d.epoch!r}",
                )
            )
        last[d.epoch] = d


def check(records: Sequence[Rec], subscriptions: Sequence[Subscription] = ()) -> Report:
    """Every check above over one drill's records and subscriptions."""
    report = Report(records=len(records))
    grouped: dict[tuple[str, str], list[Rec]] = defaultdict(list)
    for rec in records:
        grouped[(rec.kind, rec.resource)].append(rec)
    report.resources = len(grouped)
    for (kind, resource), recs in sorted(grouped.items()):
        name = f"{kind}:{resource}"
        _acquisitions(recs, report, name)
        if kind in KINDS_WITH_EXCLUSIVE_TERMS:
            _exclusive_terms(recs, report, name)
        _writes(recs, report, name)
    for sub in subscriptions:
        _subscription(sub, report)
    return report
