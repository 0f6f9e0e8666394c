"""``xmodal export``: write a dataset xmodal reads as WebDataset tar shards.

    xmodal export --format webdataset --from-format F --from-path P --out DIR
        [--split S ...] [--shard-size N] [--data-arg KEY=VALUE ...] [--skip-missing] [--overwrite]

Each split goes to ``DIR/{split}/shard-000000.tar, ...`` (read back with
``data.format=webdataset``, ``data.path=DIR``). Shards are written to a temporary file and
renamed, so an interrupted export is resumed by running the same command again.
"""
from __future__ import annotations

import argparse
import sys

from . import arguments, command
from .options import key_values

FORMATS = ("webdataset",)


def _args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--format", choices=FORMATS, default="webdataset", help="output format (default: webdataset)")
    p.add_argument("--from-format", required=True, help="format of the dataset to export (table, foodiml, ...)")
    p.add_argument("--from-path", required=True, help="dataset file, folder or shard pattern")
    p.add_argument("--out", required=True, help="output folder; each split goes to OUT/SPLIT/")
    p.add_argument("--split", action="append", default=[], help="split to export (repeatable; default: all)")
    p.add_argument("--shard-size", type=int, default=1000, help="images per shard (default 1000)")
    p.add_argument("--data-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="extra option for the dataset reader (repeatable)")
    p.add_argument("--skip-missing", action="store_true",
                   help="leave out images whose file is missing (listed in the manifest) instead of failing")
    p.add_argument("--overwrite", action="store_true", help="replace shards of another export in the folder")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


@command("export", help="Write a dataset as WebDataset tar shards (resumable).")
@arguments(_args)
def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ..errors import ConfigError

    if args.shard_size < 1:
        raise ConfigError(f"--shard-size must be at least 1, got {args.shard_size}")
    options = key_values(args.data_arg)
    from ..data.base import load_dataset
    from ..data.inspect import split_names
    from ..data.webdataset import write_shards

    splits = args.split or split_names(args.from_format, Path(args.from_path))
    source = {"from_format": args.from_format, "from_path": str(args.from_path), "options": options}
    for split in splits:
        ds = load_dataset(args.from_format, args.from_path, split, **options)
        out = Path(args.out) / split
        print(f"exporting {ds.summary()} to {out}", file=sys.stderr)
        m = write_shards(ds, out, shard_size=args.shard_size, skip_missing=args.skip_missing,
                         overwrite=args.overwrite, progress=not args.no_progress, source=source)
        resumed = len(m["shards"]) - m.get("shards_written_this_run", len(m["shards"]))
        note = f" ({resumed} kept from an earlier run)" if resumed else ""
        print(f"{split}: {m['images']} images, {m['texts']} texts in {len(m['shards'])} shard(s){note}")
        if m["skipped_images"] or m["dropped_texts"]:
            print(f"{split}: left out {len(m['skipped_images'])} missing image(s) and {len(m['dropped_texts'])} "
                  f"text(s) without an image; listed in {out / 'manifest.json'}")
    return 0
