"""Speed and memory of xmodal's streaming evaluator against the seeds' per-query loop.

Times, on synthetic embeddings with ``captions / images`` captions per image:

(a) the VSE++ / SCAN ``i2t`` / ``t2i`` loops (numpy; for each image ``im @ caps.T`` then an
    argsort, the rank being the best position of its captions; for each image's captions
    ``caps @ ims.T`` and an argsort each), reimplemented faithfully as the reference;
(b) ``xmodal.eval.metrics.ranks_from_embeddings`` + ``metrics_from_ranks`` (both directions);
(c) the single ``images x captions`` matrix product alone (torch, same threads; when the
    full matrix does not fit in memory, as at the CUDA sizes, the same product computed in
    blocks of the engine's shape, each discarded);

and prints the speed-up of (b) over (a), the ratio (b) / (c), the peak resident memory of
each step, and whether (b)'s metrics equal (a)'s.

    python benchmarks/eval_speed.py                     # 5,000 x 25,000 x 1,024, CPU fp32
    python benchmarks/eval_speed.py --dtype bf16
    python benchmarks/eval_speed.py --device cuda --dtype bf16   # 100,000 x 500,000 x 512
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time

import numpy as np
import torch

from xmodal.eval.metrics import DEFAULT_BLOCK_SIZE, metrics_from_ranks, ranks_from_embeddings


# --------------------------------------------------------------------------------------
def seed_loop_metrics(images: np.ndarray, captions: np.ndarray, per_image: int) -> dict[str, float]:
    """The VSE++ ``i2t``/``t2i`` evaluation loops (captions ``per_image * i ... + per_image``
    belong to image ``i``), with their metric formulas."""
    npts = images.shape[0]
    ranks = np.zeros(npts)
    for index in range(npts):
        d = np.dot(images[index:index + 1], captions.T).flatten()
        inds = np.argsort(d)[::-1]
        rank = 1e20
        for i in range(per_image * index, per_image * index + per_image):
            tmp = np.where(inds == i)[0][0]
            rank = min(rank, tmp)
        ranks[index] = rank
    i2t = ranks.copy()
    ranks = np.zeros(per_image * npts)
    for index in range(npts):
        queries = captions[per_image * index:per_image * index + per_image]
        d = np.dot(queries, images.T)
        for i in range(len(queries)):
            inds = np.argsort(d[i])[::-1]
            ranks[per_image * index + i] = np.where(inds == index)[0][0]
    t2i = ranks
    out = {}
    for name, r in (("i2t", i2t), ("t2i", t2i)):
        out[f"{name}_r1"] = 100.0 * len(np.where(r < 1)[0]) / len(r)
        out[f"{name}_r5"] = 100.0 * len(np.where(r < 5)[0]) / len(r)
        out[f"{name}_r10"] = 100.0 * len(np.where(r < 10)[0]) / len(r)
        out[f"{name}_medr"] = float(np.floor(np.median(r)) + 1)
        out[f"{name}_meanr"] = float(r.mean() + 1)
    out["rsum"] = sum(out[f"{p}_r{k}"] for p in ("i2t", "t2i") for k in (1, 5, 10))
    return out


# --------------------------------------------------------------------------------------
def reset_peak() -> bool:
    """Reset the kernel's peak-RSS counter (VmHWM); False where that is not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def rss_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def peak_memory(fn, device: torch.device):
    """Run ``fn`` once; return its result and the peak memory above the start (MB).

    CPU: the kernel's peak resident set (VmHWM, reset first). CUDA: the allocator's peak.
    """
    gc.collect()
    ok = reset_peak()
    base = rss_mb("VmRSS")
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base_gpu = torch.cuda.memory_allocated(device)
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return out, (torch.cuda.max_memory_allocated(device) - base_gpu) / 2**20
    return out, (rss_mb("VmHWM") - base) if ok else float("nan")


def timed(fn, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t


def make_data(n: int, per_image: int, dim: int, noise: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Unit-norm images; each caption = its image + Gaussian noise, unit-normed (float32)."""
    g = torch.Generator().manual_seed(seed)
    img = torch.randn(n, dim, generator=g)
    img /= img.norm(dim=1, keepdim=True)
    caps = torch.empty(n * per_image, dim)
    for s in range(0, n * per_image, 65536):  # chunks keep the generator's temporaries small
        e = min(s + 65536, n * per_image)
        caps[s:e] = img[torch.arange(s, e) // per_image] + noise / dim ** 0.5 * torch.randn(e - s, dim, generator=g)
    caps /= caps.norm(dim=1, keepdim=True)
    return img.numpy(), caps.numpy()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=None, help="default 5,000 (CPU) / 100,000 (CUDA)")
    p.add_argument("--captions", type=int, default=None, help="default 5 per image")
    p.add_argument("--dim", type=int, default=None, help="default 1,024 (CPU) / 512 (CUDA)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--block-size", type=int, default=DEFAULT_BLOCK_SIZE)
    p.add_argument("--repeat", type=int, default=3, help="best-of-N for (b) and (c)")
    p.add_argument("--noise", type=float, default=10.0, help="caption noise (sets how hard retrieval is)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    p.add_argument("--skip-loop", action="store_true", help="skip the slow reference loop (a)")
    p.add_argument("--force-loop", action="store_true", help="run (a) even with --device cuda")
    p.add_argument("--json", action="store_true", help="also print one JSON line with the figures")
    args = p.parse_args(argv)

    device = torch.device(args.device)
    big = device.type == "cuda"
    n = args.images or (100_000 if big else 5_000)
    m = args.captions or 5 * n
    dim = args.dim or (512 if big else 1024)
    if m % n:
        p.error("--captions must be a multiple of --images (captions i*k .. i*k+k-1 belong to image i)")
    per_image = m // n
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    dt = torch.float32 if args.dtype == "fp32" else torch.bfloat16
    print(f"# {n} images x {m} captions x {dim}-d, {per_image} per image; device={device} "
          f"dtype={args.dtype} block={args.block_size} torch threads={threads} cpus={os.cpu_count()} "
          f"load average={os.getloadavg()[0]:.1f}")

    images, captions = make_data(n, per_image, dim, args.noise, seed=0)
    text_to_image = np.repeat(np.arange(n), per_image)
    img_t = torch.from_numpy(images).to(device, dt)
    cap_t = torch.from_numpy(captions).to(device, dt)

    def run_xmodal():
        i2t, t2i = ranks_from_embeddings(img_t, cap_t, text_to_image, block_size=args.block_size,
                                         device=device, dtype=dt, progress=False)
        return metrics_from_ranks(i2t, t2i)

    full_mb = n * m * torch.finfo(dt).bits / 8 / 2**20
    if device.type == "cuda":
        fits = full_mb * 2**20 < 0.6 * torch.cuda.mem_get_info(device)[0]
    else:
        fits = full_mb * 2**20 < 0.5 * os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")

    def run_matmul():
        if fits:
            s = img_t @ cap_t.T  # (N, M): the full matrix the streaming engine never holds
            return s.shape
        # Too big to hold (100,000 x 500,000 bf16 is 93 GB): the same product in row blocks
        # of the larger side, as the engine computes it, each block discarded.
        big, small = (cap_t, img_t) if m >= n else (img_t, cap_t)
        out = torch.empty(args.block_size, small.shape[0], dtype=dt, device=device)
        for s0 in range(0, big.shape[0], args.block_size):
            blk = big[s0:s0 + args.block_size]
            torch.mm(blk, small.T, out=out[:len(blk)])
        return out.shape

    metrics, mem_x = peak_memory(run_xmodal, device)  # also the warm-up
    _, mem_mm = peak_memory(run_matmul, device)
    # Interleaved best-of-N: on a shared machine both see the same background load.
    t_x = t_mm = float("inf")
    for _ in range(args.repeat):
        t_x = min(t_x, timed(run_xmodal, device))
        t_mm = min(t_mm, timed(run_matmul, device))
    print(f"(b) xmodal i2t+t2i metrics : {t_x:8.2f} s   peak +{mem_x:7.0f} MB")
    what = "one" if fits else "blocked"
    print(f"(c) {what} {n}x{m} matmul : {t_mm:8.2f} s   peak +{mem_mm:7.0f} MB "
          f"(the full matrix is {full_mb:.0f} MB)")
    print(f"    xmodal / matmul        : {t_x / t_mm:8.2f} x   (goal <= 1.5)")
    print("    metrics:", {k: round(v, 2) for k, v in metrics.items()})
    figures = {"images": n, "captions": m, "dim": dim, "device": str(device), "dtype": args.dtype,
               "threads": threads, "xmodal_s": t_x, "matmul_s": t_mm, "xmodal_peak_mb": mem_x,
               "matmul_peak_mb": mem_mm, "full_matrix_mb": full_mb, "matmul_blocked": not fits, "metrics": metrics}
    if device.type == "cuda" and not args.force_loop:
        print("(a) the per-query numpy loop is skipped at CUDA sizes (hours); --force-loop runs it")
    elif not args.skip_loop:
        t0 = time.perf_counter()
        ref, mem_loop = peak_memory(lambda: seed_loop_metrics(images, captions, per_image), torch.device("cpu"))
        t_loop = time.perf_counter() - t0
        same = all(abs(ref[k] - metrics[k]) < 1e-9 for k in ref)
        print(f"(a) seeds' per-query loop  : {t_loop:8.2f} s   peak +{mem_loop:7.0f} MB")
        print(f"    speed-up vs loop       : {t_loop / t_x:8.1f} x   (goal >= 15)")
        print(f"    metrics equal the loop's: {same}")
        if not same:
            print("    loop metrics:", {k: round(v, 2) for k, v in ref.items()})
        figures.update(loop_s=t_loop, loop_peak_mb=mem_loop, metrics_equal=same)
    if args.json:
        print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
