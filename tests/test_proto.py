"""The committed protobuf stubs are exactly what proto/ generates (regenerated into a temp folder)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_generated_stubs_match_the_proto_sources(tmp_path: Path) -> None:
    env = dict(os.environ, PYTHON=sys.executable)
    subprocess.run([str(ROOT / "scripts" / "gen_proto.sh"), str(tmp_path)], check=True, env=env)
    generated = sorted(p.name for p in (tmp_path / "fedgrid" / "v1").iterdir())
    committed = sorted(p.name for p in (ROOT / "fedgrid" / "v1").iterdir() if p.name != "__init__.py" and p.is_file())
    assert generated == committed
    for name in generated:
        fresh = (tmp_path / "fedgrid" / "v1" / name).read_text()
        assert fresh == (ROOT / "fedgrid" / "v1" / name).read_text(), (
            f"fedgrid/v1/{name} is stale: run scripts/gen_proto.sh"
        )


def test_every_proto_file_has_stubs() -> None:
    for proto in (ROOT / "proto" / "fedgrid" / "v1").glob("*.proto"):
        assert (ROOT / "fedgrid" / "v1" / f"{proto.stem}_pb2.py").exists()
