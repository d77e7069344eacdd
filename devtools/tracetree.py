"""Print the traces captured in ``PLATFORM_TRACES_DIR`` as text trees.

``python -m devtools.tracetree DIR [TRACE_ID ...]``: every span file (``*.jsonl``) of DIR is read
and each trace (the given ones, else every trace with spans in two processes or more) is printed
as a tree: one line per span with its service and replica, kind, name, start offset and duration;
linked spans are listed under the span that links to them. docs/observability.md shows one.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

Span = dict[str, Any]


def read_spans(directory: Path) -> list[Span]:
    """Every span of every ``*.jsonl`` file in ``directory``."""
    spans = []
    for path in sorted(directory.glob("*.jsonl")):
        for line in path.read_text().splitlines():
            if line.strip():
                spans.append(json.loads(line))
    return spans


def _ts(value: str) -> float:
    # "2026-12-07T13:18:52.123456Z"
    from datetime import datetime

    return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


def _who(span: Span) -> str:
    attrs = span["resource"]["attributes"]
    return f"{attrs.get('service.name', '?')}[{attrs.get('service.instance.id', '?')}]"


def render(spans: Iterable[Span]) -> str:
    """One trace's spans as an indented tree (roots first, children by start time)."""
    spans = sorted(spans, key=lambda s: _ts(s["start_time"]))
    if not spans:
        return ""
    ids = {s["context"]["span_id"] for s in spans}
    children: dict[str | None, list[Span]] = {}
    for span in spans:
        parent = span["parent_id"] if span["parent_id"] in ids else None
        children.setdefault(parent, []).append(span)
    t0 = _ts(spans[0]["start_time"])
    trace_id = spans[0]["context"]["trace_id"]
    lines = [f"trace {trace_id}  (offset and duration in ms)"]

    def walk(span: Span, depth: int) -> None:
        start = (_ts(span["start_time"]) - t0) * 1000
        took = (_ts(span["end_time"]) - _ts(span["start_time"])) * 1000
        kind = span["kind"].removeprefix("SpanKind.").lower()
        pad = "  " * depth
        remote = "" if span["parent_id"] in ids or span["parent_id"] is None else " (remote parent)"
        lines.append(
            f"{start:8.1f} {took:8.1f}  {pad}{span['name']}  [{kind}] {_who(span)}{remote}"
        )
        for link in span.get("links") or ():
            lines.append(f"{'':18}{pad}  ~ linked to span {link['context']['span_id']}")
        for child in children.get(span["context"]["span_id"], []):
            walk(child, depth + 1)

    for root in children.get(None, []):
        walk(root, 0)
    return "\n".join(lines)


def traces(spans: Iterable[Span]) -> dict[str, list[Span]]:
    """Spans grouped by trace id."""
    out: dict[str, list[Span]] = {}
    for span in spans:
        out.setdefault(span["context"]["trace_id"], []).append(span)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m devtools.tracetree", description=__doc__)
    p.add_argument("directory", type=Path)
    p.add_argument("trace_ids", nargs="*")
    args = p.parse_args(argv)
    grouped = traces(read_spans(args.directory))
    wanted = args.trace_ids or [
        tid for tid, spans in grouped.items() if len({_who(s) for s in spans}) > 1
    ]
    for tid in wanted:
        print(render(grouped.get(tid, [])))
        print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
