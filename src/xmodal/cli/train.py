"""``xmodal train CONFIG --out RUN [key=value ...]``.

Several processes: ``torchrun --nproc-per-node N -m xmodal train CONFIG --out RUN``
(see docs/distributed.md); ``train.batch_size`` stays the global batch.

Only argparse-level imports at module level: the config is read and checked before the trainer
(torch) is imported, and the trainer checks the data before it loads a model or extracts features.
"""
from __future__ import annotations

import sys

from . import arguments, command


def _args(p) -> None:
    p.add_argument("config", help="YAML config (see configs/)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.lr=2e-4 train.steps=500")
    p.add_argument("--out", required=True, help="run folder (created)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its latest checkpoint")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


@command("train", help="train a model from a config")
@arguments(_args)
def run(args) -> int:
    from ..config import load_config

    cfg = load_config(args.config, args.overrides)  # config errors answer before torch is imported
    from rich.console import Console

    from ..distributed import env_from_environ
    from ..train.loop import train

    console = Console(stderr=True)
    summary = train(cfg, args.out, resume=args.resume, progress=not args.no_progress and sys.stderr.isatty(),
                    console=console)
    if not env_from_environ().is_main:
        return 0  # rank 0 reports for the run
    console.print(f"run:     {summary['run_dir']}")
    console.print(f"best:    {summary['run_dir']}/best (step {summary['best_step']})")
    tb = f", {summary['run_dir']}/tensorboard" if cfg.train.tensorboard else ""
    console.print(f"logs:    {summary['run_dir']}/metrics.jsonl{tb}")
    console.print(f"next:    xmodal eval {summary['run_dir']} --split test")
    return 0
