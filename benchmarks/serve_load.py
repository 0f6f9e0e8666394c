"""Load test of ``xmodal serve`` on loopback: 16 concurrent clients against one sequential client.

    python benchmarks/serve_load.py                       # quick emoji MiniLM run + index, 16 x 200 vs 1 x 400
    python benchmarks/serve_load.py --index my.idx        # an existing image index
    python benchmarks/serve_load.py --unbatched           # also 16 clients on a --max-batch 1 server
    python benchmarks/serve_load.py --dry-run             # tiny: 8-image run, 4 x 5 vs 1 x 5 (the test suite;
                                                          # with --index: that index, colour queries)

1. the index: ``--index``, or a 30-step run on the embedded emoji dataset with frozen
   EfficientNet-lite0 (64 px) and frozen MiniLM towers (``--text-tower bigru``: a trained
   BiGRU instead) and an index of its 500 test images;
2. the server: ``xmodal serve INDEX`` in a subprocess on a free 127.0.0.1 port (batched:
   ``--max-batch``, ``--batch-wait-ms``, ``--threads``);
3. on that one server, in this order: ``--sequential`` requests from one client (one
   keep-alive connection, each request sent when the previous answer arrived), then
   ``--clients`` threads x ``--queries`` requests, then the sequential client again (the faster
   of the two sequential runs is the reference: on a shared machine it is the less disturbed
   one, and it does not flatter the ratio). Every answer is checked (status 200, ``k`` results).

Reports throughput and p50 / p99 latency of each, the ratio concurrent / sequential (goal
>= 3x), p99 / p50 under load (goal <= 3) and the error count (goal 0), with the server's batch
statistics from ``/api/info``. Exits 1 when there were errors.
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
data: {{format: emoji, path: emoji}}
model:
  type: dual_encoder
  embed_dim: 64
  image: {{name: efficientnet_lite0, args: {{image_size: 64}}, frozen: true}}
  text: {text}
  image_head: {{input: pooled, proj: linear}}
  text_head: {{input: pooled, proj: linear}}
loss: {{name: infonce}}
optim: {{name: adam, lr: 0.01}}
train: {{steps: 30, batch_size: 64, eval_every: 30, log_every: 10, tensorboard: false}}
"""
TEXT_TOWERS = {"minilm": "{name: hf, args: {pooling: mean}, frozen: true}",
               "bigru": "{name: bigru, args: {word_dim: 32, out_dim: 64}, frozen: false}"}
DRY_COLOURS = {"red": (220, 20, 20), "green": (20, 180, 20), "blue": (20, 20, 220), "yellow": (230, 220, 20)}
DRY_QUERIES = [f"a {name} picture" for name in DRY_COLOURS] + list(DRY_COLOURS)
DRY_CONFIG = """
name: serve-bench-dry
data: {{format: table, path: {csv}, train_split: all, val_split: all, test_split: all}}
model:
  type: dual_encoder
  embed_dim: 16
  image: {{name: efficientnet_lite0, args: {{image_size: 64}}, frozen: true}}
  text: {{name: bigru, args: {{word_dim: 8, out_dim: 16}}, frozen: false}}
loss: {{name: infonce}}
optim: {{name: adam, lr: 0.01}}
train: {{steps: 3, batch_size: 4, eval_every: 3, log_every: 3, tensorboard: false}}
"""


def build_emoji_index(workdir: Path, text_tower: str) -> tuple[Path, list[str]]:
    """A quick emoji run and an index of its test images (CLI, as a user would); the queries."""
    from xmodal.cli import main
    from xmodal.data import emoji

    cfg = workdir / "bench.yaml"
    cfg.write_text(QUICK_CONFIG.format(text=TEXT_TOWERS[text_tower]))
    run, idx = workdir / "run", workdir / "emoji_test.idx"
    if main(["train", str(cfg), "--out", str(run), "--no-progress"]) != 0:
        sys.exit("training the benchmark run failed")
    if main(["index", str(run), "--data", "split:test", "--out", str(idx), "--no-progress"]) != 0:
        sys.exit("indexing failed")
    return idx, list(dict.fromkeys(emoji.read(emoji.default_path(), "test").captions))


def build_dry_index(workdir: Path) -> tuple[Path, list[str]]:
    """8 coloured PNGs, a 3-step frozen EfficientNet + BiGRU run on them and their index (seconds)."""
    from PIL import Image

    from xmodal.cli import main

    imgs = workdir / "imgs"
    imgs.mkdir(parents=True)
    rows = ["image,caption"]
    for name, rgb in DRY_COLOURS.items():
        for j in range(2):
            img = Image.new("RGB", (40 + 8 * j, 48), rgb)
            img.paste((255, 255, 255) if j else (0, 0, 0), (4 + 10 * j, 4, 20 + 10 * j, 30))
            img.save(imgs / f"{name}{j}.png")
            rows.append(f"{imgs / f'{name}{j}.png'},a {name} picture")
    (workdir / "data.csv").write_text("\n".join(rows) + "\n")
    cfg = workdir / "dry.yaml"
    cfg.write_text(DRY_CONFIG.format(csv=workdir / "data.csv"))
    run, idx = workdir / "run", workdir / "images.idx"
    if main(["train", str(cfg), "--out", str(run), "--no-progress"]) != 0:
        sys.exit("training the dry-run run failed")
    if main(["index", str(run), "--data", str(imgs), "--out", str(idx), "--no-progress"]) != 0:
        sys.exit("indexing failed")
    return idx, DRY_QUERIES


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def percentiles(ms: list[float]) -> dict[str, float]:
    a = np.asarray(ms if ms else [float("nan")])
    return {"p50_ms": round(float(np.percentile(a, 50)), 2), "p99_ms": round(float(np.percentile(a, 99)), 2),
            "mean_ms": round(float(a.mean()), 2)}


def start_server(index: Path, port: int, extra: list[str]) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "xmodal", "serve", str(index), "--port", str(port), *extra],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 180
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
    sys.exit("the server did not come up in 180 s")


def server_info(port: int) -> dict:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("GET", "/api/info")
    info = json.loads(conn.getresponse().read())
    conn.close()
    return info


def load(port: int, queries: list[str], clients: int, per_client: int, k: int, expect: int) -> dict:
    """``clients`` threads x ``per_client`` requests on keep-alive connections; every answer is checked."""
    lat: list[list[float]] = [[] for _ in range(clients)]
    errors: list[str] = []
    start = threading.Barrier(clients + 1)

    def client(c: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        start.wait()
        for i in range(per_client):
            q = queries[(c * per_client + i) % len(queries)]
            t = time.perf_counter()
            try:
                conn.request("GET", f"/api/search?q={urllib.parse.quote(q)}&k={k}")
                resp = conn.getresponse()
                body = resp.read()
                lat[c].append((time.perf_counter() - t) * 1000)
                if resp.status != 200 or len(json.loads(body)["results"]) != expect:
                    errors.append(f"{resp.status}: {body[:200]!r}")
            except (OSError, http.client.HTTPException, ValueError) as e:
                errors.append(f"{type(e).__name__}: {e}")
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
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
    return {"clients": clients, "queries": n, "errors": len(errors), "first_errors": errors[:3],
            "seconds": round(wall, 3), "qps": round(n / wall, 1), **percentiles([x for row in lat for x in row])}


def measure(index: Path, queries: list[str], args: argparse.Namespace, expect: int, max_batch: int) -> dict:
    """One server: sequential, concurrent, sequential again (the faster sequential run kept)."""
    port = free_port()
    extra = ["--max-batch", str(max_batch), "--batch-wait-ms", str(args.batch_wait_ms), "--threads", str(args.threads)]
    proc = start_server(index, port, extra)
    try:
        load(port, queries, 1, 10, args.k, expect)  # warm-up (not reported)
        seq = [load(port, queries, 1, args.sequential, args.k, expect)]
        conc = load(port, queries, args.clients, args.queries, args.k, expect)
        seq.append(load(port, queries, 1, args.sequential, args.k, expect))
        batching = server_info(port).get("batching", {}).get("text")
    finally:
        proc.terminate()
        proc.wait(10)
    ref = max(seq, key=lambda r: r["qps"])
    return {"max_batch": max_batch, "sequential": ref, "sequential_runs_qps": [r["qps"] for r in seq],
            "concurrent": conc, "server_batching": batching,
            "ratio_qps_concurrent_over_sequential": round(conc["qps"] / ref["qps"], 2),
            "ratio_p99_over_p50_concurrent": round(conc["p99_ms"] / conc["p50_ms"], 2)}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--index", default=None, help="an image index (default: build a quick emoji one)")
    p.add_argument("--text-tower", choices=sorted(TEXT_TOWERS), default="minilm",
                   help="text tower of the quick emoji run (default minilm)")
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--queries", type=int, default=200, help="requests per concurrent client")
    p.add_argument("--sequential", type=int, default=400, help="requests of the sequential client (each run)")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--max-batch", type=int, default=32)
    p.add_argument("--batch-wait-ms", type=float, default=2.0)
    p.add_argument("--threads", type=int, default=1, help="the server's torch intra-op threads (default 1)")
    p.add_argument("--unbatched", action="store_true", help="also measure a --max-batch 1 server")
    p.add_argument("--dry-run", action="store_true", help="tiny run: 8-image index, 4 clients x 5, 1 x 5")
    p.add_argument("--workdir", default=None)
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args()
    if args.dry_run:
        args.clients, args.queries, args.sequential = min(args.clients, 4), min(args.queries, 5), min(args.sequential, 5)
    return args


def main() -> None:
    args = parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # the client side; the server gets --threads
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        t0 = time.perf_counter()
        if args.dry_run:
            index, queries = (Path(args.index), DRY_QUERIES) if args.index else build_dry_index(Path(tmp))
        elif args.index:
            from xmodal.data import emoji

            index, queries = Path(args.index), list(dict.fromkeys(emoji.read(emoji.default_path(), "test").captions))
        else:
            index, queries = build_emoji_index(Path(tmp), args.text_tower)
        setup_s = time.perf_counter() - t0
        from xmodal.index import Index

        size = len(Index.open(index))
        expect = min(args.k, size)
        results = [measure(index, queries, args, expect, args.max_batch)]
        if args.unbatched:
            results.append(measure(index, queries, args, expect, 1))
    main_res = results[0]
    out = {"index": str(index), "index_size": size, "k": args.k, "setup_s": round(setup_s, 1),
           "text_tower": None if args.index or args.dry_run else args.text_tower, "batched": main_res,
           "unbatched": results[1] if args.unbatched else None,
           "goals": {"qps_ratio_ge_3": main_res["ratio_qps_concurrent_over_sequential"] >= 3,
                     "p99_le_3x_p50": main_res["ratio_p99_over_p50_concurrent"] <= 3,
                     "zero_errors": all(r["concurrent"]["errors"] + r["sequential"]["errors"] == 0 for r in results)},
           "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "server_threads": args.threads,
                       "load_avg": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None}}
    print(json.dumps(out, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    if not out["goals"]["zero_errors"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
