"""The committed stubs in pkg/proto are exactly what ./dev proto generates from proto/."""

from __future__ import annotations

import filecmp
from pathlib import Path

from devtools import protogen


def _tree(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in root.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts
    }


def test_generated_stubs_match_proto_sources(tmp_path: Path) -> None:
    out = tmp_path / "proto_out"
    protogen.generate(out_dir=out)
    fresh = _tree(out)
    committed = _tree(protogen.OUT_DIR)
    stale = sorted(k for k in fresh if committed.get(k) != fresh[k])
    extra = sorted(k for k in committed if k not in fresh)
    assert not stale and not extra, (
        f"pkg/proto is stale; run ./dev proto. Differs: {stale}; not generated: {extra}"
    )
    assert filecmp.dircmp(out, protogen.OUT_DIR) is not None
