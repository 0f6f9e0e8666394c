"""``xmodal eval RUN [--split test] [--protocol P] [--json] [--report DIR]``.

Imports nothing heavy at module level (torch, numpy, matplotlib come in :func:`run`): building
the parser for ``xmodal --help`` must stay light.
"""
from __future__ import annotations

import json
import sys

from . import arguments, command


def _args(p) -> None:
    p.add_argument("run", help="run folder written by xmodal train (or the config of a model with nothing "
                                "to train, e.g. an ADAPT ensemble of finished runs)")
    p.add_argument("--split", default=None, help="split to evaluate (default: the config's test split)")
    p.add_argument("--protocol", default=None, help="full, coco1k, coco5k, f30k1k, recipe1k, recipe10k")
    p.add_argument("--lang", default=None, help="caption language (default: the config's eval_lang)")
    p.add_argument("--checkpoint", default="best", help="best, latest, or a checkpoint folder")
    p.add_argument("--rerank-k", type=int, default=None, help="two-stage shortlist size for pair scorers")
    p.add_argument("--first-stage", default=None, metavar="RUN",
                   help="an embedding model's run folder whose top --rerank-k the pair scorer re-ranks "
                        "(default: the pair scorer's own cheap first stage)")
    p.add_argument("--rerank-fusion", type=float, default=None, metavar="W",
                   help="order a re-ranked shortlist by pair score + W x first-stage score "
                        "(default: the config's eval.rerank_fusion, 0 = pair score alone)")
    p.add_argument("--report", default=None, help="write report.html / PNGs / metrics.json into this folder")
    p.add_argument("--json", action="store_true", help="print one JSON object with the metric keys")


@command("eval", help="evaluate a trained run on a split")
@arguments(_args)
def run(args) -> int:
    from ..eval.encode import evaluate_split
    from ..models import load
    from ..data.pipeline import prepare_split

    run_ = load(args.run, checkpoint=args.checkpoint)
    model, cfg = run_.model, run_.config
    split = args.split or cfg.data.test_split
    lang = args.lang or cfg.data.eval_lang
    progress = sys.stderr.isatty() and not args.json
    data = prepare_split(cfg, model, split, lang, progress=progress)
    rerank_k = cfg.eval.rerank_k if args.rerank_k is None else args.rerank_k
    first = None
    if args.first_stage:
        from ..errors import XmodalError
        from ..eval.encode import first_stage_for

        if not rerank_k:
            raise XmodalError("--first-stage shortlists for a re-ranker: give --rerank-k K (e.g. 100)")
        first_run = load(args.first_stage)
        first_data = prepare_split(first_run.config, first_run.model, split, lang, progress=progress)
        first = first_stage_for(first_run.model, first_data, data, progress=progress)
    res = evaluate_split(model, data, protocol=args.protocol or cfg.eval.protocol,
                         block_size=cfg.eval.block_size, progress=progress, return_ranks=bool(args.report),
                         rerank_k=rerank_k, first_stage=first,
                         rerank_fusion=cfg.eval.rerank_fusion if args.rerank_fusion is None else args.rerank_fusion)
    metrics = res["metrics"]
    if args.json:
        print(json.dumps(metrics))
    else:
        from ..eval.report import print_metrics

        print_metrics(metrics, title=f"{args.run}  split={split}  lang={lang}  ({res['seconds']:.1f} s)")
    if args.report:
        _write_report(args, run_, data, res, split=split, lang=lang, protocol=args.protocol or cfg.eval.protocol)
    return 0


def _write_report(args, run_, data, res, *, split: str, lang: str, protocol: str) -> None:
    """The report folder (run summary, curves, metrics, examples); its files are named on stderr,
    so that stdout stays the table or the one JSON line."""
    from ..demo import write_run_report

    extra = {"split": split, "caption language": lang, "protocol": protocol, "checkpoint asked for": args.checkpoint,
             "evaluation seconds": f"{res['seconds']:.1f}"}
    if args.rerank_k or args.first_stage:
        extra["re-ranking"] = {"rerank_k": args.rerank_k, "first stage": args.first_stage,
                               "fusion": args.rerank_fusion}
    files = write_run_report(args.report, run_, data, res, title=f"xmodal eval {args.run} ({split}, {lang})",
                             extra=extra, protocol=protocol)
    print(f"report: {files['html']}", file=sys.stderr)
    for key in ("metrics", "training_curves", "recall_curve", "queries"):
        if key in files:
            print(f"        {files[key]}", file=sys.stderr)
