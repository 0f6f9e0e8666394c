"""Load test of ``xmodal serve`` on loopback: concurrent text searches, latency and throughput.

    python benchmarks/serve_load.py                     # quick emoji run + index, 8 clients x 500 queries
    python benchmarks/serve_load.py --index my.idx      # an existing image index
    python benchmarks/serve_load.py --clients 4 --queries 100

1. the index: ``--index``, or a 30-step frozen EfficientNet-lite0 (64 px) + BiGRU run on the
   embedded emoji dataset and an index of its 500 test images (about 40 s on 2 cores);
2. the reference: the same queries through the library in this process, no HTTP, one at a
   time (:meth:`xmodal.serve.SearchService.search_text`: encode, search, metadata);
   measured before and after the load, the faster run kept;
3. the server: ``xmodal serve INDEX`` in a subprocess on a free 127.0.0.1 port;
   ``--clients`` threads, each with one keep-alive connection (``http.client``), send
   ``--queries`` ``GET /api/search`` requests each (the test split's English labels, cycled)
   and check every answer (status 200, ``k`` results).

Reports p50 / p99 latency and throughput of both, their ratio, and the error count (0 expected).
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from pathlib import Path

import numpy as np

QUICK_CONFIG = """
name: serve-bench
data: {format: emoji, path: emoji}
model:
  type: dual_encoder
  embed_dim: 64
  image: {name: efficientnet_lite0, args: {image_size: 64}, frozen: true}
  text: {name: bigru, args: {word_dim: 32, out_dim: 64}, frozen: false}
loss: {name: infonce}
optim: {name: adam, lr: 0.01}
train: {steps: 30, batch_size: 64, eval_every: 30, log_every: 10, tensorboard: false}
"""


def build_emoji_index(workdir: Path) -> Path:
    """A quick emoji run and an index of its test images (CLI, as a user would)."""
    from xmodal.cli import main

    cfg = workdir / "bench.yaml"
    cfg.write_text(QUICK_CONFIG)
    run, idx = workdir / "run", workdir / "emoji_test.idx"
    if main(["train", str(cfg), "--out", str(run), "--no-progress"]) != 0:
        sys.exit("training the benchmark run failed")
    if main(["index", str(run), "--data", "split:test", "--out", str(idx), "--no-progress"]) != 0:
        sys.exit("indexing failed")
    return idx


def emoji_queries() -> list[str]:
    from xmodal.data import emoji

    return list(dict.fromkeys(emoji.read(emoji.default_path(), "test").captions))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def percentiles(ms: list[float]) -> dict[str, float]:
    a = np.asarray(ms)
    return {"p50_ms": round(float(np.percentile(a, 50)), 2), "p99_ms": round(float(np.percentile(a, 99)), 2),
            "mean_ms": round(float(a.mean()), 2)}


def reference(index: Path, queries: list[str], n: int, k: int) -> dict:
    """The same searches through the library, in process, sequentially."""
    from xmodal.serve import load_service

    service = load_service(index)
    for q in queries[:20]:  # warm-up
        service.search_text(q, k)
    lat = []
    t0 = time.perf_counter()
    for i in range(n):
        t = time.perf_counter()
        res = service.search_text(queries[i % len(queries)], k)
        lat.append((time.perf_counter() - t) * 1000)
        assert len(res) == min(k, len(service.index))
    wall = time.perf_counter() - t0
    return {"queries": n, "seconds": round(wall, 3), "qps": round(n / wall, 1), **percentiles(lat)}


def start_server(index: Path, port: int) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "xmodal", "serve", str(index), "--port", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"the server exited: {proc.stderr.read()[-2000:]}")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            conn.request("GET", "/api/health")
            if conn.getresponse().status == 200:
                conn.close()
                return proc
        except OSError:
            time.sleep(0.2)
    proc.kill()
    sys.exit("the server did not come up in 120 s")


def load(port: int, queries: list[str], clients: int, per_client: int, k: int, expect: int) -> dict:
    """``clients`` threads x ``per_client`` requests; every answer is checked."""
    lat: list[list[float]] = [[] for _ in range(clients)]
    errors: list[str] = []
    start = threading.Barrier(clients + 1)

    def client(c: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        start.wait()
        for i in range(per_client):
            q = queries[(c * per_client + i) % len(queries)]
            path = f"/api/search?q={urllib.parse.quote(q)}&k={k}"
            t = time.perf_counter()
            try:
                conn.request("GET", path)
                resp = conn.getresponse()
                body = resp.read()
                lat[c].append((time.perf_counter() - t) * 1000)
                if resp.status != 200 or len(json.loads(body)["results"]) != expect:
                    errors.append(f"{resp.status}: {body[:200]!r}")
            except (OSError, http.client.HTTPException, ValueError) as e:
                errors.append(f"{type(e).__name__}: {e}")
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        conn.close()

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    n = clients * per_client
    all_lat = [x for row in lat for x in row]
    return {"clients": clients, "queries": n, "errors": len(errors), "first_errors": errors[:3],
            "seconds": round(wall, 3), "qps": round(n / wall, 1), **percentiles(all_lat)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--index", default=None, help="an image index (default: build a quick emoji one)")
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--queries", type=int, default=500, help="requests per client")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--reference-queries", type=int, default=1000, help="library searches for the reference")
    p.add_argument("--workdir", default=None)
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # server and reference alike: one intra-op thread
    import torch

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        t0 = time.perf_counter()
        index = Path(args.index) if args.index else build_emoji_index(Path(tmp))
        setup_s = time.perf_counter() - t0
        queries = emoji_queries()
        from xmodal.index import Index

        size = len(Index.open(index))
        expect = min(args.k, size)
        refs = [reference(index, queries, args.reference_queries, args.k)]
        port = free_port()
        proc = start_server(index, port)
        try:
            load(port, queries, args.clients, 10, args.k, expect)  # warm-up (not reported)
            http_res = load(port, queries, args.clients, args.queries, args.k, expect)
        finally:
            proc.terminate()
            proc.wait(10)
        # the reference again after the load: on a shared machine the faster of the two runs
        # is the fairer (less disturbed) baseline, and the ratio does not flatter the server
        refs.append(reference(index, queries, args.reference_queries, args.k))
        ref = max(refs, key=lambda r: r["qps"])
    out = {"index": str(index), "index_size": size, "k": args.k, "setup_s": round(setup_s, 1),
           "library_reference": ref, "library_reference_runs_qps": [r["qps"] for r in refs],
           "http": http_res,
           "ratio": {"qps_http_over_library": round(http_res["qps"] / ref["qps"], 3),
                     "p50_http_over_library": round(http_res["p50_ms"] / ref["p50_ms"], 2)},
           "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                       "omp_threads": os.environ["OMP_NUM_THREADS"]}}
    print(json.dumps(out, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    if http_res["errors"]:
        sys.exit(f"{http_res['errors']} errors under load")


if __name__ == "__main__":
    main()
