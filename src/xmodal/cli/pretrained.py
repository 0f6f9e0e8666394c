"""``xmodal pretrained SPEC --out RUN [--config CONFIG] [key=value ...]``.

Turns a pretrained dual encoder (``hf:NAME_OR_DIR``, ``open_clip:ARCH:PRETRAINED_OR_FILE``) into a
run folder without training: ``xmodal eval RUN``, ``index``, ``search``, ``serve`` and
``--first-stage RUN`` then take it (docs/pretrained.md). Only argparse-level imports here.
"""
from __future__ import annotations

import json

from . import arguments, command


def _args(p) -> None:
    p.add_argument("spec", help="hf:NAME_OR_DIR (a transformers CLIPModel, SiglipModel, ... on the hub or saved "
                                "with save_pretrained) or open_clip:ARCH:PRETRAINED_OR_FILE (needs open-clip-torch)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. data.format=karpathy data.path=DIR")
    p.add_argument("--out", required=True, help="run folder to create")
    p.add_argument("--config", default=None,
                   help="config to start from (default: configs/pretrained/zero_shot.yaml); its source, embed_dim "
                        "and loss are filled in from the model, e.g. configs/pretrained/clip_finetune.yaml")
    p.add_argument("--json", action="store_true", help="print a JSON summary")


@command("pretrained", help="turn a pretrained CLIP-family dual encoder into a run, without training")
@arguments(_args)
def run(args) -> int:
    from ..config import load_config
    from ..errors import XmodalError
    from ..train.pretrained import DEFAULT_CONFIG

    kind, _, rest = args.spec.partition(":")  # spec and config errors answer before torch is imported
    if kind not in ("hf", "open_clip") or not rest:
        raise XmodalError(f"SPEC: expected hf:NAME_OR_DIR or open_clip:ARCH:PRETRAINED_OR_FILE, got {args.spec!r}")
    load_config(args.config or DEFAULT_CONFIG, args.overrides)
    from ..train.pretrained import write_pretrained_run

    summary = write_pretrained_run(args.spec, args.out, args.config, args.overrides)
    if args.json:
        print(json.dumps(summary))
        return 0
    bias = f", bias {summary['logit_bias']:.3f}" if summary["logit_bias"] is not None else ""
    scale = f"{summary['logit_scale']:.3f}" if summary["logit_scale"] is not None else "none"
    print(f"run:     {summary['run']} ({summary['family']}, {summary['embed_dim']}-d embeddings)")
    print(f"source:  {summary['run_source']}")
    print(f"loss:    {summary['loss']} (logit scale {scale}{bias}), for xmodal train {summary['run']}/config.yaml")
    print(f"next:    xmodal eval {summary['run']} --split test")
    return 0
