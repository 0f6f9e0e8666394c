"""``xmodal retrieve-corpus INDEX corpus.txt --out vokens.jsonl [-k 5] [--batch-size 256] [--threads N]``.

Reading + encoding, searching and writing run overlapped (:class:`xmodal.search.corpus.CorpusPipeline`);
the summary reports sentences/s and each stage's busy seconds.
"""
from __future__ import annotations

import json
import sys

from . import arguments, command


def _args(p) -> None:
    p.add_argument("index", help="image index folder written by xmodal index")
    p.add_argument("corpus", help="UTF-8 text file, one sentence a line (empty lines are skipped)")
    p.add_argument("--out", required=True, help="JSON Lines output, one line per sentence")
    p.add_argument("-k", type=int, default=5, help="results per sentence (default 5)")
    p.add_argument("--batch-size", type=int, default=256, help="sentences encoded and committed at once")
    p.add_argument("--run", default=None, help="the run folder, if it moved since the index was built")
    p.add_argument("--overwrite", action="store_true",
                   help="start over even if OUT exists or an interrupted run could be resumed")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="torch intra-op threads of each stage (default: torch's; on a shared or small machine 1 "
                        "is often fastest, as encoding and search already run side by side)")


@command("retrieve-corpus", help="top-k images for every sentence of a text file (resumable; Vokenization)")
@arguments(_args)
def run(args) -> int:
    from pathlib import Path

    from ..errors import where, XmodalError

    # the arguments first, before torch is imported
    if not Path(args.corpus).is_file():
        raise XmodalError(f"{where(args.corpus)}no such corpus file")
    if args.batch_size < 1:
        raise XmodalError(f"--batch-size {args.batch_size}: must be a positive integer")
    if args.threads is not None and not 1 <= args.threads <= 1024:
        raise XmodalError(f"--threads {args.threads}: must be between 1 and 1024")
    from ..index import Index
    from ..search import check_k, retrieve_corpus
    from ..index.build import load_index_run
    index = Index.open(args.index)
    check_k(args.k, index)
    if index.modality != "image":
        print(f"note: {index.path} is a {index.modality} index: retrieving {index.modality}s per sentence",
              file=sys.stderr)
    run_ = load_index_run(index, args.run)
    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)
    progress = sys.stderr.isatty() and not args.no_progress
    summary = retrieve_corpus(index, run_, args.corpus, args.out, k=args.k, batch_size=args.batch_size,
                              overwrite=args.overwrite, progress=progress)
    if args.json:
        print(json.dumps(summary))
    else:
        resumed = f", resumed at line {summary['resumed_from_line']}" if summary["resumed_from_line"] else ""
        print(f"{summary['out']}: {summary['sentences']} sentences from {summary['lines']} lines, "
              f"top-{summary['k']} each{resumed} ({summary['new_sentences']} in {summary['seconds']:.1f} s, "
              f"{summary['sentences_per_s']:.0f} sentences/s; encoder busy {summary['stage_seconds']['encode']:.1f} s, "
              f"search {summary['stage_seconds']['search']:.1f} s, writing {summary['stage_seconds']['write']:.1f} s)")
    return 0
