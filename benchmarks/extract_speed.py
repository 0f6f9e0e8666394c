"""Feature extraction speed: ``xmodal extract`` against a plain eager PyTorch loop, same process.

Writes ``--images`` synthetic photos (640x480 JPEG, smooth colour fields with edges, so they
compress like photos) and a ``table`` CSV, or uses the emoji test split (``--source emoji``,
500 images from the packaged pixel pack, as the demo does). Then, in one process:

* ``matmul``: the float32 matrix-product rate (GFLOP/s), the machine's reference;
* ``eager loop``: open each image, ``tower.preprocess``, stack, ``tower(x)`` under
  ``torch.inference_mode``, batch by batch: what one writes without xmodal;
* ``xmodal extract``: the command, in-process, once per ``--backends`` entry and ``--workers``
  value (a fresh output folder each time; the ONNX export is cached before timing, as it is
  after a first run), timed end to end and by the manifest's extraction time;
* where the time goes: decode, resize (``preprocess``) and model per image, each measured
  alone, and the model's FLOP rate (FLOPs counted by ``torch.utils.flop_counter``) as a
  fraction of the matmul rate.

Rounds alternate the eager loop and the commands, so on a busy machine every ratio is taken
between neighbours; the median over rounds is reported.

    python benchmarks/extract_speed.py                          # 256 JPEGs at 160 px
    python benchmarks/extract_speed.py --source emoji --rounds 3
    python benchmarks/extract_speed.py --dry-run                # seconds: 8 images at 64 px
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from xmodal.cli import main as xmodal_main  # noqa: E402
from xmodal.data import load_dataset  # noqa: E402
from xmodal.data.emoji import default_path as emoji_path  # noqa: E402
from xmodal.data.extract_backends import Engine, resolve_backend  # noqa: E402
from xmodal.data.images import open_image  # noqa: E402
from xmodal.models.base import IMAGE_TOWERS  # noqa: E402
import xmodal.models.image  # noqa: E402,F401  (registers the towers)


def write_photos(folder: Path, n: int, size: tuple[int, int] = (640, 480)) -> Path:
    """``n`` JPEGs and a table CSV naming them; returns the CSV."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    rows = ["image,caption"]
    for k in range(n):
        f = rng.uniform(0.005, 0.03, size=(3, 2))
        ph = rng.uniform(0, 6.3, size=3)
        img = np.stack([127 + 120 * np.sin(f[c, 0] * xx + f[c, 1] * yy + ph[c]) for c in range(3)], -1)
        img[(xx - rng.uniform(0, w)) ** 2 + (yy - rng.uniform(0, h)) ** 2 < rng.uniform(40, 150) ** 2] = rng.uniform(0, 255, 3)
        Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(folder / f"{k:05d}.jpg", quality=90)
        rows.append(f"{k:05d}.jpg,photo {k}")
    csv = folder / "pairs.csv"
    csv.write_text("\n".join(rows) + "\n")
    return csv


def matmul_gflops(n: int = 1024, reps: int = 5) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = min(_timed(lambda: a @ b) for _ in range(reps))
    return 2 * n ** 3 / best / 1e9


def model_flops(tower, size: int) -> float:
    """FLOPs of one image through the eager tower (multiply-add = 2)."""
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.randint(0, 256, (1, 3, size, size), dtype=torch.uint8)
    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        tower(x)
    return float(counter.get_total_flops())


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _open(ds, i: int):
    pixels = ds.meta.get("pixels")
    return pixels[i] if pixels is not None else open_image(ds.image_path(i))


def eager_loop(ds, tower, batch_size: int) -> dict:
    """The reference: decode, preprocess, stack, forward; per-phase seconds summed."""
    t = {"decode": 0.0, "resize": 0.0, "model": 0.0}
    t0 = time.perf_counter()
    with torch.inference_mode():
        for lo in range(0, ds.num_images, batch_size):
            idx = range(lo, min(lo + batch_size, ds.num_images))
            s = time.perf_counter()
            images = [_open(ds, i) for i in idx]
            t["decode"] += time.perf_counter() - s
            s = time.perf_counter()
            x = torch.stack([tower.preprocess(im) for im in images])  # (b, 3, S, S) uint8
            t["resize"] += time.perf_counter() - s
            s = time.perf_counter()
            out = tower(x)
            out.pooled.numpy(), out.tokens.numpy()
            t["model"] += time.perf_counter() - s
    t["total"] = time.perf_counter() - t0
    return t


def model_only(ds, tower, backend: str, batch_size: int) -> float:
    """Seconds per image of the model alone with ``backend`` (pixels preprocessed beforehand)."""
    n = min(ds.num_images, 2 * batch_size)
    x = torch.stack([tower.preprocess(_open(ds, i)) for i in range(n)])
    engine = Engine(tower, backend, torch.device("cpu"))
    with torch.inference_mode():
        engine(x[:batch_size], True)  # build (trace / export / session) outside the timing
        best = min(_timed(lambda: [engine(x[lo:lo + batch_size], True) for lo in range(0, n, batch_size)])
                   for _ in range(2))
    return best / n


def run_extract(args, csv: str | None, out: Path, backend: str, workers: int) -> tuple[float, float]:
    """``(wall seconds, manifest extraction seconds)`` of one ``xmodal extract`` run."""
    data = ["--format", "emoji", "--path", str(emoji_path())] if csv is None else ["--format", "table", "--path", csv]
    argv = ["extract", *data, "--split", args.split, "--image-size", str(args.size), "--out", str(out),
            "--batch-size", str(args.batch_size), "--backend", backend, "--workers", str(workers),
            "--no-progress", "--no-grid"]
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        wall = _timed(lambda: _check(xmodal_main(argv), argv))
    manifest = json.loads((out / "manifest.json").read_text())
    return wall, float(manifest["elapsed_s"])


def _check(rc: int, argv: list[str]) -> None:
    if rc != 0:
        raise SystemExit(f"xmodal {' '.join(argv)} exited with {rc}")


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", choices=("jpeg", "emoji"), default="jpeg")
    p.add_argument("--images", type=int, default=256, help="synthetic JPEGs to write (--source jpeg)")
    p.add_argument("--size", type=int, default=160, help="tower input size (the demo's is 160)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--backends", default="auto,torch,eager", help="comma-separated --backend values to time")
    p.add_argument("--workers", default="0,1", help="comma-separated --workers values to time (with auto)")
    p.add_argument("--threads", type=int, default=None, help="torch / ONNX Runtime threads (default: torch's)")
    p.add_argument("--dry-run", action="store_true", help="tiny: 8 JPEGs at 64 px, one round, 1 thread, no ONNX")
    args = p.parse_args(argv)
    args.split = "test" if args.source == "emoji" else "all"
    if args.dry_run:
        args.images, args.size, args.batch_size, args.rounds = 8, 64, 4, 1
        args.backends, args.workers, args.threads, args.source, args.split = "torch,eager", "0,1", 1, "jpeg", "all"
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    tmp = Path(tempfile.mkdtemp(prefix="xmodal_extract_speed_"))
    os.environ.setdefault("XMODAL_CACHE", str(tmp / "cache"))  # ONNX exports land here, not in ~/.cache
    try:
        return measure(args, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def measure(args: argparse.Namespace, tmp: Path) -> dict:
    csv = None if args.source == "emoji" else str(write_photos(tmp / "photos", args.images))
    ds = load_dataset("emoji" if csv is None else "table", str(emoji_path()) if csv is None else csv, args.split)
    tower = IMAGE_TOWERS.create("efficientnet_lite0", image_size=args.size, frozen=True).eval()
    backends = [b for b in args.backends.split(",") if b]
    resolved = {b: resolve_backend(b, tower, num_images=ds.num_images) for b in backends}
    workers = [int(w) for w in args.workers.split(",") if w]
    n = ds.num_images
    print(f"{n} images ({args.source}), efficientnet_lite0 at {args.size} px, batch {args.batch_size}, "
          f"{torch.get_num_threads()} torch threads; auto = {resolved.get('auto') or resolve_backend('auto', tower, num_images=n)}")
    gflops = matmul_gflops()
    flops = model_flops(tower, args.size)
    for b in set(resolved.values()) - {"eager"}:
        model_only(ds, tower, b, args.batch_size)  # warm: ONNX export into the cache, as after a first run
    runs = [(b, 0) for b in backends] + [(backends[0], w) for w in workers if w != 0]
    ratios: dict[tuple[str, int], list[float]] = {r: [] for r in runs}
    rates: dict[str, list[float]] = {"eager loop": []}
    phases = []
    for rnd in range(args.rounds):
        ref = eager_loop(ds, tower, args.batch_size)
        phases.append(ref)
        rates["eager loop"].append(n / ref["total"])
        for backend, w in runs:
            wall, elapsed = run_extract(args, csv, tmp / f"out-{rnd}-{backend}-{w}", backend, w)
            rates.setdefault(f"extract --backend {backend} --workers {w}", []).append(n / wall)
            ratios[(backend, w)].append(ref["total"] / wall)
    med = {k: statistics.median(v) for k, v in rates.items()}
    print(f"\nmatmul: {gflops:.1f} GFLOP/s; model: {flops / 1e9:.3f} GFLOP per image")
    print(f"{'':44} {'img/s':>8} {'x eager loop':>13}")
    print(f"{'eager loop':44} {med['eager loop']:8.1f} {1.0:13.2f}")
    for (backend, w), rs in ratios.items():
        key = f"extract --backend {backend} --workers {w}"
        label = f"xmodal {key}" + (f" ({resolved[backend]})" if backend == "auto" else "")
        print(f"{label:44} {med[key]:8.1f} {statistics.median(rs):13.2f}")
    per = {k: statistics.median(p[k] for p in phases) / n * 1e3 for k in ("decode", "resize", "model")}
    print(f"\nwhere the eager loop's time goes (ms per image): decode {per['decode']:.2f}, "
          f"resize {per['resize']:.2f}, model {per['model']:.2f}")
    print("model alone (ms per image) and FLOP rate as a fraction of the matmul rate measured just before:")
    model_ms = {}
    for b in sorted(set(resolved.values())):
        mm = matmul_gflops()
        model_ms[b] = ms = model_only(ds, tower, b, args.batch_size) * 1e3
        print(f"  {b:12} {ms:8.2f} ms  {flops / (ms / 1e3) / 1e9:7.1f} GFLOP/s  "
              f"{flops / (ms / 1e3) / 1e9 / mm:6.1%} of matmul ({mm:.1f} GFLOP/s)")
    return {"rates": med, "ratios": {f"{b}/{w}": statistics.median(r) for (b, w), r in ratios.items()},
            "phases_ms": per, "model_ms": model_ms, "gflops": gflops, "flops": flops}


if __name__ == "__main__":
    main()
