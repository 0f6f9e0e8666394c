"""Per caption language retrieval of trained runs: text -> image R@1 (and rsum) for each language.

Evaluates every run on the same split once per caption language (each language's captions of
the split against all of its images, the ``xmodal eval RUN --lang L`` protocol) and prints one
table: a column per run, a row per language, then the mean over the non-English languages, its
ratio to the run's English R@1 (the issue's goal: >= 0.70; also over es/de/fr/ja/ru/zh), and each run's English R@1 as a
ratio to the first run's (the reference, e.g. the English-only baseline; goal: >= 1.0). All
figures come from this one invocation.

    python benchmarks/multilingual_eval.py runs/xmrs_en runs/xmrs_multi runs/xmrs_multi_use \\
        --langs en,es,de,fr,ja,ru,zh,it,pt,ko --split test --json multilingual.json
    python benchmarks/multilingual_eval.py --speed 5000  # texts/s of the USE tower vs frozen MiniLM
    python benchmarks/multilingual_eval.py --dry-run     # a tiny table dataset, trained and evaluated

``--train CONFIG [KEY=VALUE ...]`` (repeatable) trains each config, with its dotted overrides,
once per ``--seeds`` seed (``train.seed``) into ``--runs-dir`` (a finished run there with the
same resolved config is reused, an unfinished one resumed: the sweep can be interrupted and run
again), evaluates every run per language and prints, per config, the mean +- sample standard
deviation over the seeds of each language's R@1, English R@1, the non-English means, their
ratio to English (computed per seed) and English R@1 minus the first config's (the reference)
on the same seed:

    python benchmarks/multilingual_eval.py --seeds 0,1,2 --split val --runs-dir /tmp/sweep \
        --train configs/emoji/english_only_use.yaml --train configs/emoji/multilingual_use.yaml \
        --train configs/emoji/multilingual_use.yaml data.train_options.lang_weights.en=3

``--dry-run`` writes a 3-language table dataset of coloured shapes (en, es, de captions),
trains a tiny dual encoder on it with the frozen ``use_multilingual`` text tower and a frozen
EfficientNet-lite0 at 64 px (20 steps), and evaluates it per language through the same code
(with ``--seeds``, once per seed, aggregated as above).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import re
import sys
import tempfile
import time
from pathlib import Path

DEFAULT_LANGS = "en,es,de,fr,ja,ru,zh"
REFERENCE_LANG = "en"
#: the languages the issue names: their mean is reported beside the mean of all non-English ones
CORE_LANGS = ["es", "de", "fr", "ja", "ru", "zh"]


def evaluate_run(run_dir: str, langs: list[str], split: str | None) -> dict[str, dict[str, float]]:
    """``{lang: metrics}`` of one run on ``split`` (default: its config's test split)."""
    from xmodal.data.pipeline import prepare_split
    from xmodal.eval.encode import evaluate_split
    from xmodal.models import load

    run = load(run_dir)
    split = split or run.config.data.test_split
    out = {}
    for lang in langs:
        data = prepare_split(run.config, run.model, split, lang, progress=False)
        res = evaluate_split(run.model, data, protocol=run.config.eval.protocol,
                             block_size=run.config.eval.block_size)
        out[lang] = {k: float(v) for k, v in res["metrics"].items()} | {"texts": data.dataset.num_texts}
    return out


def is_english(lang: str) -> bool:
    return lang.split("-")[0] == REFERENCE_LANG  # en, en-gb, ...


def summarise(results: dict[str, dict[str, dict[str, float]]], reference: str,
              core: list[str] = CORE_LANGS) -> dict[str, dict[str, float]]:
    """Per run: English R@1, the mean non-English R@1 (all evaluated languages but English and its
    variants; and over ``core``), its ratio to English R@1, and English R@1 over the reference run's."""
    ref_en = results[reference][REFERENCE_LANG]["t2i_r1"] if REFERENCE_LANG in results[reference] else None
    mean = lambda xs: sum(xs) / len(xs) if xs else None  # noqa: E731
    out = {}
    for name, per_lang in results.items():
        en = per_lang.get(REFERENCE_LANG, {}).get("t2i_r1")
        others = mean([m["t2i_r1"] for lang, m in per_lang.items() if not is_english(lang)])
        core_mean = mean([per_lang[lang]["t2i_r1"] for lang in core if lang in per_lang])
        out[name] = {"en_r1": en, "mean_non_en_r1": others, "mean_core_r1": core_mean,
                     "non_en_over_en": (others / en) if (others is not None and en) else None,
                     "core_over_en": (core_mean / en) if (core_mean is not None and en) else None,
                     "en_over_reference_en": (en / ref_en) if (en is not None and ref_en) else None}
    return out


def markdown(results: dict, summary: dict, langs: list[str]) -> str:
    names = list(results)
    fmt = lambda v, p=1: "-" if v is None else f"{v:.{p}f}"  # noqa: E731
    lines = ["| caption language | " + " | ".join(f"{n} R@1" for n in names) + " | "
             + " | ".join(f"{n} rsum" for n in names) + " |",
             "|---" + "|---:" * (2 * len(names)) + "|"]
    for lang in langs:
        r1 = [fmt(results[n][lang]["t2i_r1"]) for n in names]
        rs = [fmt(results[n][lang]["rsum"]) for n in names]
        lines.append(f"| {lang} | " + " | ".join(r1 + rs) + " |")
    n_other = sum(not is_english(lang) for lang in langs)
    n_core = sum(lang in langs for lang in CORE_LANGS)
    for key, label, p in (("mean_non_en_r1", f"mean of the {n_other} non-English", 1),
                          ("non_en_over_en", "that / English", 2),
                          ("mean_core_r1", f"mean of {'/'.join(CORE_LANGS)} ({n_core} here)", 1),
                          ("core_over_en", "that / English", 2)):
        lines.append(f"| {label} | " + " | ".join(fmt(summary[n][key], p) for n in names) + " |" * (len(names) + 1))
    lines.append(f"| English / {names[0]}'s English | "
                 + " | ".join(fmt(summary[n]["en_over_reference_en"], 2) for n in names) + " |" * (len(names) + 1))
    return "\n".join(lines)


def tower_speed(n: int, batch_size: int = 256) -> dict[str, float]:
    """Texts per second of the frozen USE tower and of the frozen MiniLM (``hf``) tower, encoding
    the same ``n`` emoji labels (all 28 languages of the test split, cycled) in one process."""
    import torch

    from xmodal.data.emoji import read
    from xmodal.models.base import TEXT_TOWERS
    import xmodal.models.text  # noqa: F401  (registers the text towers)

    labels = read("emoji", "test", lang="all").captions
    texts = [labels[i % len(labels)] for i in range(n)]
    out = {}
    for name, tower in (("use_multilingual", TEXT_TOWERS.create("use_multilingual")),
                        ("hf_minilm", TEXT_TOWERS.create("hf", frozen=True))):
        tower.eval()
        with torch.inference_mode():
            tower(tower.tokenize(texts[:8]))  # warm-up
            t0 = time.perf_counter()
            for start in range(0, n, batch_size):
                tower(tower.tokenize(texts[start:start + batch_size]))
            out[name] = n / (time.perf_counter() - t0)
    out["use_over_minilm"] = out["use_multilingual"] / out["hf_minilm"]
    return out


# seeds: train each config once per seed, then aggregate ------------------------------------------
def parse_seeds(text: str) -> list[int]:
    """``"0,1,2"`` -> ``[0, 1, 2]`` (distinct non-negative integers, in order)."""
    try:
        seeds = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--seeds: expected comma-separated integers such as 0,1,2, got {text!r}") from None
    if not seeds or any(x < 0 for x in seeds) or len(set(seeds)) != len(seeds):
        raise ValueError(f"--seeds: expected distinct non-negative integers such as 0,1,2, got {text!r}")
    return seeds


def candidate_label(config: str, overrides: list[str]) -> str:
    """``multilingual_use train.steps=600``: the config's file stem and its overrides."""
    return " ".join([Path(config).stem, *overrides])


def run_folder(runs_dir: Path, label: str, seed: int) -> Path:
    """A readable folder name per (config + overrides, seed); a hash keeps long labels distinct."""
    safe = re.sub(r"[^A-Za-z0-9._=-]+", "_", label)
    if len(safe) > 80:
        safe = safe[:60] + "-" + hashlib.sha1(label.encode()).hexdigest()[:10]
    return runs_dir / f"{safe}-seed{seed}"


def train_seed(config: str, overrides: list[str], seed: int, run_dir: Path) -> Path:
    """Train ``config`` + ``overrides`` with ``train.seed=seed`` into ``run_dir``; a finished run
    there is reused when its resolved config is the same (an error otherwise), an unfinished
    one is resumed from its latest checkpoint."""
    import yaml

    from xmodal.config import load_config, to_dict
    from xmodal.errors import XmodalError
    from xmodal.train.loop import train

    cfg = load_config(config, [*overrides, f"train.seed={seed}"])
    if (run_dir / "summary.json").is_file():
        saved_path = run_dir / "config.yaml"
        saved = yaml.safe_load(saved_path.read_text(encoding="utf-8")) if saved_path.is_file() else None
        if saved != to_dict(cfg):
            raise XmodalError(f"{run_dir}: a finished run with another config is in the way; "
                              "choose another --runs-dir or remove it")
        return run_dir
    train(cfg, run_dir, resume=True, progress=False)
    return run_dir


def train_candidates(candidates: list[tuple[str, list[str]]], seeds: list[int], runs_dir: Path,
                     labels: list[str] | None = None) -> dict[str, list[tuple[int, str]]]:
    """``{label: [(seed, run folder), ...]}`` for every config (+ overrides) and seed, in order."""
    from xmodal.progress import track

    from xmodal.errors import XmodalError

    labels = labels or [candidate_label(c, o) for c, o in candidates]
    if len(set(labels)) != len(labels):
        dup = next(x for x in labels if labels.count(x) > 1)
        raise XmodalError(f"--train {dup!r} is given twice (configs are told apart by file name and overrides)")
    jobs = [(label, cfg, ov, seed) for label, (cfg, ov) in zip(labels, candidates) for seed in seeds]
    out: dict[str, list[tuple[int, str]]] = {label: [] for label in labels}
    for label, cfg, ov, seed in track(jobs, "training", enabled=sys.stderr.isatty()):
        t0 = time.perf_counter()
        run = train_seed(cfg, ov, seed, run_folder(runs_dir, label, seed))
        print(f"trained {label} seed {seed}: {run} ({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
        out[label].append((seed, str(run)))
    return out


def mean_std(xs: list[float]) -> dict[str, float]:
    """Mean and sample standard deviation (0 for one value)."""
    m = sum(xs) / len(xs)
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0
    return {"mean": m, "std": sd, "n": len(xs)}


def aggregate(results: dict, summary: dict, trained: dict[str, list[tuple[int, str]]],
              names: dict[tuple[str, int], str], langs: list[str]) -> dict[str, dict]:
    """Per config: mean / std over its seeds of each language's R@1 and of every summary figure
    (ratios are taken per seed, then averaged); ``en_minus_reference_en`` pairs seed with seed
    against the first config (seeds the reference lacks are left out of that figure)."""
    reference = next(iter(trained))
    ref_en = {seed: summary[names[reference, seed]]["en_r1"] for seed, _ in trained[reference]}
    out = {}
    for label, runs in trained.items():
        per = [(seed, names[label, seed]) for seed, _ in runs]
        agg = {f"{lang}_r1": mean_std([results[n][lang]["t2i_r1"] for _, n in per]) for lang in langs}
        for key in ("en_r1", "mean_core_r1", "core_over_en", "mean_non_en_r1", "non_en_over_en"):
            vals = [summary[n][key] for _, n in per if summary[n][key] is not None]
            if vals:
                agg[key] = mean_std(vals)
        diffs = [summary[n]["en_r1"] - ref_en[seed] for seed, n in per
                 if ref_en.get(seed) is not None and summary[n]["en_r1"] is not None]
        if diffs:
            agg["en_minus_reference_en"] = mean_std(diffs)
        out[label] = agg | {"seeds": [seed for seed, _ in per]}
    return out


def seeds_markdown(agg: dict[str, dict], langs: list[str]) -> str:
    """One row per config: mean +- std over seeds (R@1, text -> image)."""
    cell = lambda d, k, p=1: f"{d[k]['mean']:.{p}f} ± {d[k]['std']:.{p}f}" if k in d else "-"  # noqa: E731
    cols = [(f"{lang}_r1", lang, 1) for lang in langs] + [
        ("mean_core_r1", "/".join(CORE_LANGS), 1), ("core_over_en", "that / en", 3),
        ("mean_non_en_r1", "all non-en", 1), ("non_en_over_en", "that / en", 3),
        ("en_minus_reference_en", "en - reference en", 1)]
    lines = ["| config (mean ± std over seeds) | seeds | " + " | ".join(c[1] for c in cols) + " |",
             "|---|---" + "|---:" * len(cols) + "|"]
    for label, d in agg.items():
        seeds = ",".join(map(str, d["seeds"]))
        lines.append(f"| {label} | {seeds} | " + " | ".join(cell(d, k, p) for k, _, p in cols) + " |")
    return "\n".join(lines)


# dry run ---------------------------------------------------------------------------------------
COLOURS = {"red": ((220, 30, 30), "rojo", "roter"), "green": ((30, 170, 40), "verde", "grüner"),
           "blue": ((30, 60, 220), "azul", "blauer"), "yellow": ((240, 210, 20), "amarillo", "gelber")}
SHAPES = {"circle": ("un círculo", "Kreis"), "square": ("un cuadrado", "Quadrat")}


def write_tiny_table(folder: Path) -> Path:
    """8 concepts (colour x shape) with 3 drawings each (2 train, 1 test) and a caption per language."""
    import csv

    from PIL import Image, ImageDraw

    (folder / "imgs").mkdir(parents=True, exist_ok=True)
    rows = []
    for colour, (rgb, es_colour, de_colour) in COLOURS.items():
        for shape, (es_shape, de_shape) in SHAPES.items():
            captions = {"en": f"a {colour} {shape}", "es": f"{es_shape} {es_colour}",
                        "de": f"ein {de_colour} {de_shape}"}
            for variant, split in enumerate(("train", "train", "test")):
                im = Image.new("RGB", (64, 64), (250, 250, 250))
                box = (8 + 4 * variant, 8 + 2 * variant, 52 + variant, 54 - 2 * variant)
                (ImageDraw.Draw(im).ellipse if shape == "circle" else ImageDraw.Draw(im).rectangle)(box, fill=rgb)
                name = f"imgs/{colour}_{shape}_{variant}.png"
                im.save(folder / name)
                rows += [{"image": name, "image_id": f"{colour}_{shape}_{variant}", "caption": text,
                          "split": split, "lang": lang} for lang, text in captions.items()]
    path = folder / "pairs.csv"
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return path


def dry_run_config(table: Path, path: Path) -> Path:
    path.write_text(f"""name: multilingual-eval-dry-run
data: {{format: table, path: {json.dumps(str(table))}, train_split: train, val_split: test, test_split: test,
        train_lang: all, eval_lang: en}}
model:
  type: dual_encoder
  embed_dim: 32
  image: {{name: efficientnet_lite0, args: {{image_size: 64}}, frozen: true}}
  text: {{name: use_multilingual, args: {{}}, frozen: true}}
  image_head: {{input: pooled, proj: linear}}
  text_head: {{input: pooled, proj: linear}}
loss: {{name: infonce}}
optim: {{name: adam, lr: 0.01, weight_decay: 0.0, schedule: cosine, warmup_steps: 2}}
train: {{steps: 20, batch_size: 16, eval_every: 20, log_every: 10, device: cpu, tensorboard: false}}
""", encoding="utf-8")
    return path


def dry_run(folder: Path) -> tuple[str, list[str]]:
    """Write the tiny dataset and its config; returns ``(config, [])`` to train like ``--train``."""
    table = write_tiny_table(folder / "data")
    return str(dry_run_config(table, folder / "config.yaml")), []


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("runs", nargs="*", help="run folders; the first is the reference for English R@1")
    p.add_argument("--langs", default=None, help=f"comma-separated caption languages (default {DEFAULT_LANGS}; "
                                                 "en,es,de with --dry-run)")
    p.add_argument("--split", default=None, help="split to evaluate (default: each run's test split)")
    p.add_argument("--json", default=None, help="also write the per-language metrics and the summary here")
    p.add_argument("--dry-run", action="store_true", help="train a tiny 3-language run and evaluate it")
    p.add_argument("--train", nargs="+", action="append", default=[], metavar=("CONFIG", "KEY=VALUE"),
                   help="train this config (with dotted overrides) once per seed and evaluate it; "
                        "repeat for several configs, the first is the reference")
    p.add_argument("--seeds", default=None, help="comma-separated train.seed values for --train / --dry-run "
                                                 "(default 0); with several, means and standard deviations")
    p.add_argument("--runs-dir", default=None, help="where --train puts its runs (default: a temporary folder, "
                                                    "removed at the end); finished runs there are reused")
    p.add_argument("--speed", type=int, default=0, metavar="N",
                   help="also time the USE and MiniLM text towers on N emoji labels (32 with --dry-run)")
    args = p.parse_args(argv)
    if not args.runs and not args.dry_run and not args.speed and not args.train:
        p.error("give run folders, --train CONFIG, --speed N, or --dry-run")
    if args.runs and (args.train or args.dry_run):
        p.error("give either run folders or --train / --dry-run, not both")
    try:
        args.seeds = parse_seeds(args.seeds) if args.seeds is not None else [0]
    except ValueError as exc:
        p.error(str(exc))
    return args


def evaluate_all(args, langs: list[str], tmp: Path) -> tuple[dict, dict | None, int]:
    """Train what is asked (``--train`` / ``--dry-run``), evaluate every run per language;
    returns ``(results by run name, per-config aggregate or None, number of runs)``."""
    if not (args.train or args.dry_run):
        runs = {os.path.basename(os.path.normpath(r)): r for r in args.runs}
        return {name: evaluate_run(r, langs, args.split) for name, r in runs.items()}, None, len(runs)
    candidates = [dry_run(tmp)] if args.dry_run else [(t[0], t[1:]) for t in args.train]
    labels = ["dry-run"] if args.dry_run else None
    runs_dir = Path(args.runs_dir) if args.runs_dir and not args.dry_run else tmp / "runs"  # dry run: fresh
    trained = train_candidates(candidates, args.seeds, runs_dir, labels)
    single = len(args.seeds) == 1
    names = {(label, seed): label if single else f"{label} @seed{seed}"
             for label, runs in trained.items() for seed, _ in runs}
    results = {names[label, seed]: evaluate_run(run, langs, args.split)
               for label, runs in trained.items() for seed, run in runs}
    agg = None if single else aggregate(results, summarise(results, next(iter(results))), trained, names, langs)
    return results, agg, len(results)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    langs = [s.strip() for s in (args.langs or ("en,es,de" if args.dry_run else DEFAULT_LANGS)).split(",") if s.strip()]
    report: dict = {"langs": langs, "split": args.split}
    with tempfile.TemporaryDirectory(prefix="xmodal_multilingual_") as tmp:
        t0 = time.perf_counter()
        results, agg, n_runs = evaluate_all(args, langs, Path(tmp)) if (args.runs or args.train or args.dry_run) \
            else ({}, None, 0)
        seconds = time.perf_counter() - t0
    if results:
        summary = summarise(results, next(iter(results)))
        print(seeds_markdown(agg, langs) if agg else markdown(results, summary, langs))
        print(f"\n({n_runs} run(s) x {len(langs)} languages, trained and evaluated in {seconds:.1f} s)", file=sys.stderr)
        report |= {"results": results, "summary": summary} | ({"seeds": agg} if agg else {})
    n = args.speed or (32 if args.dry_run else 0)
    if n:
        speed = tower_speed(n)
        print(f"\ntext towers on {n} emoji labels: use_multilingual {speed['use_multilingual']:.0f} texts/s, "
              f"frozen MiniLM {speed['hf_minilm']:.0f} texts/s, ratio USE / MiniLM {speed['use_over_minilm']:.2f}")
        report["speed"] = speed
    if args.json:
        from xmodal.utils import atomic_write_text

        atomic_write_text(args.json, json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    from xmodal.errors import XmodalError

    try:
        sys.exit(main())
    except XmodalError as exc:  # a wrong run folder, a bad language: one line, as the CLI prints it
        print(f"multilingual_eval: error: {exc}", file=sys.stderr)
        sys.exit(2)
