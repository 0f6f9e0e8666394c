"""``xmodal train-synthesis RUN --out SYN [--steps N] [--resume]``."""
from __future__ import annotations

import sys
from pathlib import Path

from . import arguments, command


def _args(p) -> None:
    p.add_argument("run", help="trained retrieval run (xmodal train --out RUN); its embeddings condition the generator")
    p.add_argument("--out", required=True, help="synthesis folder (created)")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps (default 500)")
    p.add_argument("--batch-size", type=int, default=None, help="batch size (default 32)")
    p.add_argument("--lr", type=float, default=None, help="Adam learning rate of G and D (default 2e-4)")
    p.add_argument("--l1-weight", type=float, default=None,
                   help="weight of the L1 term to the paired real image (default 50; 0 = conditional GAN only)")
    p.add_argument("--kl-weight", type=float, default=None, help="conditioning-augmentation KL weight (default 0.02)")
    p.add_argument("--text-condition", type=float, default=None,
                   help="fraction of samples conditioned on a caption instead of the image (default 0.5)")
    p.add_argument("--retrieval-weight", type=float, default=None,
                   help="weight of the retrieval-consistency term: the run's frozen image tower embeds each "
                        "synthesized image, InfoNCE pulls it to its condition (default 1; 0 = GAN + L1 only)")
    p.add_argument("--retrieval-temperature", type=float, default=None, help="its InfoNCE temperature (default 0.1)")
    p.add_argument("--retrieval-batch", type=int, default=None,
                   help="synthesized images per step through the image tower (default 8; 0 = the whole batch)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    p.add_argument("--no-eval", action="store_true",
                   help="skip the synthesized-image retrieval check on the test split")
    p.add_argument("--grid", default=None, help="also write a PNG grid of synthesized vs real test images")
    p.add_argument("--judge", default=None,
                   help="also score the check with this other trained run's towers (an independent judge)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


@command("train-synthesis", help="train a conditional image generator on a run's embeddings (X-MRS)")
@arguments(_args)
def run(args) -> int:
    from ..errors import XmodalError, where

    if not Path(args.run).exists():  # before torch is imported
        raise XmodalError(f"{where(args.run)}no such folder")
    from rich.console import Console

    from ..synthesis.train import SynthesisConfig, train_synthesis

    overrides = {k: v for k, v in {"steps": args.steps, "batch_size": args.batch_size, "lr": args.lr,
                                   "l1_weight": args.l1_weight, "kl_weight": args.kl_weight,
                                   "text_condition": args.text_condition,
                                   "retrieval_weight": args.retrieval_weight,
                                   "retrieval_temperature": args.retrieval_temperature,
                                   "retrieval_batch": args.retrieval_batch,
                                   "seed": args.seed}.items() if v is not None}
    cfg = SynthesisConfig.from_dict(overrides)
    console = Console(stderr=True)
    progress = not args.no_progress and sys.stderr.isatty()
    summary = train_synthesis(args.run, args.out, cfg, resume=args.resume, progress=progress, console=console)
    console.print(f"synthesis: {summary['out']} ({summary['steps']} steps)")
    if not args.no_eval:
        from ..synthesis.evaluate import evaluate_synthesis
        from ..utils import atomic_write_json

        res = evaluate_synthesis(args.out, grid=args.grid, judge=args.judge, progress=progress)
        atomic_write_json(Path(args.out) / "eval.json", res)
        print_eval(console, res)
    console.print(f'next:    xmodal synthesize {args.out} "a red apple" --out apple.png')
    return 0


def print_eval(console, res: dict) -> None:
    console.print(f"image -> caption retrieval on {res['split']} ({res['lang']}, {res['captions']} captions):")
    for name in ("synthesized", "real"):
        m = res[name]
        console.print(f"  {name:>11} queries: R@1 {m['r1']:.1f}  R@5 {m['r5']:.1f}  R@10 {m['r10']:.1f}  "
                      f"medR {m['medr']:.0f}")
    if res.get("judge"):
        console.print(f"judged by {res['judge']['run']} (its towers embed images and captions):")
        for name in ("synthesized", "real"):
            m = res["judge"][name]
            console.print(f"  {name:>11} queries: R@1 {m['r1']:.1f}  R@5 {m['r5']:.1f}  R@10 {m['r10']:.1f}  "
                          f"medR {m['medr']:.0f}")
    if res.get("grid"):
        console.print(f"grid:    {res['grid']}")
