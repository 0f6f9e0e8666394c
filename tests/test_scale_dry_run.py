"""``benchmarks/scale.py --dry-run``: every stage's generator and runner at tiny sizes, and the
parent's subprocess-per-stage measurement (wall time, peak RSS, full / tenth ratios)."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "scale.py"


def _module():
    spec = importlib.util.spec_from_file_location("scale_bench", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("stage", ["foodiml", "recipe1m", "corpus"])
def test_stage_generators_and_runners_in_process(stage, tmp_path):
    scale = _module()
    p = scale.stage_size(stage, "tenth", dry=True)
    paths = scale.generate(stage, tmp_path / stage, p)
    res = scale.RUNNERS[stage](p, paths, {"work": str(tmp_path / stage)})
    if stage == "foodiml":  # 80% of the rows are train rows; duplicates give extra positives
        assert 0.7 * p["rows"] < res["texts"] < 0.9 * p["rows"] and res["positives"] > res["texts"]
    elif stage == "recipe1m":  # ~70% train, ~60% of those with images, 1-5 images each
        assert 0.3 * p["recipes"] < res["texts"] < 0.6 * p["recipes"] and res["images"] > res["texts"]
    else:
        assert res["sentences"] == p["sentences"] and res["output_bytes"] > 0


def test_dry_run_measures_each_stage_in_a_subprocess(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--dry-run", "--stages", "vectors,eval",
                           "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads((out / "scale.json").read_text())
    got = {(r["stage"], r["size"]): r for r in report["results"]}
    assert set(got) == {(s, z) for s in ("vectors", "eval") for z in ("tenth", "full")}
    for r in got.values():
        assert r["rc"] == 0 and r["wall_s"] > 0 and r["peak_rss_mb"] > 10 and r["peak_rss_mb"] >= r["peak_anon_mb"]
    vec = got[("vectors", "full")]["result"]
    assert vec["recall_at_10"] >= 0.8 and vec["latency_queries"] > 100
    assert vec["params"]["nlist"] == got[("vectors", "tenth")]["result"]["params"]["nlist"]
    assert vec["estimate_bytes"]["total"] > vec["estimate_bytes"]["resident"] > 0
    assert "memory estimate" in proc.stdout  # printed before building
    assert "extrapolated_full_seconds" in got[("eval", "full")]["result"]
    assert set(report["ratios"]) == {"vectors", "eval"} and report["ratios"]["vectors"]["cpu_ratio"] > 0


def test_bad_stage_is_an_argparse_error():
    proc = subprocess.run([sys.executable, str(SCRIPT), "--stages", "vector"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2 and "unknown stage or size 'vector'" in proc.stderr
