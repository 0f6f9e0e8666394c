"""``xmodal inspect``: what a dataset holds, per split (a table, or ``--json``).

    xmodal inspect --format F --path P [--split S ...] [--data-arg KEY=VALUE ...] [--json] [--no-check-files]

The FooDI-ML CSV, ``table`` files and WebDataset shards are streamed (see
:mod:`xmodal.data.inspect`), so the full 2.8-million-row FooDI-ML catalogue, or a folder of
shards, is inspected in bounded memory.
"""
from __future__ import annotations

import argparse
import json

from . import arguments, command
from .options import key_values

#: report rows shown in the table: (label, key, how to show the value)
_ROWS = (
    ("images", "images", "n"), ("distinct image files", "image_files", "n"), ("texts", "texts", "n"),
    ("positive pairs", "positive_pairs", "n"), ("captions per image", "captions_per_image", "dist"),
    ("positives per text", "positives_per_text", "dist"), ("rows per image file", "rows_per_image_file", "dist"),
    ("images without text", "images_without_text", "n"), ("texts without image", "texts_without_image", "n"),
    ("languages", "languages", "counts"), ("countries", "countries", "counts"),
    ("missing image files", "missing_files", "n"), ("rows missing a field", "rows_missing_fields", "n"),
    ("duplicate captions", ("duplicates", "captions"), "n"), ("duplicate image files", ("duplicates", "image_files"), "n"),
    ("duplicate image hashes", ("duplicates", "image_hashes"), "n"), ("duplicate pairs", ("duplicates", "pairs"), "n"),
)


def _args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--format", required=True, help="dataset format (foodiml, table, karpathy, webdataset, ...)")
    p.add_argument("--path", required=True, help="dataset file, folder or shard pattern")
    p.add_argument("--split", action="append", default=[], help="split to describe (repeatable; default: all)")
    p.add_argument("--data-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="extra option for the dataset reader (repeatable)")
    p.add_argument("--json", action="store_true", help="print the report as one JSON object")
    p.add_argument("--no-check-files", action="store_true", help="do not check that image files exist")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _cell(value, how: str) -> str:
    if value is None:
        return "-"
    if how == "dist":
        return f"{value['mean']:.3g} ({value['min']}-{value['max']})"
    if how == "counts":
        items = list(value.items())
        shown = ", ".join(f"{k} {v:,}" for k, v in items[:6])
        return shown + (f", +{len(items) - 6} more" if len(items) > 6 else "")
    return f"{value:,}"


def _has(stats: dict, key) -> bool:
    return key[1] in (stats.get(key[0]) or {}) if isinstance(key, tuple) else key in stats


def _get(stats: dict, key):
    if isinstance(key, tuple):
        return (stats.get(key[0]) or {}).get(key[1])
    return stats.get(key)


def print_report(report: dict) -> None:
    """The report as a rich table: one row per measure, one column per split."""
    from rich.console import Console
    from rich.table import Table

    splits = report["splits"]
    how = "streamed" if report.get("streamed") else "read with its reader"
    table = Table(title=f"{report['format']}: {report['path']} ({how})")
    table.add_column("mean (min-max) per item", no_wrap=True)
    for name in splits:
        table.add_column(name, justify="right")
    for label, key, kind in _ROWS:
        if not any(_has(s, key) for s in splits.values()):
            continue
        values = [_get(s, key) for s in splits.values()]
        if kind == "counts" and all(v is None for v in values):
            continue
        table.add_row(label, *(_cell(v, kind) for v in values))
    console = Console()
    console.print(table)
    for extra in ("rows", "duplicate_rows_dropped", "rows_without_subset"):
        if extra in report:
            console.print(f"{extra.replace('_', ' ')}: {report[extra]:,}")


@command("inspect", help="Describe a dataset: items per split, captions per image, languages, positives, "
                         "missing files, duplicates.")
@arguments(_args)
def run(args: argparse.Namespace) -> int:
    options = key_values(args.data_arg)
    from ..data.inspect import inspect_dataset

    report = inspect_dataset(args.format, args.path, splits=args.split or None, options=options,
                             check_files=not args.no_check_files, progress=not args.no_progress)
    if args.json:
        print(json.dumps(report, indent=2, ensure_ascii=False))
    else:
        print_report(report)
    return 0
