"""``xmodal demo --quick`` end to end, and the run report it shares with ``xmodal eval --report``."""
from __future__ import annotations

import dataclasses
import json
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from train_fixtures import write_synthetic_precomp, write_tiny_config
from xmodal.cli import main
from xmodal.data.base import CrossModalDataset, GroundTruth
from xmodal.demo import image_query_examples, query_examples, write_run_report

KEYS = "i2t_r1 i2t_r5 i2t_r10 i2t_medr i2t_meanr t2i_r1 t2i_r5 t2i_r10 t2i_medr t2i_meanr rsum".split()
SECTIONS = ["summary", "metrics", "training-curves", "recall-k", "text-image-examples", "image-text-examples",
            "run-information"]


def _sections(page: str) -> list[str]:
    return re.findall(r'<section id="([^"]+)">', page)


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
    for name in ("report.html", "training_curves.png", "recall_curve.png", "queries.png"):
        assert (out / name).stat().st_size > 1000
        assert f"report:  {out / name}" in proc.stderr
    page = (out / "report.html").read_text(encoding="utf-8")
    assert _sections(page) == SECTIONS
    assert "efficientnet_lite0" in page and "siglip" in page and "150 of 150" in page
    assert "first correct image at rank" in page and "first correct caption at rank" in page
    assert "text -> image searches" in proc.stderr and "R@1" in proc.stderr
    # a second call reuses the finished run instead of training again
    again = subprocess.run([sys.executable, "-m", "xmodal", "demo", "--quick", "--out", str(out), "--no-progress"],
                           capture_output=True, text=True, timeout=900)
    assert again.returncode == 0 and "reusing finished run" in again.stderr


# ----------------------------------------------------------------- a tiny run (features, no images)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("report_run")
    data = write_synthetic_precomp(root / "data")
    cfg = write_tiny_config(root / "tiny.yaml", data, steps=60)
    assert main(["train", str(cfg), "--out", str(root / "run"), "--no-progress"]) == 0
    return root / "run"


def test_eval_report_has_run_information_and_says_where_it_went(tiny_run, tmp_path, capsys):
    rep = tmp_path / "rep"
    capsys.readouterr()
    assert main(["eval", str(tiny_run), "--report", str(rep)]) == 0
    out, err = capsys.readouterr()
    assert f"report: {rep / 'report.html'}" in err and str(rep / "training_curves.png") in err
    assert "R@1" in out  # the table still goes to stdout
    page = (rep / "report.html").read_text(encoding="utf-8")
    assert _sections(page) == SECTIONS
    # the config summary: towers, loss, steps, best step, embedding size
    best = json.loads((tiny_run / "best" / "state.json").read_text())
    for needle in ("features (in_dim=16, out_dim=32, pooling=mean), trained", "bigru", "hinge",
                   "60 of 60", f"<td>best step</td><td>{best['step']} (validation rsum",
                   "<td>embedding size</td><td>32</td>", str(tiny_run)):
        assert needle in page, needle
    assert "tokenizer_json=\u2026" in page  # long arguments are not dumped into the summary
    assert "<h3>Test metrics</h3>" in page and "<h3>Validation metrics</h3>" in page
    assert f">{best['metrics']['rsum']:.1f}<" in page
    assert 'alt="training loss and validation rsum per step"' in page
    # precomp features have no pixels: examples show image ids, and there is no picture grid
    assert '<div class="tile">' in page and not (rep / "queries.png").exists()
    assert page.count('class="query"') == 12 and page.count('class="query i2t"') == 12
    assert page.count("first correct image at rank") == 12 and page.count("first correct caption at rank") == 12
    # --json keeps stdout to the one JSON line; the report's path goes to stderr
    assert main(["eval", str(tiny_run), "--report", str(rep), "--json"]) == 0
    out, err = capsys.readouterr()
    assert list(json.loads(out)) == KEYS and len(out.strip().splitlines()) == 1
    assert f"report: {rep / 'report.html'}" in err


def test_report_of_a_run_with_pieces_missing(tiny_run, tmp_path):
    """No metrics.jsonl / summary.json (an old or copied run), and a config-only model (no folder)."""
    from xmodal.data.pipeline import prepare_split
    from xmodal.eval.encode import evaluate_split
    from xmodal.models import load

    bare = tmp_path / "bare"
    shutil.copytree(tiny_run, bare)
    (bare / "metrics.jsonl").unlink()
    (bare / "summary.json").unlink()
    run = load(bare)
    split = prepare_split(run.config, run.model, "test", "en", progress=False)
    res = evaluate_split(run.model, split, return_ranks=True)
    files = write_run_report(tmp_path / "rep", run, split, res, title="bare")
    page = files["html"].read_text(encoding="utf-8")
    assert "No training log (metrics.jsonl)" in page and "training_curves" not in files
    assert "the best checkpoint (from best/state.json)" in page  # validation metrics still shown
    assert "60 configured (no summary.json)" in page

    as_config = dataclasses.replace(run, path=tmp_path / "ensemble.yaml", step=None, checkpoint=None)
    files = write_run_report(tmp_path / "rep2", as_config, split, {"metrics": res["metrics"]}, title="config")
    page = files["html"].read_text(encoding="utf-8")
    assert _sections(page) == ["summary", "metrics", "run-information"]
    assert "none (a config)" in page and "Validation metrics" not in page


def _toy_split(pixels: bool) -> CrossModalDataset:
    """6 images, 3 captions: caption t belongs to image 2t (and caption 2 to images 4 and 5 as well)."""
    gt = GroundTruth.from_map([[0], [2], [4, 5]], 6)
    meta = {"pixels": np.zeros((6, 8, 8, 3), np.uint8)} if pixels else {}
    return CrossModalDataset("toy", "test", [f"im{i}" for i in range(6)], ["t0", "t1", "t2"],
                             ["zero", "one", "two"], gt, meta=meta)


def test_examples_give_the_rank_of_the_first_correct_item_when_it_missed():
    ds = _toy_split(pixels=True)
    img = torch.eye(6)
    # caption 0: its image 0 scores lowest of all (rank 6); caption 1: image 2 first; caption 2: image 5
    # is 4th, image 4 last -> the first correct one is at rank 4
    txt = torch.tensor([[0.0, 6, 5, 4, 3, 2], [1, 0, 9, 0, 0, 0], [6, 5, 1, 4, 0.5, 2]])
    t2i = query_examples(ds, img, txt, [0, 1, 2], k=3)
    assert [q["first_correct_rank"] for q in t2i] == [6, 1, 4]
    assert all(q["candidates"] == 6 for q in t2i)
    assert not any(r["correct"] for r in t2i[0]["results"]) and t2i[0]["first_correct"]["label"] == "im0"
    assert t2i[0]["first_correct"]["score"] == 0.0 and t2i[0]["first_correct"]["image"] is not None
    assert "first_correct" not in t2i[1] and t2i[1]["results"][0]["correct"]
    assert t2i[2]["first_correct"]["label"] == "im5"
    assert [r["label"] for r in t2i[2]["results"]] == ["im0", "im1", "im3"]
    # image -> text: image 4's only caption is caption 2, ranked 2nd of 3
    i2t = image_query_examples(_toy_split(pixels=False), img, txt, [4, 0], k=1)
    assert i2t[0]["first_correct_rank"] == 2 and i2t[0]["candidates"] == 3
    assert i2t[0]["first_correct"] == {"text": "two", "score": 0.5} and i2t[0]["image"] is None
    assert i2t[1]["first_correct_rank"] == 3  # image 0: caption 0 scores 0, below 1 and 6


def test_eval_and_evaluate_embeddings_print_the_same_table(tiny_run, tmp_path, capsys):
    from xmodal.data.pipeline import prepare_split
    from xmodal.eval.encode import evaluate_split
    from xmodal.models import load

    capsys.readouterr()
    assert main(["eval", str(tiny_run)]) == 0
    eval_out = capsys.readouterr().out
    run = load(tiny_run)
    split = prepare_split(run.config, run.model, "test", "en", progress=False)
    res = evaluate_split(run.model, split, return_ranks=True)
    np.save(tmp_path / "img.npy", res["image_emb"].numpy())
    np.save(tmp_path / "txt.npy", res["text_emb"].numpy())
    gt = split.dataset.gt
    (tmp_path / "map.json").write_text(json.dumps([gt.images_of(t).tolist() for t in range(gt.num_texts)]))
    assert main(["evaluate-embeddings", str(tmp_path / "img.npy"), str(tmp_path / "txt.npy"),
                 "--text-to-image", str(tmp_path / "map.json")]) == 0
    emb_out = capsys.readouterr().out

    def table(text: str) -> list[str]:  # from the top border on: the titles differ
        lines = text.splitlines()
        return lines[next(i for i, line in enumerate(lines) if line.lstrip().startswith("\u250f")):]

    assert table(eval_out) == table(emb_out)
    assert any("i2t (image \u2192 text)" in line for line in table(emb_out))
    assert "rsum =" in table(emb_out)[-1]
