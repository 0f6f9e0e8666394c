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


@pytest.mark.parametrize("dry", [True, False])
def test_the_tenth_size_is_a_tenth_of_the_work(dry):
    """1/10 divides the workload's own axis only (for eval the captions, for corpus the sentences);
    tenth-both also divides the images of eval / corpus (1/100 of the work)."""
    scale = _module()
    work = {"foodiml": lambda p: p["rows"], "recipe1m": lambda p: p["recipes"], "vectors": lambda p: p["n"],
            "corpus": lambda p: p["sentences"] * p["images"], "eval": lambda p: p["images"] * p["captions"]}
    for stage in scale.STAGES:
        full, tenth = (scale.stage_size(stage, z, dry) for z in ("full", "tenth"))
        assert work[stage](full) == 10 * work[stage](tenth), stage
        assert {k: v for k, v in full.items() if k != scale.WORKLOAD_AXIS[stage]} == \
            {k: v for k, v in tenth.items() if k != scale.WORKLOAD_AXIS[stage]}
    for stage in ("eval", "corpus"):
        assert work[stage](scale.stage_size(stage, "full", dry)) == 100 * work[stage](scale.stage_size(stage, "tenth-both", dry))
    full = scale.stage_size("eval", "full", dry=False)
    assert (full["images"], full["captions"]) == (100_000, 500_000)
    assert scale.stage_size("eval", "tenth", dry=False)["captions"] == 50_000
    assert scale.stage_size("vectors", "tenth", dry=False, full_n=1_000_000)["n"] == 100_000


def test_ratios_use_extrapolated_seconds_and_the_both_axes_row():
    scale = _module()
    row = {"rc": 0, "cpu_s": 10.0, "peak_rss_mb": 100.0}
    results = [{**row, "stage": "eval", "size": "tenth", "wall_s": 20.0, "result": {"seconds": 15.0}},
               {**row, "stage": "eval", "size": "tenth-both", "wall_s": 4.0, "result": {"seconds": 1.5}},
               {**row, "stage": "eval", "size": "full", "wall_s": 30.0, "cpu_s": 25.0,
                "result": {"seconds": 20.0, "extrapolated_full_seconds": 150.0}}]
    r = scale.ratios(results)["eval"]
    assert r["time_ratio"] == 1.5 and r["cpu_ratio"] == 2.5 and r["work_ratio"] == 10.0 and r["extrapolated"]
    assert r["time_ratio_vs_tenth_both"] == 7.5 and r["work_ratio_vs_tenth_both"] == 100.0


def test_dry_run_measures_each_stage_in_a_subprocess(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--dry-run", "--stages", "vectors,eval",
                           "--sizes", "tenth,full,tenth-both", "--out", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads((out / "scale.json").read_text())
    got = {(r["stage"], r["size"]): r for r in report["results"]}
    # tenth-both is skipped for one-axis stages (it would repeat tenth)
    assert set(got) == {(s, z) for s in ("vectors", "eval") for z in ("tenth", "full")} | {("eval", "tenth-both")}
    assert got[("eval", "tenth")]["result"]["evaluated_images"] == 400  # every image, 1/10 of the captions
    assert got[("eval", "tenth-both")]["result"]["evaluated_images"] == 40
    for r in got.values():
        assert r["rc"] == 0 and r["wall_s"] > 0 and r["peak_rss_mb"] > 10 and r["peak_rss_mb"] >= r["peak_anon_mb"]
    vec = got[("vectors", "full")]["result"]
    assert vec["recall_at_10"] >= 0.8 and vec["latency_queries"] > 100
    assert vec["params"]["nlist"] == got[("vectors", "tenth")]["result"]["params"]["nlist"]
    assert vec["estimate_bytes"]["total"] > vec["estimate_bytes"]["resident"] > 0
    assert "memory estimate" in proc.stdout  # printed before building
    assert "extrapolated_full_seconds" in got[("eval", "full")]["result"]
    assert set(report["ratios"]) == {"vectors", "eval"} and report["ratios"]["vectors"]["cpu_ratio"] > 0
    assert report["ratios"]["eval"]["extrapolated"] and report["ratios"]["eval"]["work_ratio_vs_tenth_both"] > 0


def test_bad_stage_is_an_argparse_error():
    proc = subprocess.run([sys.executable, str(SCRIPT), "--stages", "vector"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2 and "unknown stage or size 'vector'" in proc.stderr
