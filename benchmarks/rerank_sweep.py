"""Two-stage retrieval: quality and time of a pair scorer re-ranking a first stage's top k.

For every shortlist size ``k`` and fusion weight ``W`` (order = pair score + W x first-stage
score; ``W`` = 0 is the pair score alone), evaluates the pair-scorer run on one split with the
embedding run as first stage (:func:`xmodal.eval.encode.evaluate_split`, both directions,
the split's full metrics), next to the first stage alone, measured in the same process.
Seconds per query: the whole evaluation (encoding both sides, the first stage's embeddings
and the re-scoring) divided by the split's queries (captions + images); the ratio is against
the first stage alone, timed the same way. Each re-ranked row also counts the queries it gets
right first that the first stage alone did not (``+won``) and the reverse (``-lost``), per
direction, with the exact sign test's two-sided p (:func:`xmodal.eval.metrics.rank1_changes`):
an R@1 gain of a few queries is only worth reporting with its p.

    OMP_NUM_THREADS=2 python benchmarks/rerank_sweep.py --pair runs/iais_h4 --first runs/baseline \\
        --split val --ks 10 --fusions 5 10 20 30 40 60
    OMP_NUM_THREADS=2 python benchmarks/rerank_sweep.py --pair runs/iais_h4 --first runs/baseline \\
        --split test --ks 10 20 50 --fusions 0 60 --json rerank_test.json
"""
from __future__ import annotations

import argparse
import time

import torch


def main(argv: list[str] | None = None) -> int:
    from xmodal.eval.encode import evaluate_split, first_stage_for
    from xmodal.eval.metrics import rank1_changes
    from xmodal.models import load
    from xmodal.data.pipeline import prepare_split

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--pair", required=True, help="the pair scorer's run folder (ADAPT, ALADIN, a cross-encoder)")
    p.add_argument("--first", required=True, help="the embedding model's run folder (the first stage)")
    p.add_argument("--split", default=None, help="split (default: the pair run's test split)")
    p.add_argument("--lang", default=None, help="caption language (default: the pair run's eval_lang)")
    p.add_argument("--ks", type=int, nargs="+", default=[10, 20, 50], help="shortlist sizes")
    p.add_argument("--fusions", type=float, nargs="+", default=[0.0], help="fusion weights W")
    p.add_argument("--json", default=None, help="also write the rows here")
    args = p.parse_args(argv)

    pair_run, first_run = load(args.pair), load(args.first)
    pair, first_model, cfg = pair_run.model, first_run.model, pair_run.config
    split, lang = args.split or cfg.data.test_split, args.lang or cfg.data.eval_lang
    data = prepare_split(cfg, pair, split, lang, progress=False)
    first_data = prepare_split(first_run.config, first_model, split, lang, progress=False)
    queries = data.dataset.num_texts + data.dataset.num_images

    t0 = time.perf_counter()
    alone = evaluate_split(first_model, first_data, return_ranks=True)  # the reference: the first stage by itself
    t_alone = time.perf_counter() - t0
    t0 = time.perf_counter()
    first = first_stage_for(first_model, first_data, data)
    t_first = time.perf_counter() - t0
    rows = [{"what": "first stage alone", "k": None, "fusion": None, "s_per_query": t_alone / queries,
             "ratio": 1.0, "metrics": alone["metrics"]}]
    for k in args.ks:
        for w in args.fusions:
            res = evaluate_split(pair, data, rerank_k=k, first_stage=first, rerank_fusion=w, return_ranks=True)
            sec = res["seconds"] + t_first
            changes = {d: rank1_changes(alone[f"{d}_ranks"], res[f"{d}_ranks"], f"{d} ranks") for d in ("i2t", "t2i")}
            rows.append({"what": "re-ranked", "k": k, "fusion": w, "s_per_query": sec / queries,
                         "ratio": sec / t_alone, "metrics": res["metrics"], "rank1_changes": changes})

    print(f"{args.pair} re-ranking {args.first}: {split} ({lang}), {queries} queries, "
          f"{torch.get_num_threads()} threads")
    print(f"{'':18} {'k':>4} {'W':>5} {'i2t R@1':>8} {'t2i R@1':>8} {'i2t R@5':>8} {'t2i R@5':>8} "
          f"{'rsum':>7} {'s/query':>9} {'x alone':>8}  {'i2t R@1 +won/-lost (p)':>22}  {'t2i R@1 +won/-lost (p)':>22}")
    for r in rows:
        m = r["metrics"]
        k = "-" if r["k"] is None else str(r["k"])
        w = "-" if r["fusion"] is None else f"{r['fusion']:g}"
        print(f"{r['what']:18} {k:>4} {w:>5} {m['i2t_r1']:8.1f} {m['t2i_r1']:8.1f} {m['i2t_r5']:8.1f} "
              f"{m['t2i_r5']:8.1f} {m['rsum']:7.1f} {r['s_per_query']:9.4f} {r['ratio']:8.1f}"
              + "".join(f"  {_changes(r['rank1_changes'][d]):>22}" if "rank1_changes" in r else ""
                        for d in ("i2t", "t2i")))
    if args.json:
        from pathlib import Path

        from xmodal.utils import atomic_write_json

        atomic_write_json(Path(args.json), {"pair": args.pair, "first": args.first, "split": split, "lang": lang,
                                            "rows": rows})
    return 0


def _changes(c: dict) -> str:
    return f"+{c['won']}/-{c['lost']} (p {c['p']:.2f})"


if __name__ == "__main__":
    raise SystemExit(main())
