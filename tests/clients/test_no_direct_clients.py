"""Phase 0 of the scaling RFC: outside pkg/clients no code creates gRPC channels or httpx clients.

Every call between services must go through pkg.clients (deadlines, retries, budget, breaker,
telemetry). Two kinds of code may open raw clients, each marking the line: benchmarks measuring
a raw baseline (``# raw-client: baseline``) and load generators that play a hostile or naive
caller on purpose, whom the platform must withstand (``# raw-client: adversary``).
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SKIP_DIRS = {".venv", ".git", "node_modules", "__pycache__", ".bench", "build", "dist"}
ALLOWED_PREFIXES = ("pkg/clients/", "tests/", "pkg/proto/")
MARKERS = ("# raw-client: baseline", "# raw-client: adversary")
DIRECT = re.compile(
    r"\b(?:insecure_channel|secure_channel)\s*\("  # grpc.*, grpc.aio.*, from-imports
    r"|\bhttpx\s*\.\s*(?:Client|AsyncClient)\s*\("
    # httpx's module-level helpers open a throwaway client per call: no policy either.
    r"|\bhttpx\s*\.\s*(?:request|stream|get|options|head|post|put|patch|delete)\s*\("
    r"|\bgrpc\s*\.\s*(?:aio\s*\.\s*)?Channel\s*\("
)


def python_files() -> list[Path]:
    files = []
    for path in ROOT.rglob("*.py"):
        relative = path.relative_to(ROOT)
        if set(relative.parts) & SKIP_DIRS or any(p.endswith(".egg-info") for p in relative.parts):
            continue
        if relative.as_posix().startswith(ALLOWED_PREFIXES):
            continue
        files.append(path)
    return files


def offenders(files: list[Path]) -> list[str]:
    found = []
    for path in files:
        text = path.read_text(errors="replace")
        lines = text.splitlines()
        for match in DIRECT.finditer(text):
            line_no = text.count("\n", 0, match.start()) + 1
            # A call split over lines may carry the marker on its first line.
            if any(marker in lines[line_no - 1] for marker in MARKERS):
                continue
            name = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
            found.append(f"{name}:{line_no}: {lines[line_no - 1].strip()}")
    return found


def test_no_code_outside_pkg_clients_creates_grpc_channels_or_httpx_clients() -> None:
    files = python_files()
    assert len(files) > 5, "the scan found no files: wrong root?"
    found = offenders(files)
    assert not found, "create channels/clients through pkg.clients instead:\n" + "\n".join(found)


def test_the_scan_catches_every_direct_form(tmp_path: Path) -> None:
    sample = tmp_path / "svc.py"
    sample.write_text(
        "import grpc, httpx\n"
        "a = grpc.insecure_channel('x:1')\n"
        "b = grpc.aio.insecure_channel('x:1')\n"
        "c = grpc.secure_channel('x:1', creds)\n"
        "from grpc.aio import insecure_channel\n"
        "d = insecure_channel('x:1')\n"
        "e = httpx.Client()\n"
        "f = httpx.AsyncClient(base_url='http://x')\n"
        "g = grpc.aio.insecure_channel('x:1')  # raw-client: baseline\n"
        "h = httpx.get('http://x')\n"
        "i = httpx.Headers({})\n"
        "j = httpx.AsyncClient()  # raw-client: adversary\n"
        "k = httpx.AsyncClient()  # raw-client: because\n"
    )
    found = offenders([sample])
    lines = sorted(int(entry.rsplit(".py:", 1)[1].split(":")[0]) for entry in found)
    assert lines == [2, 3, 4, 6, 7, 8, 10, 13]


def test_offences_name_file_and_line(tmp_path: Path) -> None:
    sample = tmp_path / "x.py"
    sample.write_text("\n\nclient = httpx.AsyncClient()\n")
    (entry,) = offenders([sample])
    assert entry.endswith(":3: client = httpx.AsyncClient()")
