"""Resize modes (crop / squash / letterbox) on non-square images with captions.

Builds a non-square evaluation set offline from the embedded emoji test split (concepts a
trained model never saw): two emoji side by side (``wide2``, 128x64, caption "X and Y"),
two stacked (``tall2``, 64x128, "X and Y"), three side by side (``wide3``, 192x64,
"X, Y and Z"), each composed from images of one style (Noto or Twemoji); plus the 500 square
single emoji with their labels (``single``; every mode gives them the same pixels). A run
trained on the emoji train split (default: ``configs/emoji/baseline.yaml``, trained into
``--run`` when that folder holds no run) then encodes the set once per resize mode of its
image tower, and exact retrieval metrics are printed per subset (each subset its own
gallery; ``composed`` = the three composed subsets together, ``all`` = everything).

The image tower is rebuilt per mode from the run's config with ``resize`` (and
``letterbox_fill``) set, i.e. exactly what ``model.image.args.resize`` does in a config.
Identical preprocessed pixels are encoded once (the singles, and ``letterbox`` with fills that
agree), so the figures are the tower's outputs, not a re-implementation.

    python benchmarks/resize_modes.py --run /tmp/xmodal_resize/baseline      # the docs' figures
    python benchmarks/resize_modes.py --dry-run                               # seconds: tiny, untrained

Preprocessing time per mode is printed as a ratio to ``crop`` measured in the same run.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
MODES = ("crop", "squash", "letterbox", "letterbox:black")
METRICS = ("t2i_r1", "t2i_r5", "t2i_r10", "i2t_r1", "i2t_r5", "i2t_r10", "rsum")


@dataclass
class Subset:
    """Images (PIL) and captions; ``positives[t]`` the image indices caption ``t`` names."""

    images: list = field(default_factory=list)
    captions: list[str] = field(default_factory=list)
    positives: list[list[int]] = field(default_factory=list)

    def add(self, image, caption: str) -> None:
        """One image and the caption naming it (an identical caption already present gains a positive)."""
        self.images.append(image)
        if caption in self.captions:
            self.positives[self.captions.index(caption)].append(len(self.images) - 1)
        else:
            self.captions.append(caption)
            self.positives.append([len(self.images) - 1])


def compose(images: list, axis: str):
    """Paste equally sized PIL images side by side (``axis="x"``) or stacked (``"y"``)."""
    from PIL import Image

    w, h = images[0].size
    n = len(images)
    canvas = Image.new("RGB", (w * n, h) if axis == "x" else (w, h * n), (255, 255, 255))
    for k, img in enumerate(images):
        canvas.paste(img, (k * w, 0) if axis == "x" else (0, k * h))
    return canvas


def join_labels(labels: list[str]) -> str:
    """``["a", "b"]`` -> ``"a and b"``; ``["a", "b", "c"]`` -> ``"a, b and c"``."""
    return labels[0] if len(labels) == 1 else ", ".join(labels[:-1]) + " and " + labels[-1]


def build_sets(counts: dict[str, int], seed: int = 0, singles: int | None = None) -> dict[str, Subset]:
    """The evaluation subsets from the emoji test split (English labels); ``counts`` gives the
    number of ``wide2`` / ``tall2`` / ``wide3`` images, ``singles`` caps the single emoji."""
    from xmodal.data import emoji, load_dataset

    ds = load_dataset("emoji", emoji.default_path(), "test")
    label = {}
    for t, caption in enumerate(ds.captions):
        for i in ds.gt.images_of(t):
            label[int(i)] = caption
    by_style: dict[str, list[int]] = {}
    for i, image_id in enumerate(ds.image_ids):
        by_style.setdefault(image_id.split("/")[0], []).append(i)
    styles = sorted(by_style)
    rng = np.random.default_rng(seed)
    sets = {"single": Subset()}
    for i in range(ds.num_images if singles is None else min(singles, ds.num_images)):
        sets["single"].add(emoji.load_image(ds, i), label[i])
    for name, k, axis in (("wide2", 2, "x"), ("tall2", 2, "y"), ("wide3", 3, "x")):
        sets[name] = Subset()
        for _ in range(counts.get(name, 0)):
            pool = by_style[styles[int(rng.integers(len(styles)))]]
            picks = [pool[int(j)] for j in rng.choice(len(pool), size=k, replace=False)]
            sets[name].add(compose([emoji.load_image(ds, i) for i in picks], axis), join_labels([label[i] for i in picks]))
    return sets


def merge(parts: list[Subset]) -> tuple[list[int], list[str], list[list[int]]]:
    """Image offsets, captions and positives of several subsets as one gallery."""
    offsets, captions, positives, base = [], [], [], 0
    for s in parts:
        offsets.append(base)
        captions += s.captions
        positives += [[base + i for i in p] for p in s.positives]
        base += len(s.images)
    return offsets, captions, positives


def make_towers(run, mode: str):
    """The run's image tower rebuilt with ``resize`` (``letterbox:black`` = letterbox, fill black)."""
    from xmodal.models.base import IMAGE_TOWERS

    resize, _, fill = mode.partition(":")
    args = {**run.config.model.image.args, "resize": resize}
    if fill:
        args["letterbox_fill"] = fill
    tower = IMAGE_TOWERS.create(run.config.model.image.name, **args)
    tower.load_state_dict(run.model.tower("image").state_dict())
    return tower.eval()


@torch.inference_mode()
def encode_images(run, tower, images: list, cache: dict, batch_size: int) -> tuple[torch.Tensor, float]:
    """Joint-space embeddings ``(N, D)`` of PIL images through ``tower`` and the run's image head;
    equal preprocessed pixels are encoded once (``cache``: pixel sha256 -> embedding)."""
    t0 = time.perf_counter()
    pixels = [tower.preprocess(img) for img in images]  # each (3, H, W) uint8
    prep_s = time.perf_counter() - t0
    keys = [hashlib.sha256(p.numpy().tobytes()).hexdigest() for p in pixels]
    todo = [k for k in dict.fromkeys(keys) if k not in cache]
    first = {k: keys.index(k) for k in todo}
    for lo in range(0, len(todo), batch_size):
        chunk = todo[lo:lo + batch_size]
        batch = torch.stack([pixels[first[k]] for k in chunk])  # (B, 3, H, W)
        emb = run.model.encode_image(tower(batch))  # (B, D)
        cache.update(zip(chunk, emb))
    return torch.stack([cache[k] for k in keys]), prep_s


def evaluate(img: torch.Tensor, txt: torch.Tensor, positives: list[list[int]]) -> dict[str, float]:
    from xmodal.eval.protocols import evaluate_embeddings

    out = evaluate_embeddings(img, txt, positives, "full", progress=False)
    return {k: float(out[k]) for k in METRICS}


def measure(run, sets: dict[str, Subset], modes: tuple[str, ...], batch_size: int) -> tuple[dict, dict]:
    """``{mode: {subset: metrics}}`` and ``{mode: preprocessing seconds}``."""
    names = list(sets)
    _, captions, _ = merge([sets[n] for n in names])
    with torch.inference_mode():
        txt = run.model.encode_text(captions)  # (M, D)
    txt_of, start = {}, 0
    for n in names:
        txt_of[n] = txt[start:start + len(sets[n].captions)]
        start += len(sets[n].captions)
    cache: dict = {}
    results, prep = {}, {}
    groups = {n: [n] for n in names} | {"composed": [n for n in names if n != "single"], "all": names}
    for mode in modes:
        tower = make_towers(run, mode)
        emb = {}
        prep[mode] = 0.0
        for n in names:
            emb[n], s = encode_images(run, tower, sets[n].images, cache, batch_size)
            prep[mode] += s
        results[mode] = {}
        for g, parts in groups.items():
            if not parts or not all(sets[p].images for p in parts):
                continue
            _, _, positives = merge([sets[p] for p in parts])
            img = torch.cat([emb[p] for p in parts])  # (N, D)
            results[mode][g] = evaluate(img, torch.cat([txt_of[p] for p in parts]), positives)
    return results, prep


def load_run(args: argparse.Namespace):
    """The run to measure: ``--run`` (trained there from ``--config`` when it holds none), or for
    ``--dry-run`` an untrained tiny model built from the config."""
    import xmodal
    from xmodal.config import load_config
    from xmodal.models.run import Run, create_model

    if args.dry_run:
        cfg = load_config(args.config, ["model.image.args.image_size=32"])
        return Run(create_model(cfg.model).eval(), cfg, Path(args.config))
    run_dir = Path(args.run)
    if not (run_dir / "best").exists():
        from xmodal.train.loop import train

        print(f"training {args.config} into {run_dir} ...", file=sys.stderr)
        train(load_config(args.config), run_dir, progress=False)
    return xmodal.load(run_dir)


def report(results: dict, prep: dict, sets: dict[str, Subset], run_name: str) -> str:
    """The results as a markdown table (rows: subset x mode)."""
    lines = [f"run: {run_name}", "",
             "| subset | images | captions | resize | t2i R@1 | R@5 | R@10 | i2t R@1 | R@5 | R@10 | rsum |",
             "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    sizes = {n: (len(s.images), len(s.captions)) for n, s in sets.items()}
    sizes["composed"] = tuple(sum(sizes[n][j] for n in sets if n != "single") for j in (0, 1))
    sizes["all"] = tuple(sum(sizes[n][j] for n in sets) for j in (0, 1))
    for g in next(iter(results.values())):
        for mode, res in results.items():
            m = res[g]
            vals = " | ".join(f"{m[k]:.1f}" for k in METRICS)
            lines.append(f"| {g} | {sizes[g][0]} | {sizes[g][1]} | {mode} | {vals} |")
    base = prep[next(iter(prep))] or 1e-9
    lines += ["", "preprocessing time (ratio to crop, same run): " +
              ", ".join(f"{m} {prep[m] / base:.2f}x" for m in prep)]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run", default="/tmp/xmodal_resize/baseline", help="trained run folder (trained if missing)")
    p.add_argument("--config", default=str(ROOT / "configs/emoji/baseline.yaml"), help="config to train the run from")
    p.add_argument("--wide2", type=int, default=150)
    p.add_argument("--tall2", type=int, default=150)
    p.add_argument("--wide3", type=int, default=100)
    p.add_argument("--modes", default=",".join(MODES), help="comma-separated; letterbox:FILL sets the fill")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument("--dry-run", action="store_true", help="tiny set, 32 px, untrained model: checks the script")
    args = p.parse_args(argv)
    torch.manual_seed(args.seed)
    counts = {"wide2": args.wide2, "tall2": args.tall2, "wide3": args.wide3}
    singles = None
    if args.dry_run:
        counts, singles = {"wide2": 3, "tall2": 3, "wide3": 2}, 6
    run = load_run(args)
    sets = build_sets(counts, seed=args.seed, singles=singles)
    modes = tuple(m for m in args.modes.split(",") if m)
    results, prep = measure(run, sets, modes, args.batch_size)
    print(report(results, prep, sets, "untrained (dry run)" if args.dry_run else str(args.run)))
    if args.json:
        from xmodal.utils import atomic_write_text

        atomic_write_text(Path(args.json), json.dumps({"results": results, "prep_seconds": prep}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
