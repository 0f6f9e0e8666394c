"""Smoke run of ``xmodal demo --quick``: the README's main command, end to end, offline."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

KEYS = "i2t_r1 i2t_r5 i2t_r10 i2t_medr i2t_meanr t2i_r1 t2i_r5 t2i_r10 t2i_medr t2i_meanr rsum".split()


@pytest.mark.slow
def test_demo_quick(tmp_path):
    out = tmp_path / "demo"
    proc = subprocess.run([sys.executable, "-m", "xmodal", "demo", "--quick", "--out", str(out), "--no-progress"],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert list(metrics) == KEYS
    # 250 test concepts x 2 images: chance t2i R@1 is 0.4 %; even the smoke run must learn
    assert metrics["t2i_r1"] > 10
    for name in ("report.html", "recall_curve.png", "queries.png"):
        assert (out / name).stat().st_size > 1000
    assert "text -> image searches" in proc.stderr and "R@1" in proc.stderr
    # a second call reuses the finished run instead of training again
    again = subprocess.run([sys.executable, "-m", "xmodal", "demo", "--quick", "--out", str(out), "--no-progress"],
                           capture_output=True, text=True, timeout=900)
    assert again.returncode == 0 and "reusing finished run" in again.stderr
