"""Tests for the evaluation report writer (xmodal.eval.report)."""
from __future__ import annotations

import base64
import io
import json
import re

import numpy as np
import pytest
from PIL import Image
from rich.console import Console

from xmodal.eval.report import (
    METRIC_KEYS,
    curve_ks,
    format_table,
    metrics_markdown,
    print_metrics,
    read_metrics_log,
    recall_curve,
    write_report,
)

EVIL = "<script>alert(1)</script>"


def _metrics(i2t: np.ndarray, t2i: np.ndarray) -> dict[str, float]:
    """Metrics computed the field's way from 0-based ranks (medR/meanR are 1-based)."""
    m: dict[str, float] = {}
    for d, r in (("i2t", i2t), ("t2i", t2i)):
        for k in (1, 5, 10):
            m[f"{d}_r{k}"] = 100.0 * float(np.mean(r < k))
        m[f"{d}_medr"] = float(np.floor(np.median(r)) + 1)
        m[f"{d}_meanr"] = float(r.mean() + 1)
    m["rsum"] = sum(m[f"{d}_r{k}"] for d in ("i2t", "t2i") for k in (1, 5, 10))
    return m


def _queries(n: int, rng: np.random.Generator) -> list[dict]:
    out = []
    for i in range(n):
        results = []
        for j in range(6):  # one more than shown: the writer must keep the top 5
            h, w = (int(x) for x in rng.integers(20, 200, 2))
            arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            image = Image.fromarray(arr) if j % 2 else arr
            results.append({"image": image, "score": 0.9 - 0.1 * j, "correct": j == i % 5,
                            "label": f"img_{i}_{j}.jpg"})
        text = EVIL if i == 0 else f"query {i}: a $x$ caption " + "with many words " * (i % 4)
        out.append({"text": text, "results": results})
    return out


@pytest.fixture(scope="module")
def ranks() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    return (np.floor(rng.exponential(5, 300)).astype(np.int64),
            np.floor(rng.exponential(12, 1500)).astype(np.int64))


def _decode_png(data: bytes) -> Image.Image:
    img = Image.open(io.BytesIO(data))
    img.load()
    return img


# ----------------------------------------------------------------- recall curve


def test_recall_curve_matches_brute_force() -> None:
    rng = np.random.default_rng(1)
    ranks = rng.integers(0, 80, 257)
    ks = np.arange(1, 120)
    expected = np.array([100.0 * sum(1 for r in ranks if r < k) / len(ranks) for k in ks])
    np.testing.assert_allclose(recall_curve(ranks, ks), expected)


def test_recall_curve_edges() -> None:
    ranks = np.array([0, 0, 1, 4, 9, np.inf, np.nan])  # inf/nan: the query was never retrieved
    got = recall_curve(ranks, [1, 2, 5, 10, 1000])
    np.testing.assert_allclose(got, 100.0 * np.array([2, 3, 4, 5, 5]) / 7)
    # Monotone, ends at 100% once K passes every rank.
    full = recall_curve(np.array([3, 7, 2]), np.arange(1, 20))
    assert np.all(np.diff(full) >= 0) and full[-1] == 100.0 and full[0] == 0.0
    with pytest.raises(ValueError, match="0-based"):
        recall_curve(np.array([-1, 2]), [1])
    with pytest.raises(ValueError, match="empty"):
        recall_curve(np.array([]), [1])


def test_curve_ks_grid() -> None:
    np.testing.assert_array_equal(curve_ks(np.array([0.0, 3.0])), np.arange(1, 51))
    np.testing.assert_array_equal(curve_ks(np.array([0.0, 99.0]), None), np.arange(1, 101))
    big = curve_ks(np.array([0.0, 24999.0]))  # geometric grid, still covers 1/5/10 and the end
    assert len(big) <= 2003 and big[-1] == 25000 and {1, 5, 10} <= set(big.tolist())
    assert np.all(np.diff(big) > 0)


# ----------------------------------------------------------------- terminal / markdown


def test_print_metrics_and_markdown(ranks) -> None:
    m = _metrics(*ranks)
    console = Console(file=io.StringIO(), width=120, color_system=None)
    print_metrics(m, console=console, title="COCO 5K")
    text = console.file.getvalue()
    for key in METRIC_KEYS:
        if key.endswith("medr"):
            assert str(int(m[key])) in text
        else:
            assert f"{m[key]:.1f}" in text, key
    assert "COCO 5K" in text and "i2t" in text and "t2i" in text and "rsum" in text

    table = format_table(m)
    assert [c.header for c in table.columns][1:] == ["R@1", "R@5", "R@10", "medR", "meanR"]
    assert table.row_count == 2

    md = metrics_markdown(m)
    lines = md.strip().splitlines()
    assert lines[0].startswith("| | R@1 | R@5 | R@10 | medR | meanR |")
    assert lines[2].startswith("| i2t") and lines[3].startswith("| t2i")
    assert f"{m['i2t_r1']:.1f}" in lines[2] and f"{m['t2i_r10']:.1f}" in lines[3]
    assert f"rsum: **{m['rsum']:.1f}**" in md


def test_missing_and_nan_metrics_render() -> None:
    md = metrics_markdown({"i2t_r1": float("nan"), "t2i_r1": 12.345})
    assert "12.3" in md and "nan" not in md.lower()


# ----------------------------------------------------------------- full report


def test_write_report_full(tmp_path, ranks) -> None:
    i2t, t2i = ranks
    m = _metrics(i2t, t2i)
    queries = _queries(30, np.random.default_rng(2))
    extra = {"model": "vse_gpo", "config": {"lr": 2e-4, "text": {"name": EVIL}}, "eval_s": 1.5}
    out = write_report(tmp_path / "rep", metrics=m, i2t_ranks=i2t, t2i_ranks=t2i,
                       queries=queries, title=f"Run {EVIL}", extra=extra)
    assert set(out) == {"html", "recall_curve", "queries"}
    assert not (tmp_path / "rep" / "metrics.json").exists()
    assert sorted(p.name for p in (tmp_path / "rep").iterdir()) == [
        "queries.png", "recall_curve.png", "report.html"]  # no temp files left behind

    page = out["html"].read_text(encoding="utf-8")
    # Every table number is on the page.
    for key in ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "rsum",
                "i2t_meanr", "t2i_meanr"):
        assert f">{m[key]:.1f}<" in page, key
    assert f">{int(m['t2i_medr'])}<" in page
    # User text is escaped everywhere (caption, title, extra), and the page runs no script at all.
    assert "<script" not in page.lower()
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "config.text.name" in page and "config.lr" in page
    # Self-contained: every src is a data URI, no external stylesheet or script.
    srcs = re.findall(r'src="([^"]*)"', page)
    assert srcs and all(s.startswith("data:image/") for s in srcs)
    assert "<link" not in page and "http://" not in page and "https://" not in page
    # Capped at 24 queries x 5 thumbnails, plus the curve.
    assert page.count('class="query"') == 24 and "24 of 30" in page
    assert page.count("data:image/jpeg;base64,") == 24 * 5
    assert page.count('class="ok"') == 24 and page.count('class="bad"') == 24 * 4
    assert len(page) < 2_000_000

    # The embedded curve is the file on disk, and it decodes.
    b64 = re.search(r'data:image/png;base64,([A-Za-z0-9+/=]+)', page).group(1)
    assert base64.b64decode(b64) == out["recall_curve"].read_bytes()
    # Thumbnails are 96 px squares.
    jpg = re.search(r'data:image/jpeg;base64,([A-Za-z0-9+/=]+)', page).group(1)
    assert Image.open(io.BytesIO(base64.b64decode(jpg))).size == (96, 96)

    curve = _decode_png(out["recall_curve"].read_bytes())
    assert 500 <= curve.width <= 2000 and 300 <= curve.height <= 1500
    grid = _decode_png(out["queries"].read_bytes())
    assert 600 <= grid.width <= 2500 and grid.height > 24 * 100  # one row per shown query
    # The grid really draws the red/green borders.
    px = np.asarray(grid.convert("RGB")).reshape(-1, 3).astype(int)
    green = np.all(np.abs(px - [0x1A, 0x98, 0x50]) < 12, axis=1).sum()
    red = np.all(np.abs(px - [0xD7, 0x30, 0x27]) < 12, axis=1).sum()
    assert green > 1000 and red > 4 * 1000


def test_write_report_minimal(tmp_path) -> None:
    m = {k: 10.0 for k in METRIC_KEYS}
    (tmp_path / "queries.png").write_bytes(b"from an earlier run")  # must not outlive its report
    out = write_report(tmp_path, metrics=m, i2t_ranks=None, t2i_ranks=None, queries=None)
    assert set(out) == {"html"}
    assert not (tmp_path / "recall_curve.png").exists() and not (tmp_path / "queries.png").exists()
    page = out["html"].read_text(encoding="utf-8")
    assert "xmodal evaluation" in page and ">10.0<" in page and "<img" not in page


def test_write_report_one_direction_and_odd_images(tmp_path) -> None:
    """Only t2i ranks; grayscale, float, RGBA and broken images; fewer than 5 results."""
    t2i = np.array([0, 3, 7, 120, np.inf])
    queries = [{"text": "dollar $ signs and \\frac{a}{b} must not break the plot", "results": [
        {"image": np.zeros((40, 30), np.uint8), "score": 0.5, "correct": True},
        {"image": np.random.default_rng(0).random((50, 50, 3)), "score": 0.4, "correct": False},
        {"image": Image.new("RGBA", (300, 100), (0, 0, 255, 128)), "score": 0.3, "correct": False},
        {"image": np.zeros((5, 5, 7), np.uint8), "score": 0.2, "correct": False},
    ]}]
    out = write_report(tmp_path, metrics={}, i2t_ranks=None, t2i_ranks=t2i, queries=queries)
    assert set(out) == {"html", "recall_curve", "queries"}
    _decode_png(out["recall_curve"].read_bytes())
    _decode_png(out["queries"].read_bytes())
    page = out["html"].read_text(encoding="utf-8")
    assert page.count("data:image/jpeg;base64,") == 4


def test_bad_ranks_raise(tmp_path) -> None:
    with pytest.raises(ValueError, match="i2t_ranks"):
        write_report(tmp_path, metrics={}, i2t_ranks=np.array([-2, 1]), t2i_ranks=None,
                     queries=None)


# ----------------------------------------------------------------- the run report's sections


def _log_rows() -> list[dict]:
    rows = [{"step": s, "kind": "train", "loss": 5.0 - s / 100, "lr": 1e-3} for s in (20, 40, 60, 80)]
    rows += [{"step": s, "kind": "val", **_metrics(np.array([0, 3, 7]), np.array([1, 2, 20])),
              "rsum": r} for s, r in ((40, 150.0), (80, 180.5))]
    return rows


def test_read_metrics_log_dedupes_resumed_steps_and_skips_bad_lines(tmp_path) -> None:
    path = tmp_path / "metrics.jsonl"
    rows = _log_rows()
    lines = [json.dumps(r) for r in rows]
    # a resumed run logs step 60 again (the later value wins); a crash left half a line
    lines.insert(3, json.dumps({"step": 60, "kind": "train", "loss": 9.0}))
    lines += ['{"step": 100, "kind": "tra', "", json.dumps({"kind": "train"}),
              json.dumps({"step": 60, "kind": "train", "loss": 4.25})]
    path.write_text("\n".join(lines) + "\n")
    got = read_metrics_log(path)
    assert sorted((r["step"], r["kind"]) for r in got) == [(20, "train"), (40, "train"), (40, "val"),
                                                           (60, "train"), (80, "train"), (80, "val")]
    assert [r["step"] for r in got] == sorted(r["step"] for r in got)
    assert next(r for r in got if r["step"] == 60)["loss"] == 4.25
    assert read_metrics_log(tmp_path / "missing.jsonl") == []


def _grid(rng: np.random.Generator) -> np.ndarray:
    return rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)


def _run_report_inputs(rng: np.random.Generator) -> dict:
    """Everything a run report shows; query 0 and image query 0 miss (correct item far down)."""
    hit = {"text": "a red heart", "first_correct_rank": 2, "candidates": 500, "results": [
        {"image": _grid(rng), "score": 0.9 - 0.1 * j, "correct": j == 1, "label": f"img{j}"} for j in range(5)]}
    miss = {"text": f"lion {EVIL}", "first_correct_rank": 37, "candidates": 500,
            "first_correct": {"image": _grid(rng), "label": "the lion image", "score": 0.41},
            "results": [{"image": _grid(rng), "score": 0.8 - 0.01 * j, "correct": False,
                         "label": f"kangaroo {j}"} for j in range(5)]}
    img_miss = {"image": _grid(rng), "label": "moose (google)", "first_correct_rank": 12, "candidates": 80,
                "first_correct": {"text": "a moose", "score": 0.5},
                "results": [{"text": f"caption {j} {EVIL}", "score": 0.7, "correct": False} for j in range(5)]}
    img_hit = {"image": None, "label": "features_only_17", "first_correct_rank": 1, "candidates": 80,
               "results": [{"text": "the right one", "score": 0.9, "correct": True}]}
    m = _metrics(np.array([0, 1, 4, 30]), np.array([0, 2, 9, 36]))
    return {"metrics": m, "queries": [miss, hit], "image_queries": [img_miss, img_hit],
            "summary": {"model": "dual_encoder (embedding scorer)", "image tower": "efficientnet_lite0",
                        "text tower": f"hf {EVIL}", "embedding size": 256, "loss": "siglip",
                        "steps": "80 of 80", "best step": "80 (validation rsum 180.5)"},
            "config": {"model": {"embed_dim": 256}, "loss": {"name": "siglip"}},
            "training_log": _log_rows(), "best_step": 80, "val_metrics": {**m, "rsum": 180.5},
            "metrics_heading": "Test metrics", "val_note": "val split at step 80"}


def test_run_report_has_every_section(tmp_path) -> None:
    inputs = _run_report_inputs(np.random.default_rng(3))
    out = write_report(tmp_path, i2t_ranks=np.array([0, 1, 4, 30]), t2i_ranks=np.array([0, 2, 9, 36]),
                       title="run", extra={"run": "/runs/x"}, **inputs)
    assert set(out) == {"html", "training_curves", "recall_curve", "queries"}
    page = out["html"].read_text(encoding="utf-8")
    ids = re.findall(r'<section id="([^"]+)">', page)
    assert ids == ["summary", "metrics", "training-curves", "recall-k", "text-image-examples",
                   "image-text-examples", "run-information"]
    # config summary: towers, loss, steps, best step, embedding size; the full config folded below
    for needle in ("image tower", "text tower", "embedding size", ">256<", "siglip", "best step", "80 of 80",
                   "<details><summary>Full configuration", "model.embed_dim"):
        assert needle in page, needle
    # test and validation metrics, both as tables
    assert "<h3>Test metrics</h3>" in page and "<h3>Validation metrics</h3>" in page
    assert page.count('<table class="metrics">') == 2 and ">180.5<" in page
    # the training curves are embedded and are the file on disk
    curves = _decode_png(out["training_curves"].read_bytes())
    assert curves.width > 800 and curves.height > 300
    b64 = re.search(r'alt="training loss and validation rsum per step" src="data:image/png;base64,([^"]+)"',
                    page).group(1)
    assert base64.b64decode(b64) == out["training_curves"].read_bytes()
    # a text query that missed says where its correct image is, and shows it
    assert "not in the top 5: first correct image at rank 37 of 500" in page
    assert "the lion image, score 0.410" in page
    assert "first correct image at rank 2 of 500" in page  # a hit says it too, without alarm
    # an image query that missed says where its first correct caption is
    assert "not in the top 5: first correct caption at rank 12 of 80" in page and "\u201ca moose\u201d" in page
    assert "first correct caption at rank 1 of 80" in page
    assert '<div class="tile">features_only_17</div>' in page  # no pixels: the label stands in
    # user text escaped everywhere (captions in both directions, the summary), self-contained
    assert "<script" not in page.lower() and page.count("&lt;script&gt;alert(1)&lt;/script&gt;") >= 7
    srcs = re.findall(r'src="([^"]*)"', page)
    assert all(s.startswith("data:image/") for s in srcs)
    assert "http://" not in page and "https://" not in page and "<link" not in page


def test_run_report_with_missing_pieces(tmp_path) -> None:
    """An empty training log says so; results without images get labels and no queries.png."""
    (tmp_path / "training_curves.png").write_bytes(b"stale")
    queries = [{"text": "q", "first_correct_rank": float("inf"), "candidates": 3,
                "results": [{"score": 0.5, "correct": False, "label": "img_a"}]}]
    out = write_report(tmp_path, metrics={}, i2t_ranks=None, t2i_ranks=None, queries=queries,
                       summary={"model": "adapt_ens", "training": "none"}, training_log=[])
    assert set(out) == {"html"}
    assert not (tmp_path / "training_curves.png").exists() and not (tmp_path / "queries.png").exists()
    page = out["html"].read_text(encoding="utf-8")
    assert "No training log (metrics.jsonl)" in page and "Validation metrics" not in page
    assert '<div class="tile">img_a</div>' in page and "no correct image among the candidates" in page
    assert "<img" not in page
    # only validation rows, no training loss: one panel
    out = write_report(tmp_path / "val_only", metrics={}, i2t_ranks=None, t2i_ranks=None, queries=None,
                       training_log=[r for r in _log_rows() if r["kind"] == "val"], best_step=None)
    assert "training_curves" in out
