"""scripts/screenshots.py: its --help, and its report shot on a tiny report in headless Chromium."""
from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from xmodal.eval.report import METRIC_KEYS, write_report

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "screenshots.py"


def _chromium() -> str:
    """The system Chromium, found as the script finds it; skip (with the reason) when absent."""
    if importlib.util.find_spec("playwright") is None:
        pytest.skip("playwright (python) is not installed")
    for cand in (shutil.which("chromium"), shutil.which("chromium-browser"), "/usr/bin/chromium"):
        if cand and Path(cand).is_file():
            return cand
    pytest.skip("no chromium on PATH or at /usr/bin/chromium (Debian: apt-get install -y chromium)")


def test_help():
    proc = subprocess.run([sys.executable, str(SCRIPT), "--help"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    for option in ("--out", "--docs", "--only", "--query", "--port", "--chromium"):
        assert option in proc.stdout
    assert "report.png" in proc.stdout and "search_page.png" in proc.stdout


def test_report_shot_of_a_tiny_report(tmp_path):
    chromium = _chromium()
    rng = np.random.default_rng(0)
    results = [{"image": rng.integers(0, 256, (24, 24, 3), dtype=np.uint8), "score": 0.5, "correct": j == 0,
                "label": f"img {j}"} for j in range(3)]
    write_report(tmp_path / "demo", metrics={k: 12.5 for k in METRIC_KEYS}, i2t_ranks=None,
                 t2i_ranks=np.array([0, 4, 9]), queries=[{"text": "a tiny query", "results": results}],
                 summary={"model": "tiny"}, training_log=[])
    docs = tmp_path / "shots"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--only", "report", "--out", str(tmp_path / "demo"),
                           "--docs", str(docs), "--chromium", chromium],
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "reusing" in proc.stderr  # an --out folder with a report: no demo run
    assert not (docs / "search_page.png").exists()
    with Image.open(docs / "report.png") as im:
        assert im.width == 1200 and 600 < im.height <= 4000
        px = np.asarray(im.convert("L"), dtype=np.float64)
    assert px.std() > 10  # text, tables and pictures, not a blank page
