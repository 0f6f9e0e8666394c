"""``xmodal synthesize SYN "a red apple" --out apple.png`` (or ``--image IMG``, or ``--evaluate``)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

from . import arguments, command


def _args(p) -> None:
    p.add_argument("syn", help="synthesis folder (xmodal train-synthesis RUN --out SYN)")
    p.add_argument("text", nargs="?", default=None, help="caption to draw")
    p.add_argument("--image", default=None, help="draw from this image's embedding instead of a caption")
    p.add_argument("--out", default=None, help="PNG to write (with --num > 1: a row of images)")
    p.add_argument("--num", type=int, default=1, help="images to draw (different noise), side by side")
    p.add_argument("--size", type=int, default=64, help="output size in pixels (upscaled from 64)")
    p.add_argument("--seed", type=int, default=0, help="noise seed")
    p.add_argument("--evaluate", action="store_true",
                   help="instead: R@K of synthesized vs real test images as caption queries")
    p.add_argument("--split", default=None, help="with --evaluate: split (default: the run's test split)")
    p.add_argument("--lang", default=None, help="with --evaluate: caption language (default: the run's eval_lang)")
    p.add_argument("--grid", default=None, help="with --evaluate: write a PNG grid of 12 test captions")
    p.add_argument("--judge", default=None,
                   help="with --evaluate: also score with this other trained run's towers (images and captions), "
                        "an independent judge of a generator trained against the run's own tower")
    p.add_argument("--json", action="store_true", help="with --evaluate: print one JSON object")


@command("synthesize", help="draw an image from a caption or image with a trained synthesis model")
@arguments(_args)
def run(args) -> int:
    from ..errors import XmodalError, where

    if not Path(args.syn).exists():  # before torch is imported
        raise XmodalError(f"{where(args.syn)}no such folder")
    if args.evaluate:
        from ..synthesis.evaluate import evaluate_synthesis

        res = evaluate_synthesis(args.syn, split=args.split, lang=args.lang, seed=args.seed, grid=args.grid,
                                 judge=args.judge, progress=sys.stderr.isatty() and not args.json)
        if args.json:
            print(json.dumps(res))
        else:
            from rich.console import Console

            from .train_synthesis import print_eval

            print_eval(Console(), res)
        return 0
    if args.judge:
        raise XmodalError("--judge goes with --evaluate")
    if (args.text is None) == (args.image is None):
        raise XmodalError("give a caption or --image IMG (one of them)")
    if not args.out:
        raise XmodalError("--out PNG is required")
    if args.num < 1 or args.size < 16:
        raise XmodalError("--num must be >= 1 and --size >= 16")
    import numpy as np
    import torch
    from PIL import Image

    from ..models import load
    from ..synthesis.train import load_synthesizer, synthesize
    from ..utils import atomic_write

    G, info = load_synthesizer(args.syn)
    model = load(info["run"]).model
    with torch.inference_mode():
        if args.image is not None:
            from ..data.images import open_image
            from ..models.image.efficientnet import resize_center_crop

            pixels = resize_center_crop(open_image(args.image), 64)[None]  # (1, 3, 64, 64)
            emb = model.encode_image(pixels).float()
        else:
            emb = model.encode_text([args.text]).float()  # (1, D)
    images = synthesize(G, emb.repeat(args.num, 1), seed=args.seed)  # (num, 64, 64, 3)
    row = np.concatenate(list(images), axis=1)  # (64, num * 64, 3)
    img = Image.fromarray(row).resize((args.size * args.num, args.size), Image.BICUBIC)
    atomic_write(Path(args.out), lambda p: img.save(p, format="PNG"))
    print(args.out)
    return 0
