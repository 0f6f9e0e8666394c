"""ALADIN's efficiency / effectiveness trade-off: quality against seconds per query.

Evaluates finished ALADIN runs on one split and times text-to-image queries:

- ``alignment``: the alignment head, every image scored by MrSw (exact);
- ``matching``: a matching head trained alone (``--matching RUN``);
- ``distilled``: the matching head distilled from the alignment head (``--distill RUN``);
- ``two-stage k``: the distilled run's matching head shortlists ``k`` images per query (and
  ``k`` captions per image for i2t), its alignment head re-ranks them. With a frozen backbone
  (``matching-distill-finetune``) the distilled run's alignment head is the alignment run's.

Quality is the split's full metrics (both directions, via :func:`xmodal.eval.encode.evaluate_split`).
Time per query: the gallery (images) is encoded once beforehand, as an index would be; then each
caption is processed alone (batch 1, one thread): encode it with the ALADIN backbone from its
cached text-tower tokens, score the gallery (MrSw for alignment; a dot product, top k and MrSw on
the k candidates for two-stage), rank. Reported: the median over all captions (the fastest of
``--repeats`` passes), against the
split's own images and against ``--gallery-size`` images (the split's repeated: the same work
per image as a real gallery of that size; the plot uses this one).

    OMP_NUM_THREADS=1 python benchmarks/aladin_tradeoff.py --alignment runs/aladin_alignment \\
        --matching runs/aladin_matching --distill runs/aladin_distill \\
        --png docs/aladin_tradeoff.png --json aladin_tradeoff.json
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger("aladin_tradeoff")


def _split(run, split: str, lang: str | None):
    from xmodal.data.pipeline import prepare_split

    cfg, model = run.config, run.model
    return prepare_split(cfg, model, split or cfg.data.test_split, lang or cfg.data.eval_lang, progress=False)


def _tile(reps, size: int):
    """The first ``size`` items of ``reps`` repeated (a larger gallery with the same cost per item)."""
    from xmodal.eval.pairs import take_reps

    n = reps.shape[0] if isinstance(reps, torch.Tensor) else reps.tokens.shape[0]
    return take_reps(reps, torch.arange(size) % n)


@torch.inference_mode()
def seconds_per_query(model, data, mode: str, k: int = 0, queries: int | None = None, warmup: int = 5,
                      gallery_size: int | None = None, repeats: int = 3) -> float:
    """Seconds per text query against the pre-encoded images of ``data``.

    ``gallery_size`` repeats the split's images up to that many (timing only). The number is
    the smallest, over ``repeats`` passes, of the median over queries: other processes' bursts
    on a shared machine only ever add time.
    """
    from xmodal.eval.pairs import encode_reps

    ds = data.dataset
    if mode == "matching":
        gallery = torch.cat([model.encode_image(data.images(np.arange(s, min(ds.num_images, s + 256))))
                             for s in range(0, ds.num_images, 256)])  # (N, D)
    else:
        gallery = encode_reps(model.encode_image_reps, data.images, ds.num_images, batch_size=256)
    size = gallery_size or ds.num_images
    gallery = _tile(gallery, size)
    n = ds.num_texts if queries is None else min(queries, ds.num_texts)
    return min(_median_query_time(model, data, mode, k, gallery, size, n, warmup) for _ in range(repeats))


def _median_query_time(model, data, mode: str, k: int, gallery, size: int, n: int, warmup: int) -> float:
    ds = data.dataset
    times = []
    for q in range(warmup + n):
        idx = np.array([q % ds.num_texts])
        text = data.texts(idx)
        t0 = time.perf_counter()
        if mode == "matching":
            s = model.encode_text(text) @ gallery.t()  # (1, N)
            order = s[0].argsort(descending=True)
        elif mode == "alignment":
            s = model.score(gallery, model.encode_text_reps(text))  # (N, 1)
            order = s[:, 0].argsort(descending=True)
        else:  # two-stage
            rep = model.encode_text_reps(text)
            first = gallery.pooled @ rep.pooled[0]  # (N,)
            cand = first.topk(min(k, size)).indices
            rescored = model.score_pairs(gallery, rep, cand, torch.zeros_like(cand))
            order = cand[rescored.argsort(descending=True)]
        del order
        if q >= warmup:
            times.append(time.perf_counter() - t0)
    return float(np.median(times))


def run(args: argparse.Namespace) -> list[dict]:
    from xmodal.eval.encode import evaluate_split
    from xmodal.models.aladin import load_run

    torch.set_num_threads(args.threads)
    variants = [("alignment", args.alignment, "alignment", 0)]
    if args.matching:
        variants.append(("matching (alone)", args.matching, "matching", 0))
    if args.distill:
        variants.append(("matching (distilled)", args.distill, "matching", 0))
        variants += [(f"two-stage k={k}", args.distill, "alignment", k) for k in args.ks]
    rows = []
    data_cache: dict[str, object] = {}
    for name, run_dir, head, k in variants:
        run = load_run(run_dir, eval_head=head)
        model = run.model
        key = f"{run_dir}:{head}"
        if key not in data_cache:
            data_cache[key] = _split(run, args.split, args.lang)
        data = data_cache[key]
        res = evaluate_split(model, data, protocol=args.protocol, rerank_k=k)
        mode = "two-stage" if k else head
        spq = seconds_per_query(model, data, mode, k, queries=args.queries, repeats=args.repeats)
        spq_big = seconds_per_query(model, data, mode, k, queries=args.queries, gallery_size=args.gallery_size,
                                    repeats=args.repeats)
        m = res["metrics"]
        rows.append({"variant": name, "run": str(run_dir), "head": head, "k": k, "rsum": m["rsum"],
                     "t2i_r1": m["t2i_r1"], "i2t_r1": m["i2t_r1"], "t2i_r5": m["t2i_r5"], "t2i_r10": m["t2i_r10"],
                     "i2t_r5": m["i2t_r5"], "i2t_r10": m["i2t_r10"], "seconds_per_query": spq,
                     "gallery_size": args.gallery_size, "seconds_per_query_large": spq_big,
                     "images": data.dataset.num_images, "texts": data.dataset.num_texts})
        log.info("%s: rsum %.1f, t2i R@1 %.1f, %.2f ms/query (%.2f ms with %d images)", name, m["rsum"],
                 m["t2i_r1"], 1e3 * spq, 1e3 * spq_big, args.gallery_size)
    return rows


def table(rows: list[dict]) -> str:
    n, big = rows[0]["images"], rows[0]["gallery_size"]
    lines = [f"| variant | rsum | i2t R@1 | i2t R@5 | i2t R@10 | t2i R@1 | t2i R@5 | t2i R@10 | "
             f"ms / query ({n} images) | ms / query ({big:,} images) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['variant']} | {r['rsum']:.1f} | {r['i2t_r1']:.1f} | {r['i2t_r5']:.1f} | "
                     f"{r['i2t_r10']:.1f} | {r['t2i_r1']:.1f} | {r['t2i_r5']:.1f} | {r['t2i_r10']:.1f} | "
                     f"{1e3 * r['seconds_per_query']:.2f} | {1e3 * r['seconds_per_query_large']:.2f} |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    ms = lambda r: 1e3 * r["seconds_per_query_large"]  # noqa: E731
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6), dpi=90)
    styles = {"alignment": ("tab:red", "s"), "matching (alone)": ("tab:gray", "v"),
              "matching (distilled)": ("tab:blue", "o")}
    two = [r for r in rows if r["k"]]
    for ax, key, label in ((axes[0], "rsum", "rsum"), (axes[1], "t2i_r1", "text-to-image R@1")):
        if two:
            ax.plot([ms(r) for r in two], [r[key] for r in two], "-D", color="tab:green",
                    label="two-stage (distilled matching top k, alignment re-rank)", markersize=5)
            for r in two:
                ax.annotate(f"k={r['k']}", (ms(r), r[key]), textcoords="offset points",
                            xytext=(4, -10), fontsize=7, color="tab:green")
        for r in rows:
            if r["k"]:
                continue
            color, marker = styles.get(r["variant"], ("black", "x"))
            ax.scatter([ms(r)], [r[key]], color=color, marker=marker, s=45, label=r["variant"],
                       zorder=3)
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel(f"ms per text query, {rows[0]['gallery_size']:,}-image gallery (log scale)")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=7, loc="lower right")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}.png")
    fig.savefig(tmp, dpi=90)
    plt.close(fig)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--alignment", help="run trained with the alignment head")
    p.add_argument("--from-json", default=None, help="only re-draw the table and plot of a previous --json")
    p.add_argument("--matching", default=None, help="run whose matching head was trained alone")
    p.add_argument("--distill", default=None, help="run whose matching head was distilled (two-stage too)")
    p.add_argument("--ks", type=int, nargs="+", default=[10, 20, 50, 100], help="two-stage shortlist sizes")
    p.add_argument("--split", default=None, help="split (default: the runs' test split)")
    p.add_argument("--lang", default=None)
    p.add_argument("--protocol", default="full")
    p.add_argument("--queries", type=int, default=None, help="time this many queries (default: all)")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads while timing")
    p.add_argument("--repeats", type=int, default=3, help="timing passes (the fastest median is kept)")
    p.add_argument("--gallery-size", type=int, default=5000,
                   help="also time queries against the split's images repeated up to this many (COCO 5K size)")
    p.add_argument("--png", default=None, help="write the plot here")
    p.add_argument("--json", default=None, help="write the rows here")
    p.add_argument("--title", default="ALADIN on the emoji test split (English): quality vs query time")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    if args.from_json:
        rows = json.loads(Path(args.from_json).read_text())
    elif args.alignment:
        rows = run(args)
    else:
        p.error("--alignment RUN is required (or --from-json)")
    print(table(rows))
    if args.json:
        from xmodal.utils import atomic_write_json

        atomic_write_json(Path(args.json), rows)
    if args.png:
        plot(rows, Path(args.png), args.title)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
