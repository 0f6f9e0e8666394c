"""``xmodal search INDEX "query text" [-k 10] [--json]`` / ``xmodal search INDEX --image photo.png``."""
from __future__ import annotations

import json
import sys

from . import arguments, command


def _args(p) -> None:
    p.add_argument("index", help="index folder written by xmodal index")
    p.add_argument("query", nargs="?", default=None, help="query text")
    p.add_argument("--image", default=None, help="query with an image file instead of text")
    p.add_argument("-k", type=int, default=10, help="number of results (default 10)")
    p.add_argument("--run", default=None, help="the run folder, if it moved since the index was built")
    rerank_arguments(p)
    p.add_argument("--json", action="store_true", help='print {"query": ..., "results": [...]} as JSON')


def rerank_arguments(p) -> None:
    """``--rerank RUN``, ``--rerank-k K``, ``--rerank-fusion W``: two-stage search (search and serve)."""
    p.add_argument("--rerank", default=None, metavar="RUN",
                   help="a pair scorer's run folder (ADAPT, ALADIN alignment, a cross-encoder) that re-orders "
                        "each search's shortlist")
    p.add_argument("--rerank-k", type=int, default=100, help="shortlist size re-ranked by --rerank (default 100)")
    p.add_argument("--rerank-fusion", type=float, default=None, metavar="W",
                   help="order by pair score + W x index score (default: the --rerank run's eval.rerank_fusion)")


def _file(rec: dict) -> str:
    """The result's image file, when it has a real one (the emoji dataset's paths are virtual)."""
    from ..index.build import EMOJI_MARK

    path = rec.get("path")
    return str(path) if isinstance(path, str) and path and EMOJI_MARK not in path else ""


def _print_table(title: str, results: list[dict]) -> None:
    """rank, score, id, caption / name (and the image file, for rows that have one)."""
    from rich.console import Console
    from rich.table import Table

    from ..search.query import result_label

    files = [_file(rec) for rec in results]
    table = Table(title=title)
    table.add_column("rank", justify="right")
    table.add_column("score", justify="right")
    table.add_column("id", overflow="fold")
    table.add_column("caption / name", overflow="fold")
    if any(files):
        table.add_column("file", overflow="fold")
    for rec, file in zip(results, files):
        row = [str(rec["rank"]), f"{rec['score']:.4f}", str(rec["id"]), rec.get("label") or result_label(rec)]
        table.add_row(*(row + [file] if any(files) else row))
    Console().print(table)


@command("search", help="search an index with a text (or --image) query")
@arguments(_args)
def run(args) -> int:
    from ..errors import XmodalError
    from ..index import Index
    from ..search import Reranker, check_k, search_image, search_text
    from ..index.build import load_index_run

    if args.query is not None and args.image is not None:
        raise XmodalError("give a query text or --image, not both")
    if args.image is None and (args.query is None or not args.query.strip()):
        raise XmodalError("empty query: give some text, or --image PATH")
    if args.image is not None:
        from pathlib import Path

        from ..data.images import open_image

        open_image(Path(args.image))  # a missing or unreadable image fails before any model loads
    index = Index.open(args.index)
    check_k(args.k, index)
    query_modality = "image" if args.image is not None else "text"
    run_ = load_index_run(index, args.run)
    reranker = None
    if args.rerank is not None:
        from ..models import load

        reranker = Reranker(load(args.rerank), k=args.rerank_k, fusion=args.rerank_fusion)
    if args.image is not None:
        results = search_image(index, run_, args.image, args.k, reranker=reranker)
        query = {"image": args.image}
    else:
        results = search_text(index, run_, args.query, args.k, reranker=reranker)
        query = args.query
    if index.modality == query_modality:
        # same-modality search is well defined (nearest neighbours in the shared space), but
        # rarely what a cross-modal index was built for: say so rather than refuse
        print(f"note: {query_modality} query against {'an' if index.modality == 'image' else 'a'} "
              f"{index.modality} index: {query_modality}-to-{index.modality} similarity search", file=sys.stderr)
    if args.json:
        print(json.dumps({"query": query, "query_modality": query_modality, "index": str(index.path),
                          "index_modality": index.modality, "results": results}, ensure_ascii=False))
        return 0
    _print_table(f"{index.path}: {args.image or args.query!r}", results)
    return 0
