"""How time and peak memory grow with size: each workload at 1/10 and at full size.

Stages (synthetic data shaped like each workload, written to disk streamed, never held whole):

* ``foodiml``  - a FooDI-ML-shaped CSV (2.8M rows), read with ``xmodal.data.foodiml.read`` (train split);
* ``recipe1m`` - Recipe1M-shaped ``layer1.json`` / ``layer2.json`` (1M recipes), read with
  ``xmodal.data.recipe1m.read`` (train partition);
* ``vectors``  - 10M x 256 clustered unit vectors (float16 storage) into an ``ivfpq`` index,
  added in chunks read from the source with plain reads (one commit each); recall@10 against
  exact (streamed from the index's ``vectors.npy`` the same way) on held-out queries and
  single-query latency (p50/p99);
* ``corpus``   - ``retrieve_corpus`` over a 1M-sentence corpus (random-init BiGRU text tower,
  exact index of 100k images);
* ``eval``     - exact streaming evaluation (``ranks_from_embeddings``) of 100k images x 500k
  captions x 256 (1.28e13 multiply-adds; 558 CPU s, 1,306 s wall under load here). ``--eval-images`` evaluates
  fewer images against all 500k captions with the full inputs in memory and extrapolates the
  time linearly in the images (labelled as such).

The 1/10 size divides each workload's own size (``WORKLOAD_AXIS``: rows, recipes, vectors,
sentences, captions) and keeps the rest at full size, so it is 1/10 of the work and "full
within 12x of 1/10" measures growth with that size; ``--sizes tenth-both`` adds the older
figure for ``eval``/``corpus`` (images divided too: 1/100 of the work).

Each (stage, size) runs in its own subprocess; its wall time and peak RSS (``wait4``'s
``ru_maxrss``) are measured by the parent, which also samples ``/proc/PID/status`` for the
anonymous (``RssAnon``) and file-backed (``RssFile``, memory-mapped pages the kernel can drop)
parts. Results go to ``OUT/scale.json``. Ratios are full / tenth measured in the same run.

    python benchmarks/scale.py --dry-run                    # tiny sizes, seconds (in the test suite)
    python benchmarks/scale.py --stages vectors --out /tmp/scale
    python benchmarks/scale.py --sizes tenth                # only the 1/10 sizes
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
STAGES = ("foodiml", "recipe1m", "vectors", "corpus", "eval")
#: full sizes; 1/10 divides the first number of each
FULL = {"foodiml": {"rows": 2_800_000}, "recipe1m": {"recipes": 1_000_000},
        "vectors": {"n": 10_000_000, "dim": 256, "queries": 10_000},
        "corpus": {"sentences": 1_000_000, "images": 100_000, "dim": 256},
        "eval": {"images": 100_000, "captions": 500_000, "dim": 256}}
DRY = {"foodiml": {"rows": 4_000}, "recipe1m": {"recipes": 2_000},
       "vectors": {"n": 20_000, "dim": 16, "queries": 200},
       "corpus": {"sentences": 2_000, "images": 1_000, "dim": 32},
       "eval": {"images": 400, "captions": 2_000, "dim": 32}}
SIZES = ("tenth", "full", "tenth-both")
#: the axis that is the workload's size (what the 12x goal scales by 10); the others stay at full size
WORKLOAD_AXIS = {"foodiml": "rows", "recipe1m": "recipes", "vectors": "n", "corpus": "sentences",
                 "eval": "captions"}
WORDS = ("chicken rice salad tomato cheese pizza burger sauce fresh spicy grilled beef soup "
         "noodles garlic lemon chocolate cake cream onion pepper sweet fried pork tofu bread "
         "egg potato green red basil mushroom bacon honey vanilla apple orange mango").split()


# ---------------------------------------------------------------------------------------------
# sizes


def stage_size(stage: str, size: str, dry: bool, full_n: int | None = None) -> dict:
    """The parameters of ``stage`` at ``size`` (one of :data:`SIZES`); ``full_n`` replaces the full vector count.

    ``tenth`` divides the workload's own size, :data:`WORKLOAD_AXIS`, by 10 (1/10 of the work):
    for ``eval`` the captions (t2i: 1/10 of the queries over every image; i2t: every image over
    1/10 of the captions), for ``corpus`` the sentences (against the same full image index).
    ``tenth-both`` (``eval`` and ``corpus`` only) also divides the images: 1/100 of the work.
    """
    if size not in SIZES:
        raise ValueError(f"size {size!r}: choose one of {', '.join(SIZES)}")
    base = dict((DRY if dry else FULL)[stage])
    if stage == "vectors" and full_n:
        base["n"] = full_n
    if size in ("tenth", "tenth-both"):
        base[WORKLOAD_AXIS[stage]] //= 10
    if size == "tenth-both" and stage in ("eval", "corpus"):
        base["images"] //= 10
    return base


# ---------------------------------------------------------------------------------------------
# synthetic data, streamed to disk


def _sentence(rng: np.random.Generator, lo: int, hi: int) -> str:
    return " ".join(WORDS[i] for i in rng.integers(0, len(WORDS), rng.integers(lo, hi)))


def gen_foodiml(path: Path, rows: int, seed: int = 0) -> None:
    """A FooDI-ML CSV: 9 columns, ~35% repeated products (same text, other stores), 80/10/10 splits."""
    rng = np.random.default_rng(seed)
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["country_code", "city_code", "store_name", "product_name", "collection_section",
                    "product_description", "subset", "HIER", "s3_path"])
        for start in range(0, rows, 50_000):
            m = min(50_000, rows - start)
            sub = rng.choice(["train", "val", "test"], size=m, p=[0.8, 0.1, 0.1])
            prod = rng.integers(0, max(1, rows * 2 // 3), m)
            for i in range(m):
                r = np.random.default_rng(int(prod[i]))
                w.writerow(["ES", "BCN", f"store {start + i} ", _sentence(r, 2, 5), _sentence(r, 1, 3),
                            _sentence(r, 0, 25), sub[i], "False", f"dataset/{start + i:08d}.png"])


def gen_recipe1m(folder: Path, recipes: int, seed: int = 0) -> None:
    """layer1.json (title, ~9 ingredients, ~10 instructions) and layer2.json (60% with 1-5 images)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    parts = rng.choice(["train", "val", "test"], size=recipes, p=[0.7, 0.15, 0.15])
    with open(folder / "layer1.json", "w") as l1, open(folder / "layer2.json", "w") as l2:
        l1.write("[")
        l2.write("[")
        first2 = True
        for i in range(recipes):
            rid = f"{i:010x}"
            rec = {"id": rid, "title": _sentence(rng, 2, 6),
                   "ingredients": [{"text": _sentence(rng, 2, 6)} for _ in range(rng.integers(4, 14))],
                   "instructions": [{"text": _sentence(rng, 8, 30)} for _ in range(rng.integers(4, 16))],
                   "partition": str(parts[i]), "url": f"http://www.example.com/recipe/{rid}"}
            l1.write(("," if i else "") + json.dumps(rec))
            if rng.random() < 0.6:
                ims = [{"id": f"{i:010x}{j}.jpg", "url": f"http://example.com/{i}/{j}.jpg"}
                       for j in range(rng.integers(1, 6))]
                l2.write(("" if first2 else ",") + json.dumps({"id": rid, "images": ims}))
                first2 = False
        l1.write("]")
        l2.write("]")


def gen_vectors(path: Path, n: int, dim: int, queries: int, dtype: str = "float16") -> None:
    """``n + queries`` clustered unit vectors (benchmarks/search_speed.py's generator) into one .npy."""
    sys.path.insert(0, str(HERE))
    from search_speed import clustered_vectors

    total = n + queries
    out = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=(total, dim))
    row = 0
    for x in clustered_vectors(total, dim, clusters=max(10, min(1000, total // 1000)), seed=0):
        out[row:row + len(x)] = x
        row += len(x)
    out.flush()
    del out


def gen_corpus(path: Path, sentences: int, seed: int = 0) -> None:
    """One caption-like sentence a line (a few empty lines, as real corpora have)."""
    rng = np.random.default_rng(seed)
    with open(path, "w", encoding="utf-8") as f:
        for start in range(0, sentences, 100_000):
            m = min(100_000, sentences - start)
            f.write("".join(_sentence(rng, 3, 16) + "\n" for _ in range(m)))


def generate(stage: str, work: Path, p: dict) -> dict:
    """Write the stage's input under ``work``; returns the paths the child needs."""
    work.mkdir(parents=True, exist_ok=True)
    if stage == "foodiml":
        gen_foodiml(work / "foodiml.csv", p["rows"])
        return {"data": str(work / "foodiml.csv")}
    if stage == "recipe1m":
        gen_recipe1m(work / "recipe1m", p["recipes"])
        return {"data": str(work / "recipe1m")}
    if stage == "vectors":
        gen_vectors(work / "vectors.npy", p["n"], p["dim"], p["queries"])
        return {"data": str(work / "vectors.npy")}
    if stage == "corpus":
        gen_corpus(work / "corpus.txt", p["sentences"])
        gen_vectors(work / "images.npy", p["images"], p["dim"], 0, dtype="float32")
        return {"data": str(work / "corpus.txt"), "images": str(work / "images.npy")}
    return {}


# ---------------------------------------------------------------------------------------------
# the stages (run in a child process)


def run_foodiml(p: dict, paths: dict, opts: dict) -> dict:
    from xmodal.data.foodiml import read

    ds = read(paths["data"], "train")
    return {"texts": len(ds.text_ids), "images": len(ds.image_ids), "positives": int(ds.gt.nnz)
            if hasattr(ds.gt, "nnz") else None}


def run_recipe1m(p: dict, paths: dict, opts: dict) -> dict:
    from xmodal.data.recipe1m import read

    ds = read(paths["data"], "train")
    return {"texts": len(ds.text_ids), "images": len(ds.image_ids)}


def _timed(fn, *a, **k):
    t0 = time.perf_counter()
    out = fn(*a, **k)
    return out, time.perf_counter() - t0


def run_vectors(p: dict, paths: dict, opts: dict) -> dict:
    """Build an ivfpq index from the source file in chunks, then recall@10 vs exact and latency.

    The source is read with plain reads (``NpyRows``, page cache dropped as it goes) and the
    exact ground truth streams the index's ``vectors.npy`` the same way, so neither leaves
    file pages in this process's RSS; the index's own reads release theirs (``index.pages``).
    """
    from xmodal.index import Index, exact_search
    from xmodal.index.ivfpq import describe_estimate, estimate_memory
    from xmodal.index.pages import NpyRows

    src = NpyRows(paths["data"], drop_cache=True)
    n, nq, dim = p["n"], opts.get("queries") or p["queries"], p["dim"]
    params = opts["ivfpq_params"]
    est = estimate_memory(n, dim, params)
    print(describe_estimate(n, dim, params, est), flush=True)
    out = Path(opts["work"]) / "vectors.idx"
    chunk = -(-n // opts["chunks"])
    t0 = time.perf_counter()
    index = Index.create(out, dim=dim, backend="ivfpq", backend_args=params, dtype="float16", overwrite=True)
    for s in range(0, n, chunk):
        e = min(n, s + chunk)
        index.add(src.read(s, e), [f"v{r}" for r in range(s, e)])
        index.commit()  # frees the added rows: they are read back from the memory map from now on
        print(f"vectors: committed {e:,} of {n:,} rows at {time.perf_counter() - t0:.1f}s", flush=True)
    build_s = time.perf_counter() - t0
    index.close()
    del index
    queries = src.read(n, n + nq).astype(np.float32)
    src.close()
    with NpyRows(out / "vectors.npy", reuse_buffer=True) as stored:
        (_, truth), exact_s = _timed(exact_search, queries, stored, 10, block_size=65536)
    print(f"vectors: exact ground truth of {nq:,} queries in {exact_s:.1f}s", flush=True)
    index = Index.open(out, verify=False)
    (_, found), batch_s = _timed(index.search, queries, 10)
    recall = float(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(found.tolist(), truth.tolist())]))
    lat = []
    for q in queries[:opts["latency_queries"]]:
        t = time.perf_counter()
        index.search(q, 10)
        lat.append(time.perf_counter() - t)
    lat_ms = np.array(lat[3:] or lat) * 1e3
    return {"build_s": round(build_s, 2), "exact_ground_truth_s": round(exact_s, 2),
            "ivfpq_batch_search_s": round(batch_s, 3), "recall_at_10": round(recall, 4),
            "latency_p50_ms": round(float(np.percentile(lat_ms, 50)), 3),
            "latency_p99_ms": round(float(np.percentile(lat_ms, 99)), 3), "latency_queries": len(lat_ms),
            "params": index.backend_args, "backend_info": index._backend.info(),
            "estimate_bytes": est}


def _text_model(corpus: Path, dim: int):
    """A dual encoder with a random-init BiGRU text tower (tokenizer trained on 20k corpus lines)."""
    from itertools import islice

    from xmodal.config import load_config
    from xmodal.models.run import create_model
    from xmodal.models.text.bigru import train_tokenizer

    tok = corpus.parent / "tokenizer.json"
    with open(corpus, encoding="utf-8") as f:
        train_tokenizer(islice(f, 20_000), vocab_size=5000, path=tok)
    cfg = load_config(None, ["model.type=dual_encoder", f"model.embed_dim={dim}",
                             "model.image.name=features", "model.image.args={in_dim: 16, out_dim: 64, pooling: mean}",
                             "model.text.name=bigru",
                             f"model.text.args={{tokenizer_path: {tok}, word_dim: 64, out_dim: 128}}"])
    return create_model(cfg.model).eval()


def run_corpus(p: dict, paths: dict, opts: dict) -> dict:
    from xmodal.index import Index
    from xmodal.search.corpus import retrieve_corpus

    vecs = np.load(paths["images"], mmap_mode="r")
    out = Path(opts["work"]) / "images.idx"
    with Index.create(out, dim=p["dim"], backend="exact", overwrite=True) as index:
        index.add(vecs, [f"img{i}" for i in range(len(vecs))])
    model = _text_model(Path(paths["data"]), p["dim"])
    index = Index.open(out, verify=False)
    res = retrieve_corpus(index, model, paths["data"], Path(opts["work"]) / "corpus.jsonl", k=5,
                          batch_size=512, overwrite=True)
    return {k: res[k] for k in ("sentences", "seconds", "sentences_per_s", "output_bytes")}


def run_eval(p: dict, paths: dict, opts: dict) -> dict:
    """Exact evaluation; at full size, ``eval_images`` images against every caption (extrapolated)."""
    import torch

    from xmodal.eval.metrics import metrics_from_ranks, ranks_from_embeddings

    g = torch.Generator().manual_seed(0)
    img = torch.nn.functional.normalize(torch.randn(p["images"], p["dim"], generator=g), dim=1)
    txt = torch.nn.functional.normalize(torch.randn(p["captions"], p["dim"], generator=g), dim=1)
    n_img = min(p["images"], opts.get("eval_images") or p["images"])
    gt = np.arange(p["captions"]) % n_img  # every caption's image inside the evaluated subset
    t0 = time.perf_counter()
    i2t, t2i = ranks_from_embeddings(img[:n_img], txt, gt)
    secs = time.perf_counter() - t0
    out = {"evaluated_images": n_img, "captions": p["captions"], "seconds": round(secs, 3),
           "rsum": round(metrics_from_ranks(i2t, t2i)["rsum"], 3)}
    if n_img < p["images"]:
        out["extrapolated_full_seconds"] = round(secs * p["images"] / n_img, 3)
        out["extrapolation"] = "linear in images: the work is images x captions x dim"
    return out


RUNNERS = {"foodiml": run_foodiml, "recipe1m": run_recipe1m, "vectors": run_vectors,
           "corpus": run_corpus, "eval": run_eval}


def child_main(spec_path: str) -> None:
    import logging

    # the library's own timings (e.g. "trained ivfpq ... in 212.3s") go to the log
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    spec = json.loads(Path(spec_path).read_text())
    t0 = time.perf_counter()
    res = RUNNERS[spec["stage"]](spec["params"], spec["paths"], spec["opts"])
    res["child_seconds"] = round(time.perf_counter() - t0, 3)
    Path(spec["result"]).write_text(json.dumps(res))


# ---------------------------------------------------------------------------------------------
# the parent: one child per (stage, size), measured from outside


def _status_kb(pid: int) -> dict[str, int]:
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in ("VmRSS", "RssAnon", "RssFile"):
                    out[key] = int(rest.split()[0])
    except OSError:
        pass
    return out


def measure(cmd: list[str], timeout: float | None) -> dict:
    """Run ``cmd``; wall time, exit code, ``ru_maxrss`` and sampled peak RssAnon / RssFile (MB)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd)
    peaks = {"RssAnon": 0, "RssFile": 0}
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            for k, v in _status_kb(proc.pid).items():
                if k in peaks:
                    peaks[k] = max(peaks[k], v)
            done.wait(0.2)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    timer = threading.Timer(timeout, proc.kill) if timeout else None
    if timer:
        timer.start()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    done.set()
    th.join()
    if timer:
        timer.cancel()
    proc.returncode = os.waitstatus_to_exitcode(status)
    return {"wall_s": round(wall, 2), "rc": proc.returncode, "peak_rss_mb": round(usage.ru_maxrss / 1024, 1),
            "peak_anon_mb": round(peaks["RssAnon"] / 1024, 1), "peak_file_mb": round(peaks["RssFile"] / 1024, 1),
            "cpu_s": round(usage.ru_utime + usage.ru_stime, 1)}


def run_stage(stage: str, size: str, args: argparse.Namespace, root: Path) -> dict:
    p = stage_size(stage, size, args.dry_run, args.vectors_n)
    work = root / f"{stage}-{size}"
    t0 = time.perf_counter()
    paths = generate(stage, work, p)
    gen_s = time.perf_counter() - t0
    opts = {"work": str(work), "chunks": 4, "latency_queries": min(p.get("queries", 0), args.latency_queries),
            "eval_images": args.eval_images if size == "full" else None,
            "queries": args.full_queries if size == "full" else None}
    if stage == "vectors":
        from xmodal.index.ivfpq import choose_params

        full = stage_size(stage, "full", args.dry_run, args.vectors_n)
        # the full size's plan at both sizes, so that the ratio measures growth with n alone
        opts["ivfpq_params"] = choose_params(full["n"], full["dim"], args.memory_budget, opq=not args.no_opq)
    spec = {"stage": stage, "size": size, "params": p, "paths": paths, "opts": opts,
            "result": str(work / "result.json")}
    (work / "spec.json").write_text(json.dumps(spec))
    m = measure([sys.executable, str(Path(__file__).resolve()), "--child", str(work / "spec.json")], args.timeout)
    res = {"stage": stage, "size": size, "params": p, "generate_s": round(gen_s, 2), **m}
    if m["rc"] == 0:
        res["result"] = json.loads((work / "result.json").read_text())
    return res


def _ratio(a: float, b: float) -> float:
    return round(b / max(a, 1e-9), 2)


def ratios(results: list[dict]) -> dict:
    """full / tenth wall time, CPU time and peak RSS for every stage measured at both sizes.

    A full ``eval`` that evaluated only ``--eval-images`` images is compared by its
    extrapolated seconds against the tenth's seconds inside the child (``work_ratio``, marked
    ``extrapolated``); ``tenth-both`` rows add ``*_vs_tenth_both`` ratios (1/100 of the work).
    """
    by = {(r["stage"], r["size"]): r for r in results if r["rc"] == 0}
    out = {}
    for stage in STAGES:
        b = by.get((stage, "full"))
        for size, tag in (("tenth", ""), ("tenth-both", "_vs_tenth_both")):
            a = by.get((stage, size))
            if not (a and b):
                continue
            # CPU seconds too: on a shared machine the wall time also measures the neighbours
            r = {"time_ratio" + tag: _ratio(a["wall_s"], b["wall_s"]),
                 "cpu_ratio" + tag: _ratio(a["cpu_s"], b["cpu_s"]),
                 "rss_ratio" + tag: _ratio(a["peak_rss_mb"], b["peak_rss_mb"])}
            full_s = b.get("result", {}).get("extrapolated_full_seconds")
            if full_s is not None:
                r["work_ratio" + tag] = _ratio(a["result"]["seconds"], full_s)
                r["extrapolated"] = True
            out.setdefault(stage, {}).update(r)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--dry-run", action="store_true", help="tiny sizes (seconds); exercised by the tests")
    ap.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated, from {', '.join(STAGES)}")
    ap.add_argument("--sizes", default="tenth,full",
                    help="comma-separated, from tenth (1/10 of the workload axis), full, tenth-both "
                         "(eval/corpus: the images too, 1/100 of the work)")
    ap.add_argument("--out", default=None, help="folder for scale.json (default: a temporary folder)")
    ap.add_argument("--work", default=None, help="folder for the synthetic data (default: temporary)")
    ap.add_argument("--memory-budget", default="4GB", help="for choose_params of the ivfpq index")
    ap.add_argument("--latency-queries", type=int, default=2000, help="queries timed one at a time")
    ap.add_argument("--eval-images", type=int, default=None,
                    help="images evaluated at full eval size, time extrapolated to all of them "
                         "(default: all 100k, ~20 CPU minutes)")
    ap.add_argument("--vectors-n", type=int, default=None,
                    help="full size of the vectors stage (default 10M; the 1/10 size follows)")
    ap.add_argument("--full-queries", type=int, default=None,
                    help="held-out queries at full vectors size (default: all 10k; exact ground truth costs Q x N x d)")
    ap.add_argument("--timeout", type=float, default=None, help="seconds per (stage, size) child")
    ap.add_argument("--keep", action="store_true", help="keep the synthetic data")
    ap.add_argument("--threads", type=int, default=None,
                    help="OMP/MKL threads of each child (default: the libraries' own; 1 with --dry-run)")
    ap.add_argument("--no-opq", action="store_true", help="ivfpq without the OPQ rotation")
    args = ap.parse_args(argv)
    if args.child:
        child_main(args.child)
        return 0
    stages = [s for s in args.stages.split(",") if s]
    sizes = [z for z in args.sizes.split(",") if z]
    bad = [s for s in stages if s not in STAGES] + [z for z in sizes if z not in SIZES]
    if bad:
        ap.error(f"unknown stage or size {bad[0]!r}; stages: {', '.join(STAGES)}; sizes: {', '.join(SIZES)}")
    if args.dry_run:
        args.eval_images = 100
        args.threads = args.threads or 1
    if args.threads:
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
            os.environ[var] = str(args.threads)
    out = Path(args.out or tempfile.mkdtemp(prefix="xmodal-scale-out-"))
    out.mkdir(parents=True, exist_ok=True)
    tmp = tempfile.TemporaryDirectory(prefix="xmodal-scale-", dir=args.work)
    results = []
    try:
        for stage in stages:
            for size in sizes:
                if size == "tenth-both" and stage not in ("eval", "corpus"):
                    continue  # one axis only: the same as tenth
                r = run_stage(stage, size, args, Path(tmp.name))
                results.append(r)
                print(json.dumps({k: r[k] for k in ("stage", "size", "wall_s", "peak_rss_mb", "peak_anon_mb", "rc")}
                                 | {"result": r.get("result")}), flush=True)
                (out / "scale.json").write_text(json.dumps({"results": results, "ratios": ratios(results)}, indent=1))
                if not args.keep:
                    shutil.rmtree(Path(tmp.name) / f"{stage}-{size}", ignore_errors=True)
    finally:
        if not args.keep:
            tmp.cleanup()
    summary = {"ratios": ratios(results), "failed": [f"{r['stage']}/{r['size']}" for r in results if r["rc"]]}
    print(json.dumps(summary))
    print(f"results: {out / 'scale.json'}")
    return 1 if summary["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
