"""``xmodal demo``: the main job on the embedded emoji dataset, offline.

Extracts (and caches) frozen image features, trains on the emoji train split, evaluates
on the test split with English labels as captions, writes ``OUT/metrics.json`` and a
report (HTML + PNG: recall table, recall@K curve, text queries with their top-5 images),
and shows a few text->image searches.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .utils import atomic_write_json

def packaged_config(name: str) -> Path:
    path = Path(__file__).parent / "configs" / name
    if not path.exists():
        from .errors import ConfigError

        raise ConfigError(f"no packaged config {name!r} (looked in {path.parent})")
    return path


def _image_of(ds, i: int) -> Any:
    pixels = ds.meta.get("pixels")
    if pixels is not None:
        return pixels[int(i)]
    from .data.images import open_image

    return open_image(ds.image_path(int(i)))


def query_examples(ds, image_emb: torch.Tensor, text_emb: torch.Tensor, text_idx: list[int], k: int = 5) -> list[dict]:
    """Top-k images for some texts of the split, with correctness from the ground truth."""
    out = []
    scores = text_emb[text_idx] @ image_emb.T  # (Q, N)
    top = torch.topk(scores, min(k, scores.shape[1]), dim=1)
    for row, t in enumerate(text_idx):
        pos = set(ds.gt.images_of(t).tolist())
        out.append({"text": ds.captions[t], "results": [
            {"image": _image_of(ds, int(i)), "score": float(s), "correct": int(i) in pos,
             "label": ds.image_ids[int(i)]}
            for s, i in zip(top.values[row].tolist(), top.indices[row].tolist())]})
    return out


def write_run_report(out_dir: str | Path, run: Any, split: Any, result: dict, *, title: str,
                     extra: dict | None = None, num_queries: int = 12, seed: int = 0) -> dict:
    """metrics.json + report.html + PNGs for an evaluated split."""
    from .eval.report import write_report

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out_dir / "metrics.json", result["metrics"])
    queries = None
    ds = split.dataset
    has_pixels = ds.meta.get("pixels") is not None or ds.image_paths is not None
    if "image_emb" in result and has_pixels:
        rng = np.random.default_rng(seed)
        pick = sorted(rng.choice(ds.num_texts, size=min(num_queries, ds.num_texts), replace=False).tolist())
        queries = query_examples(ds, result["image_emb"], result["text_emb"], pick)
    files = write_report(out_dir, metrics=result["metrics"], i2t_ranks=result.get("i2t_ranks"),
                         t2i_ranks=result.get("t2i_ranks"), queries=queries, title=title, extra=extra)
    return {"metrics": out_dir / "metrics.json", **files}


def run_demo(out: str | Path = "runs/demo", *, quick: bool = False, overrides: tuple[str, ...] = (),
             progress: bool = True, console: Any = None) -> dict:
    from rich.console import Console

    from .config import load_config
    from .eval.encode import evaluate_split
    from .eval.report import print_metrics
    from .models import load
    from .models.run import latest_checkpoint
    from .train.loop import train
    from .data.pipeline import prepare_split

    console = console or Console(stderr=True)
    t0 = time.perf_counter()
    out = Path(out)
    cfg = load_config(packaged_config("emoji/demo_quick.yaml" if quick else "emoji/demo.yaml"), list(overrides))
    run_dir = out / "run"
    summary_path = run_dir / "summary.json"
    done = False
    if summary_path.exists() and latest_checkpoint(run_dir) is not None:
        saved = (run_dir / "config.yaml").read_text() if (run_dir / "config.yaml").exists() else ""
        import yaml

        from . import config as C

        done = saved == yaml.safe_dump(C.to_dict(cfg), sort_keys=False) and \
            json.loads(summary_path.read_text()).get("steps") == cfg.train.steps
    if done:
        console.print(f"reusing finished run {run_dir}")
    else:
        train(cfg, run_dir, resume=latest_checkpoint(run_dir) is not None if run_dir.exists() else False,
              progress=progress, console=console)
    run = load(run_dir)
    model = run.model
    test = prepare_split(cfg, model, cfg.data.test_split, cfg.data.eval_lang, progress=progress)
    res = evaluate_split(model, test, protocol="full", block_size=cfg.eval.block_size, return_ranks=True)
    elapsed = time.perf_counter() - t0
    files = write_run_report(out, run, test, res, title="xmodal demo: emoji test split, English labels",
                             extra={"config": cfg.name, "train captions": cfg.data.train_lang,
                                    "test": test.dataset.summary(), "total seconds": f"{elapsed:.0f}"})
    print_metrics(res["metrics"], console=console, title=f"emoji test split ({test.dataset.num_texts} English "
                                                            f"captions, {test.dataset.num_images} images)")
    console.print("[bold]text -> image searches[/] (test captions against the 500 test images; "
                  "[green]+[/] = a correct image)")
    ds = test.dataset
    describe = _describer(ds)
    rng = np.random.default_rng(1)
    picks = rng.choice(ds.num_texts, size=min(6, ds.num_texts), replace=False).tolist()
    top = torch.topk(res["text_emb"][picks] @ res["image_emb"].T, 3, dim=1)
    for t, idx, sc in zip(picks, top.indices.tolist(), top.values.tolist()):
        pos = set(ds.gt.images_of(t).tolist())
        hits = "  ".join(f"{'[green]+[/]' if i in pos else '-'} {describe(i)} {s:.2f}" for i, s in zip(idx, sc))
        console.print(f"  {ds.captions[t]!r:34} -> {hits}")
    console.print(f"metrics: {files['metrics']}")
    for key in ("html", "recall_curve", "queries"):
        if key in files:
            console.print(f"report:  {files[key]}")
    console.print(f"run:     {run_dir}  (logs: {run_dir / 'metrics.jsonl'})")
    console.print(f"done in {elapsed:.0f} s")
    return {"metrics": res["metrics"], "files": files, "seconds": elapsed}


def _describer(ds):
    """Readable names for images: emoji character + English label for the emoji data, else ids."""
    concepts, chars = ds.meta.get("concepts"), ds.meta.get("emoji")
    if not concepts or not chars:
        return lambda i: ds.image_ids[int(i)]
    char = dict(zip(concepts, chars))
    label = {tid.split("/")[0]: cap for tid, cap in zip(ds.text_ids, ds.captions) if tid.endswith("/label")}

    def describe(i: int) -> str:
        style, _, hexcode = ds.image_ids[int(i)].partition("/")
        return f"{char.get(hexcode, '')} {label.get(hexcode, hexcode)} ({style})"

    return describe
