"""``xmodal demo``: the main job on the embedded emoji dataset, offline.

Extracts (and caches) frozen image features, trains on the emoji train split, evaluates
on the test split with English labels as captions, writes ``OUT/metrics.json`` and a
report (:func:`write_run_report`, also behind ``xmodal eval --report``: run summary, test and
validation metrics, training curves, Recall@K curve, text->image and image->text examples),
and shows a few text->image searches.
"""
from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import config as C
from .utils import atomic_write_json

log = logging.getLogger(__name__)


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
    if ds.image_paths is None or ds.image_paths[int(i)] is None:
        return None  # a dataset of features: the report shows the image's label instead
    from .data.images import open_image
    from .errors import DataError

    try:
        return open_image(ds.image_path(int(i)))
    except DataError as exc:  # a missing or broken file costs its thumbnail, not the report
        log.warning("report: no thumbnail for %s (%s)", ds.image_ids[int(i)], exc)
        return None


def _ranking(row: torch.Tensor, positives: Any, k: int) -> tuple[list[int], list[float], float, int | None]:
    """The top ``k`` of one score row, the 1-based rank of its first positive in that same order
    (inf when it has none) and that positive's index. The sort is stable, so the shown list and
    the rank agree."""
    order = torch.sort(row, descending=True, stable=True).indices  # (N,)
    top = order[:k]
    positives = [int(p) for p in positives]
    if not positives:
        return top.tolist(), row[top].tolist(), math.inf, None
    is_pos = torch.zeros(row.shape[0], dtype=torch.bool, device=row.device)
    is_pos[positives] = True
    first = int(torch.nonzero(is_pos[order])[0, 0])
    return top.tolist(), row[top].tolist(), float(first + 1), int(order[first])


def query_examples(ds, image_emb: torch.Tensor, text_emb: torch.Tensor, text_idx: list[int], k: int = 5,
                   describe: Any = None) -> list[dict]:
    """Text -> image examples: top-k images for some texts of the split, correctness from the ground
    truth, the rank of each query's first correct image (``first_correct_rank``, 1-based) and,
    when that is below the top k, the image itself (``first_correct``)."""
    describe = describe or (lambda i: ds.image_ids[int(i)])
    out = []
    scores = text_emb[text_idx].float() @ image_emb.float().T  # (Q, N)
    for row, t in enumerate(text_idx):
        pos = ds.gt.images_of(t).tolist()
        top, vals, first, at = _ranking(scores[row], pos, k)
        q = {"text": ds.captions[t], "first_correct_rank": first, "candidates": ds.num_images,
             "results": [{"image": _image_of(ds, i), "score": float(s), "correct": i in pos,
                          "label": describe(i)} for i, s in zip(top, vals)]}
        if at is not None and first > k:
            q["first_correct"] = {"image": _image_of(ds, at), "label": describe(at),
                                  "score": float(scores[row, at])}
        out.append(q)
    return out


def image_query_examples(ds, image_emb: torch.Tensor, text_emb: torch.Tensor, image_idx: list[int],
                         k: int = 5, describe: Any = None) -> list[dict]:
    """Image -> text examples: top-k captions for some images of the split, as :func:`query_examples`."""
    describe = describe or (lambda i: ds.image_ids[int(i)])
    texts_of = ds.gt.transpose()  # image -> texts
    out = []
    scores = image_emb[image_idx].float() @ text_emb.float().T  # (Q, M)
    for row, i in enumerate(image_idx):
        pos = texts_of.images_of(i).tolist()
        top, vals, first, at = _ranking(scores[row], pos, k)
        q = {"image": _image_of(ds, i), "label": describe(i), "first_correct_rank": first,
             "candidates": ds.num_texts,
             "results": [{"text": ds.captions[t], "score": float(s), "correct": t in pos}
                         for t, s in zip(top, vals)]}
        if at is not None and first > k:
            q["first_correct"] = {"text": ds.captions[at], "score": float(scores[row, at])}
        out.append(q)
    return out


def _pick(n: int, count: int, seed: int, eligible: np.ndarray | None = None) -> list[int]:
    pool = np.arange(n) if eligible is None else np.flatnonzero(eligible)
    rng = np.random.default_rng(seed)
    return sorted(rng.choice(pool, size=min(count, len(pool)), replace=False).tolist())


def write_run_report(out_dir: str | Path, run: Any, split: Any, result: dict, *, title: str,
                     extra: dict | None = None, num_queries: int = 12, seed: int = 0,
                     protocol: str | None = None) -> dict:
    """metrics.json + report.html + PNGs for a run (:class:`~xmodal.models.run.Run`) evaluated on
    a prepared split: the run's summary, training curves and validation metrics (from its folder,
    where it has them), the split's metrics and examples in both directions (when the result
    holds embeddings). Returns the paths written (``metrics``, ``html``, and the PNGs)."""
    from .eval.report import write_report

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out_dir / "metrics.json", result["metrics"])
    ds = split.dataset
    queries = image_queries = None
    if "image_emb" in result and "text_emb" in result:
        describe = _describer(ds)
        img, txt = result["image_emb"], result["text_emb"]
        queries = query_examples(ds, img, txt, _pick(ds.num_texts, num_queries, seed), describe=describe)
        has_text = ds.gt.transpose().counts() > 0
        image_queries = image_query_examples(ds, img, txt, _pick(ds.num_images, num_queries, seed, has_text),
                                             describe=describe)
    info = run_overview(run)
    cfg = run.config
    heading = "Test metrics" if ds.split == cfg.data.test_split else f"Metrics on the {ds.split} split"
    note = ds.summary() + (f"; protocol {protocol}" if protocol else "")
    run_info = {"run": str(run.path), "checkpoint": str(run.checkpoint) if run.checkpoint else "none (a config)",
                "metrics log": info["log_path"] or "none", "evaluated": ds.summary(), **(extra or {})}
    files = write_report(out_dir, metrics=result["metrics"], i2t_ranks=result.get("i2t_ranks"),
                         t2i_ranks=result.get("t2i_ranks"), queries=queries, image_queries=image_queries,
                         title=title, subtitle=f"{run.name}, evaluated on {ds.summary()}",
                         summary=info["summary"], config=C.to_dict(cfg), training_log=info["log"],
                         best_step=info["best_step"], val_metrics=info["val_metrics"], val_note=info["val_note"],
                         metrics_heading=heading, metrics_note=note, extra=run_info)
    return {"metrics": out_dir / "metrics.json", **files}


def _read_json(path: Path) -> Any:
    """A JSON file of the run folder, or None when it is missing or unreadable (a report still
    gets written; the section that needed it says so)."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def run_overview(run: Any) -> dict:
    """What a report shows about a run besides its evaluation: the config summary (towers, loss,
    steps, best step, embedding size), the training log rows, the validation metrics."""
    from .eval.report import read_metrics_log

    folder = run.path if Path(run.path).is_dir() else None
    log_path = folder / "metrics.jsonl" if folder and (folder / "metrics.jsonl").is_file() else None
    rows = read_metrics_log(log_path) if log_path else []
    best = (_read_json(folder / "best" / "state.json") if folder else None) or {}
    trained = (_read_json(folder / "summary.json") if folder else None) or {}
    best_step = best.get("step", trained.get("best_step"))
    best_step = int(best_step) if isinstance(best_step, (int, float)) and best_step >= 0 else None
    val_metrics, val_note = None, ""
    val_split = run.config.data.val_split
    at_step = [r for r in rows if r.get("kind") == "val" and r.get("step") == run.step]
    if at_step:
        val_metrics = {k: v for k, v in at_step[-1].items() if k not in ("step", "kind")}
        which = "the best checkpoint, evaluated here" if run.step == best_step else "the evaluated checkpoint"
        val_note = f"{val_split} split at step {run.step}, {which} (from metrics.jsonl)"
    elif isinstance(best.get("metrics"), dict) and best["metrics"]:
        val_metrics = best["metrics"]
        val_note = f"{val_split} split at step {best_step}, the best checkpoint (from best/state.json)"
    return {"summary": _config_summary(run, trained, best_step, best.get("metrics")),
            "log": rows if folder else None, "log_path": str(log_path) if log_path else None,
            "best_step": best_step, "val_metrics": val_metrics, "val_note": val_note}


def _args_text(args: dict) -> str:
    """``k=v`` for short scalar arguments (a tokenizer's JSON is not worth showing)."""
    parts = []
    for k, v in (args or {}).items():
        text = json.dumps(v, ensure_ascii=False) if isinstance(v, (dict, list)) else str(v)
        parts.append(f"{k}={text}" if len(text) <= 40 else f"{k}=\u2026")
    return f" ({', '.join(parts)})" if parts else ""


def _tower_text(tower: Any, head: Any) -> str:
    frozen = "frozen" if tower.frozen else "trained"
    return f"{tower.name}{_args_text(tower.args)}, {frozen}; head: {head.input} \u2192 {head.proj}"


def _config_summary(run: Any, trained: dict, best_step: int | None, best_val: dict | None) -> dict:
    cfg = run.config
    m, t, o = cfg.model, cfg.train, cfg.optim
    out = {"model": f"{m.type} ({run.kind} scorer){_args_text(m.args)}",
           "image tower": _tower_text(m.image, m.image_head),
           "text tower": _tower_text(m.text, m.text_head),
           "embedding size": m.embed_dim,
           "loss": f"{cfg.loss.name}{_args_text(cfg.loss.args)}"}
    if not run.model.needs_training():
        out["training"] = "none: this model needs no training (evaluated from its config)"
        return out
    out["optimizer"] = (f"{o.name}, lr {o.lr:g}, {o.schedule} schedule, {o.warmup_steps} warm-up steps, "
                        f"batch {t.batch_size}")
    out["training data"] = f"{cfg.data.format}:{cfg.data.path}, split {cfg.data.train_split}, " \
                           f"captions {cfg.data.train_lang}"
    done = trained.get("steps")
    steps = f"{done} of {t.steps}" if done is not None else f"{t.steps} configured (no summary.json)"
    out["steps"] = steps + (", stopped early" if trained.get("stopped_early") else "")
    rsum = (best_val or trained.get("best_val") or {}).get("rsum")
    out["best step"] = "unknown" if best_step is None else (
        f"{best_step}" + (f" (validation rsum {float(rsum):.1f})" if isinstance(rsum, (int, float)) else ""))
    out["evaluated checkpoint"] = (f"{Path(run.checkpoint).name}, step {run.step}" if run.checkpoint
                                   else "none")
    if isinstance(trained.get("train_seconds"), (int, float)):
        out["training time"] = (f"{trained['train_seconds']:.0f} s training, "
                                f"{trained.get('prepare_seconds') or 0:.0f} s preparing inputs")
    return out


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
                             protocol="full", extra={"config": cfg.name, "train captions": cfg.data.train_lang,
                                                     "total seconds": f"{elapsed:.0f}"})
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
    # paths on one line each (no wrapping: they get copied), never read as rich markup
    console.print(f"metrics: {files['metrics']}", soft_wrap=True, markup=False)
    for key in ("html", "training_curves", "recall_curve", "queries"):
        if key in files:
            console.print(f"report:  {files[key]}", soft_wrap=True, markup=False)
    console.print(f"run:     {run_dir}  (logs: {run_dir / 'metrics.jsonl'})", soft_wrap=True, markup=False)
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
