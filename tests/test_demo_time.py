"""benchmarks/demo_time.py: the README's demo timings come from it; its dry run times `demo --help`."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_demo_time_dry_run(tmp_path):
    out = tmp_path / "t.json"
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "demo_time.py"), "--dry-run", "--json", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    (r,) = json.loads(out.read_text())["results"]
    assert r["mode"] == "help" and r["first_s"] > 0 and r["cached_s"] > 0
    assert r["extraction_images_per_s"] is None  # --help extracts nothing
    assert "first run" in done.stdout
