"""``xmodal demo [--out DIR] [--quick]``: train and evaluate on the embedded emoji data."""
from __future__ import annotations

import sys

from . import arguments, command


def _args(p) -> None:
    p.add_argument("--out", default="runs/demo", help="output folder (default runs/demo)")
    p.add_argument("--quick", action="store_true", help="smoke run (under 2 minutes)")
    p.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. train.steps=100")
    p.add_argument("--no-progress", action="store_true")


@command("demo", help="train and evaluate on the embedded emoji dataset (offline)")
@arguments(_args)
def run(args) -> int:
    from pathlib import Path

    from ..config import load_config

    # the overrides are checked before torch and the demo are imported: a typo answers at once
    name = "demo_quick.yaml" if args.quick else "demo.yaml"
    load_config(Path(__file__).resolve().parent.parent / "configs" / "emoji" / name, list(args.overrides))
    from ..demo import run_demo

    run_demo(args.out, quick=args.quick, overrides=tuple(args.overrides),
             progress=not args.no_progress and sys.stderr.isatty())
    return 0
