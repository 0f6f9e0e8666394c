"""``benchmarks/gpu_check.sh --dry-run``: every GPU part (eval, train, adapt, extract, one-process
DDP) runs the same code at tiny sizes on CPU and reports a ratio against its in-run reference."""
from __future__ import annotations

import json
import shutil
import sys
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None, reason="needs bash and timeout")
def test_gpu_check_dry_run_runs_every_part(tmp_path):
    out = tmp_path / "gpu"
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), str(out), "--dry-run"],
                          capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    report = json.loads((out / "gpu_check.json").read_text())
    assert report["dry_run"] is True and (out / "env.txt").exists()
    parts = report["parts"]
    assert list(parts) == ["eval", "train", "adapt", "extract", "ddp"]
    for name, res in parts.items():
        assert res["status"] == "ok", (name, res)
        ratios = [v for k, v in res.items() if k.startswith("ratio")]
        assert len(ratios) == 1 and ratios[0] > 0, (name, res)
    assert parts["ddp"]["backend"] == "gloo" and parts["ddp"]["world_size"] == 1
    assert parts["adapt"]["max_abs_diff"] < 1e-3  # the fused scores equal the original loop's
    assert parts["eval"]["shape"] == [300, 1500, 32]


def test_gpu_check_without_a_gpu_says_so(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "no CUDA device" in proc.stderr
