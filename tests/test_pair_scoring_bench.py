"""benchmarks/pair_scoring.py at tiny sizes: every scoring path runs and agrees with the
original per-caption loop it is timed against."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "pair_scoring.py"


def test_speed_section_at_tiny_sizes(tmp_path):
    spec = importlib.util.spec_from_file_location("pair_scoring_bench", BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "speed.json"
    assert mod.main(["--images", "24", "--captions", "30", "--regions", "5", "--dim", "32", "--ref-captions", "6",
                     "--ref-images", "4", "--skip-two-stage", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    for direction in ("t2i", "i2t"):
        row = res["speed"][direction] if "speed" in res else res[direction]
        assert row["max_abs_diff_vs_reference"] < 1e-5
        assert row["max_abs_diff_eager_vs_compiled"] < 1e-5
        assert row["fused"]["pairs"] == 24 * 30
