"""The committed Python stubs are exactly what the .proto files generate."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[2]


def test_generated_stubs_are_current(tmp_path):
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    subprocess.run(["bash", str(ROOT / "scripts/gen_proto.sh"), str(tmp_path)], check=True, env=env)
    generated = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*.py*"))
    assert generated, "nothing was generated"
    stale = [str(p) for p in generated if (tmp_path / p).read_bytes() != (ROOT / "proto" / p).read_bytes()]
    assert stale == [], f"regenerate with `make proto`: {stale}"
