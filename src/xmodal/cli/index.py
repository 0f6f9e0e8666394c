"""``xmodal index RUN --data SPEC --out INDEX [--modality image|text] [--backend B] [--add]``.

Under ``torchrun`` each process encodes a contiguous shard and rank 0 builds the one index
from them (see docs/distributed.md).
"""
from __future__ import annotations

import json
import sys

from . import arguments, command


def _args(p) -> None:
    p.add_argument("run", help="run folder written by xmodal train")
    p.add_argument("--data", required=True,
                   help="split:NAME (of the run's dataset), FORMAT:PATH[:SPLIT] (e.g. table:data.csv:test), "
                        "or a folder of images (.jpg/.jpeg/.png/.webp, searched recursively)")
    p.add_argument("--out", required=True, help="index folder to create (or extend with --add)")
    p.add_argument("--modality", choices=("image", "text"), default="image",
                   help="image: index images, for text queries (default); text: index captions, for image queries")
    p.add_argument("--backend", default=None, help="exact (default), flat, ivf, ivfpq or hnsw")
    p.add_argument("--memory-budget", default=None,
                   help="ivfpq: RAM the index build may use, e.g. 4GB (default 4GB); picks nlist and m")
    p.add_argument("--add", action="store_true", help="append to an existing index built by the same run")
    p.add_argument("--batch-size", type=int, default=256, help="items encoded at once")
    p.add_argument("--checkpoint", default="best", help="best, latest, or a checkpoint folder")
    p.add_argument("--lang", default=None, help="caption language (default: the run's eval_lang)")
    p.add_argument("--id-prefix", default=None,
                   help="prefix of the row ids (default: 'SPLIT/' for datasets, none for folders)")
    p.add_argument("--dtype", choices=("float32", "float16"), default="float32", help="vector storage")
    p.add_argument("--json", action="store_true", help="print a JSON summary")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


@command("index", help="encode a collection with a trained run into a searchable index folder")
@arguments(_args)
def run(args) -> int:
    from pathlib import Path

    from ..errors import XmodalError, where

    if not Path(args.run).exists():  # before torch is imported
        raise XmodalError(f"{where(args.run)}no such folder")
    if args.batch_size < 1:
        raise XmodalError(f"--batch-size {args.batch_size}: must be a positive integer")
    budget = None
    if args.memory_budget is not None and args.backend != "ivfpq":
        raise XmodalError(f"--memory-budget {args.memory_budget}: only applies to --backend ivfpq")
    if args.backend == "ivfpq" and not args.add:  # encode into an exact index, then compress it
        from ..index.ivfpq import parse_size

        budget = parse_size(args.memory_budget or "4GB")
    from ..index.build import build_index
    from ..distributed import env_from_environ, session

    progress = sys.stderr.isatty() and not args.no_progress
    options = dict(modality=args.modality, backend="exact" if budget else args.backend, add=args.add, batch_size=args.batch_size,
                   checkpoint=args.checkpoint, lang=args.lang, id_prefix=args.id_prefix, dtype=args.dtype,
                   progress=progress)
    if env_from_environ().enabled:  # launched by torchrun: one shard per process, one index by rank 0
        from ..index.sharded import build_index_sharded

        with session("cpu") as (env, device):
            res = build_index_sharded(args.run, args.data, args.out, env=env, device=device, **options)
        if not env.is_main:
            return 0
    else:
        res = build_index(args.run, args.data, args.out, **options)
    if budget:
        from ..index.large import convert_to_ivfpq

        convert_to_ivfpq(res.path, budget, report=lambda text: print(text, file=sys.stderr), progress=progress)
    for bad in res.skipped[:10]:
        print(f"skipped {bad['path']}: {bad['reason']}", file=sys.stderr)
    if len(res.skipped) > 10:
        print(f"... and {len(res.skipped) - 10} more unreadable images", file=sys.stderr)
    summary = {"index": str(res.path), "modality": res.modality, "added": res.added, "total": res.total,
               "skipped": len(res.skipped), "seconds": round(res.seconds, 2)}
    if args.json:
        print(json.dumps(summary))
    else:
        print(f"{res.path}: added {res.added} {res.modality}s ({res.total} in the index, "
              f"{len(res.skipped)} skipped) in {res.seconds:.1f} s")
    return 0
