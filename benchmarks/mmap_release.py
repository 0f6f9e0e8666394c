"""What releasing a memory map's pages (``xmodal.index.pages``) costs and saves, against not releasing.

An exact ``Index`` of N x d float16 vectors is searched with its pages released after each block
(the default for maps >= ``RELEASE_MIN_BYTES``) and, in the same process, without releasing (the
reference); likewise the ``ivfpq`` re-scoring gather of 40 random rows a query. Printed: seconds
and the ratio (released / reference), and the growth of the process's file-backed RSS. Random
rows re-fault after a release (page faults ~20 us each here), so the gather pays for the bounded
RSS; a 1M-row map is not resident at the start of the reference either (its pages are mapped by
the first repeat: the reference's best-of is the fully mapped case).

    python benchmarks/mmap_release.py                  # 1M x 256 float16 (512 MB), 5 searches of 64 queries
    python benchmarks/mmap_release.py --dry-run        # tiny (tests/test_index_pages.py)
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def rss_file_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssFile:"):
                return int(line.split()[1]) / 1024
    return 0.0


def _measure(fn, repeats: int) -> tuple[float, float]:
    """Best-of seconds of ``fn`` and the file-backed RSS it left (MB)."""
    before, best = rss_file_mb(), float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best, rss_file_mb() - before


def run(n: int, dim: int, queries: int, repeats: int, min_bytes: int | None, folder: Path) -> dict:
    from xmodal.index import Index, pages
    from xmodal.index.pages import gather_rows

    rng = np.random.default_rng(0)
    path = folder / "bench.idx"
    with Index.create(path, dim=dim, dtype="float16") as index:
        for s in range(0, n, 100_000):
            x = rng.standard_normal((min(100_000, n - s), dim)).astype(np.float32)
            index.add(x / np.linalg.norm(x, axis=1, keepdims=True), [f"r{i}" for i in range(s, s + len(x))])
    q = rng.standard_normal((queries, dim)).astype(np.float32)
    picks = [rng.integers(0, n, 40) for _ in range(200)]
    default = pages.RELEASE_MIN_BYTES
    with Index.open(path, verify=False) as warm:
        warm.search(q[:1], 10)  # torch's libraries are mapped once, before any RSS is read
    out = {}
    for name, limit in (("reference (no release)", 1 << 60), ("released", default if min_bytes is None else min_bytes)):
        pages.RELEASE_MIN_BYTES = limit
        index = Index.open(path, verify=False)
        vecs = np.load(path / "vectors.npy", mmap_mode="r")
        search_s, search_mb = _measure(lambda: index.search(q, 10), repeats)
        gather_s, gather_mb = _measure(lambda: [gather_rows(vecs, r) for r in picks], repeats)
        out[name] = {"search_s": round(search_s, 4), "search_rss_file_mb": round(search_mb, 1),
                     "gather_40_rows_us": round(gather_s / len(picks) * 1e6, 1),
                     "gather_rss_file_mb": round(gather_mb, 1)}
        index.close()
        del index, vecs
    pages.RELEASE_MIN_BYTES = default
    ref, rel = out["reference (no release)"], out["released"]
    out["ratio released / reference"] = {"search": round(rel["search_s"] / ref["search_s"], 3),
                                         "gather": round(rel["gather_40_rows_us"] / ref["gather_40_rows_us"], 3)}
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--queries", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--dry-run", action="store_true", help="tiny sizes, pages released whatever the size")
    args = ap.parse_args(argv)
    if args.dry_run:
        args.n, args.dim, args.queries, args.repeats = 20_000, 32, 8, 2
    with tempfile.TemporaryDirectory(prefix="xmodal-mmap-") as tmp:
        res = run(args.n, args.dim, args.queries, args.repeats, 0 if args.dry_run else None, Path(tmp))
    print(json.dumps({"n": args.n, "dim": args.dim, "queries": args.queries, **res}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
