"""Helpers shared by the benchmarks (not a benchmark itself: ``./dev bench`` skips this module)."""

from __future__ import annotations

import contextlib
import math
import os
import resource
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path


def cpu_seconds(pid: int | None) -> float:
    """User + system CPU seconds a process has used so far (Linux /proc; 0 if it is gone)."""
    if pid is None:
        return 0.0
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_bytes(pid: int | None) -> int:
    """Resident set size of a process in bytes (Linux /proc; 0 if it is gone)."""
    if pid is None:
        return 0
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0
    for line in status.splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def raise_open_files_limit() -> int:
    """Soft open-files limit up to the hard one (children inherit it); the limit now in force.

    Benchmarks that give every node or subscriber its own connection hold thousands of
    sockets in one process (10,000 on a survivor after a herd): a soft limit of 1,024, the
    default on many systems, would refuse connections."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = 1 << 20  # (Linux refuses an infinite open-files limit)
    with contextlib.suppress(ValueError, OSError):  # kept as it is if refused
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, hard), hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def load_average() -> str:
    """The 1/5/15-minute load averages, as ``uptime`` prints them (figures depend on them)."""
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


def machine_cpu() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine so far, all cores (Linux /proc/stat): the
    difference of two readings says how busy the machine was in between, a benchmark's
    processes and everyone else's."""
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except OSError:
        return 0.0, 0.0
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    tick = os.sysconf("SC_CLK_TCK")
    return (sum(fields) - idle) / tick, sum(fields) / tick


@dataclass(frozen=True)
class Panel:
    """One small chart of a curve plot: a value per size, optionally a target line."""

    title: str
    values: Sequence[float | None]
    unit: str = ""
    target: float | None = None


def write_curves_svg(
    path: Path, title: str, sizes: Sequence[int], panels: Sequence[Panel], note: str = ""
) -> None:
    """Small multiples as a dependency-free SVG: one panel per metric, the sizes on the x axis
    (spaced by their logarithm), a dashed line at the target. Written by the benchmarks so the
    RFCs' capacity plots come from a run, not from hand-drawn figures."""
    cols = 3
    width, height, pad = 300, 190, 36
    rows = (len(panels) + cols - 1) // cols
    total_w, total_h = cols * width, rows * height + 46
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{total_w}" height="{total_h}" '
        f'viewBox="0 0 {total_w} {total_h}" font-family="sans-serif" font-size="11">',
        f'<rect width="{total_w}" height="{total_h}" fill="white"/>',
        f'<text x="10" y="18" font-size="14" font-weight="bold">{_esc(title)}</text>',
        f'<text x="10" y="34" fill="#555">{_esc(note)}</text>',
    ]
    logs = [math.log10(s) for s in sizes]
    lo_x, hi_x = min(logs), max(logs)
    for i, panel in enumerate(panels):
        ox, oy = (i % cols) * width, 46 + (i // cols) * height
        x0, x1, y0, y1 = ox + pad + 8, ox + width - 26, oy + height - 30, oy + 24
        known = [v for v in panel.values if v is not None]
        top = max([*known, panel.target or 0.0, 1e-9]) * 1.15
        out.append(f'<text x="{ox + 10}" y="{oy + 14}" font-weight="bold">'
                   f"{_esc(panel.title)}{' (' + _esc(panel.unit) + ')' if panel.unit else ''}"
                   "</text>")  # fmt: skip
        out.append(f'<line x1="{x0}" y1="{y0}" x2="{x1}" y2="{y0}" stroke="#888"/>')
        out.append(f'<line x1="{x0}" y1="{y0}" x2="{x0}" y2="{y1}" stroke="#888"/>')
        for frac in (0.0, 0.5, 1.0):
            y = y0 - frac * (y0 - y1)
            out.append(f'<text x="{x0 - 4}" y="{y + 4:.1f}" text-anchor="end" fill="#555">'
                       f"{_num(frac * top)}</text>")  # fmt: skip

        def px(k: int, v: float, x0: float = x0, x1: float = x1, y0: float = y0,
               y1: float = y1, top: float = top) -> tuple[float, float]:  # fmt: skip
            span = (hi_x - lo_x) or 1.0
            return (x0 + (logs[k] - lo_x) / span * (x1 - x0), y0 - v / top * (y0 - y1))

        for k, size in enumerate(sizes):
            x, _ = px(k, 0.0)
            out.append(f'<text x="{x:.1f}" y="{y0 + 14}" text-anchor="middle" fill="#555">'
                       f"{size:,}</text>")  # fmt: skip
        if panel.target is not None:
            _, ty = px(0, panel.target)
            out.append(f'<line x1="{x0}" y1="{ty:.1f}" x2="{x1}" y2="{ty:.1f}" stroke="#c33" '
                       'stroke-dasharray="4,3"/>')  # fmt: skip
            out.append(f'<text x="{x0 + 4}" y="{ty - 3:.1f}" fill="#c33">'
                       f"target {_num(panel.target)}</text>")  # fmt: skip
        points = [px(k, v) for k, v in enumerate(panel.values) if v is not None]
        if len(points) > 1:
            path_d = " ".join(f"{x:.1f},{y:.1f}" for x, y in points)
            out.append(f'<polyline points="{path_d}" fill="none" stroke="#1f5fa8" '
                       'stroke-width="2"/>')  # fmt: skip
        for k, v in enumerate(panel.values):
            if v is None:
                continue
            x, y = px(k, v)
            out.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="3" fill="#1f5fa8"/>')
            out.append(f'<text x="{x:.1f}" y="{y - 6:.1f}" text-anchor="middle">{_num(v)}</text>')
    out.append("</svg>")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(out) + "\n")


def _num(value: float) -> str:
    if value >= 100 or value == int(value):
        return f"{value:,.0f}"
    return f"{value:.3g}"


def _esc(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
