"""Every GPU measurement in one script (about 8 minutes on one GPU); ``--dry-run``: tiny, on CPU.

Each part prints a ratio against a reference measured in the same run and has its own time cap:

* ``eval``    - exact evaluation (``ranks_from_embeddings``, both directions) of 100k images x 500k
  captions x 512 in bf16, against the ``images x captions`` matrix product alone (same blocks,
  each discarded);
* ``train``   - a ViT-B/32-sized dual encoder (``transformers`` ``CLIPConfig()`` defaults, random
  init, no download): xmodal's training step (``ContrastiveTask`` + ``infonce`` under bf16
  autocast, the body of ``xmodal.train.loop``'s optimizer step) against a plain PyTorch loop of
  the same model and loss formula; samples/s of each;
* ``adapt``   - ADAPT-T2I pair scoring (``Adapt.score`` in evaluation tiles) against the
  original one-caption-at-a-time loop (``benchmarks/pair_scoring.py``'s reference) on a subset;
* ``extract`` - image-tower extraction throughput (ViT-B/32 vision tower, images/s) in bf16
  against fp32;
* ``ddp``     - one-process DDP (``torchrun --nproc-per-node 1``; NCCL on GPU, gloo on CPU):
  training steps/s of the DDP-wrapped model against the bare model.

    bash benchmarks/gpu_check.sh OUT_DIR          # on a GPU machine
    python benchmarks/gpu_check.py --dry-run --out /tmp/gpu-dry   # CPU, tiny (in the test suite)

Results: ``OUT/gpu_check.json`` (written after every part, so a killed run keeps what finished).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
PARTS = ("eval", "train", "adapt", "extract", "ddp")
#: seconds each part may take on the GPU (the sizes below fit well inside on an H200)
CAPS = {"eval": 150, "train": 120, "adapt": 60, "extract": 45, "ddp": 75}
FULL = {"eval": dict(images=100_000, captions=500_000, dim=512),
        "train": dict(batch=256, steps=10, tiny=False),
        "adapt": dict(images=1000, captions=5000, regions=36, dim=1024, ref_captions=64),
        "extract": dict(batch=256, batches=10, tiny=False),
        "ddp": dict(batch=256, steps=10, tiny=False)}
DRY = {"eval": dict(images=300, captions=1500, dim=32),
       "train": dict(batch=8, steps=2, tiny=True),
       "adapt": dict(images=40, captions=80, regions=6, dim=32, ref_captions=8),
       "extract": dict(batch=4, batches=2, tiny=True),
       "ddp": dict(batch=8, steps=2, tiny=True)}


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, repeat: int = 1) -> float:
    """Seconds per call of ``fn`` (after the device finished)."""
    sync(device)
    t0 = time.perf_counter()
    for _ in range(repeat):
        fn()
    sync(device)
    return (time.perf_counter() - t0) / repeat


# ---------------------------------------------------------------------------------------------
def part_eval(p: dict, device, dtype) -> dict:
    import torch

    from xmodal.eval.metrics import DEFAULT_BLOCK_SIZE, metrics_from_ranks, ranks_from_embeddings

    g = torch.Generator(device=device).manual_seed(0)
    img = torch.nn.functional.normalize(torch.randn(p["images"], p["dim"], device=device, generator=g), dim=1)
    txt = torch.nn.functional.normalize(torch.randn(p["captions"], p["dim"], device=device, generator=g), dim=1)
    gt = torch.arange(p["captions"]) // (p["captions"] // p["images"])
    a, b = img.to(dtype), txt.to(dtype)

    def matmul_only() -> None:
        for s in range(0, p["images"], DEFAULT_BLOCK_SIZE):
            (a[s:s + DEFAULT_BLOCK_SIZE] @ b.T).max()  # (block, captions), discarded

    timed(lambda: a[:8] @ b[:8].T, device)  # warm-up
    t_mm = timed(matmul_only, device)
    t0 = time.perf_counter()
    i2t, t2i = ranks_from_embeddings(img, txt, gt.numpy(), device=device, dtype=dtype, progress=False)
    sync(device)
    t_eval = time.perf_counter() - t0
    return {"shape": [p["images"], p["captions"], p["dim"]], "dtype": str(dtype), "matmul_s": round(t_mm, 3),
            "eval_s": round(t_eval, 3), "ratio_eval_over_matmul": round(t_eval / t_mm, 2),
            "rsum": round(metrics_from_ranks(i2t, t2i)["rsum"], 3)}


# ---------------------------------------------------------------------------------------------
def clip_model(tiny: bool):
    """``CLIPModel`` with ``CLIPConfig()`` defaults (ViT-B/32 vision, 12-layer 512-wide text), random init."""
    from transformers import CLIPConfig, CLIPModel

    if not tiny:
        return CLIPModel(CLIPConfig())
    small = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
    text = dict(small, vocab_size=1000, max_position_embeddings=16, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return CLIPModel(CLIPConfig(text_config=text,
                                vision_config=dict(small, image_size=64, patch_size=32), projection_dim=32))


class ClipDual:
    """The CLIP model as an xmodal embedding scorer: ``encode_image`` / ``encode_text``, unit vectors."""

    def __init__(self, model) -> None:
        self.model = model

    @staticmethod
    def _tensor(out):
        # transformers 5 returns a model output for get_*_features; 4.x a tensor
        return out if hasattr(out, "norm") else out.pooler_output

    def encode_image(self, pixels):
        import torch

        return torch.nn.functional.normalize(self._tensor(self.model.get_image_features(pixel_values=pixels)), dim=-1)

    def encode_text(self, ids):
        import torch

        return torch.nn.functional.normalize(self._tensor(self.model.get_text_features(input_ids=ids)), dim=-1)


def make_batch(model, batch: int, device):
    import torch

    vc, tc = model.config.vision_config, model.config.text_config
    pixels = torch.randn(batch, 3, vc.image_size, vc.image_size, device=device)
    ids = torch.randint(0, tc.vocab_size, (batch, min(77, tc.max_position_embeddings)), device=device)
    return pixels, ids


def part_train(p: dict, device, dtype) -> dict:
    """xmodal's step (task + infonce + the loop's autocast/backward/step) vs a plain loop."""
    import torch

    from xmodal.data.inputs import Batch
    from xmodal.losses import create_loss
    from xmodal.train.tasks.base import ContrastiveTask

    torch.manual_seed(0)
    model = clip_model(p["tiny"]).to(device).train()
    pixels, ids = make_batch(model, p["batch"], device)
    n = p["batch"]
    loss = create_loss("infonce").to(device)
    task = ContrastiveTask(ClipDual(model), loss)  # xmodal's own training_step over the adapter
    batch = Batch(torch.arange(n).numpy(), torch.arange(n).numpy(), torch.eye(n, dtype=torch.bool), pixels, ids)
    params = list(model.parameters()) + list(loss.parameters())
    opt = torch.optim.AdamW(params, lr=1e-5)

    def xmodal_step() -> None:
        with torch.autocast(device.type, dtype=dtype):
            losses, _ = task.training_step(batch, 0)
        total = sum(losses.values())
        opt.zero_grad(set_to_none=True)
        total.backward()
        opt.step()

    scale = torch.nn.Parameter(torch.tensor(2.659, device=device))
    opt2 = torch.optim.AdamW(list(model.parameters()) + [scale], lr=1e-5)
    labels = torch.arange(n, device=device)

    def plain_step() -> None:
        with torch.autocast(device.type, dtype=dtype):
            out = model(input_ids=ids, pixel_values=pixels)
            im = torch.nn.functional.normalize(out.image_embeds, dim=-1)
            tx = torch.nn.functional.normalize(out.text_embeds, dim=-1)
            logits = scale.exp().clamp(max=100) * im @ tx.T
            total = (torch.nn.functional.cross_entropy(logits, labels)
                     + torch.nn.functional.cross_entropy(logits.T, labels)) / 2
        opt2.zero_grad(set_to_none=True)
        total.backward()
        opt2.step()

    for fn in (plain_step, xmodal_step):  # warm-up (cuDNN/cuBLAS heuristics, allocator)
        fn()
    t_plain = timed(plain_step, device, p["steps"])
    t_x = timed(xmodal_step, device, p["steps"])
    return {"params_millions": round(sum(q.numel() for q in model.parameters()) / 1e6, 1), "batch": n,
            "plain_samples_per_s": round(n / t_plain, 1), "xmodal_samples_per_s": round(n / t_x, 1),
            "ratio_xmodal_over_plain": round(t_plain / t_x, 3)}


# ---------------------------------------------------------------------------------------------
def part_adapt(p: dict, device, dtype) -> dict:
    import torch

    sys.path.insert(0, str(HERE))
    from pair_scoring import _take, original_forward_shared, original_t2i_shard

    from xmodal.eval.pairs import score_matrix_blocks
    from xmodal.models.adapt import Adapt
    from xmodal.models.base import TowerOutput

    torch.manual_seed(0)
    n, m, d = p["images"], p["captions"], p["dim"]
    regions = torch.randn(n, p["regions"], d, device=device)
    tokens = torch.randn(m, 12, d, device=device)
    model = Adapt(None, None, d, direction="t2i", fused="eager").to(device).eval()
    with torch.inference_mode():
        img = model.encode_image_reps(TowerOutput(regions, regions.mean(1), None))
        txt = model.encode_text_reps(TowerOutput(tokens, tokens.mean(1), None))
        ref_m = min(p["ref_captions"], m)
        t0 = time.perf_counter()
        ref = original_forward_shared(lambda a, b: original_t2i_shard(model, a, b),
                                      img.tokens.permute(0, 2, 1), txt.pooled[:ref_m], n, ref_m)
        sync(device)
        t_ref = time.perf_counter() - t0
        full = torch.empty(n, m, device=device)
        t0 = time.perf_counter()
        for si, st, block in score_matrix_blocks(model, img, txt, image_block=1024, text_block=1024):
            full[si, st] = block
        sync(device)
        t_fused = time.perf_counter() - t0
    ref_rate, fused_rate = n * ref_m / t_ref, n * m / t_fused
    return {"pairs": n * m, "reference_pairs_per_s": round(ref_rate), "fused_pairs_per_s": round(fused_rate),
            "ratio_fused_over_reference": round(fused_rate / ref_rate, 2),
            "max_abs_diff": float((full[:, :ref_m] - ref.to(full.device)).abs().max())}


# ---------------------------------------------------------------------------------------------
def part_extract(p: dict, device, dtype) -> dict:
    import torch

    torch.manual_seed(0)
    vision = clip_model(p["tiny"]).vision_model.to(device).eval()
    size = vision.config.image_size
    pixels = torch.randn(p["batch"], 3, size, size, device=device)

    def run(use_amp: bool) -> float:
        def one() -> None:
            with torch.inference_mode(), torch.autocast(device.type, dtype=dtype, enabled=use_amp):
                vision(pixel_values=pixels).pooler_output.float().cpu()
        one()
        return timed(one, device, p["batches"])

    t32, t16 = run(False), run(True)
    return {"batch": p["batch"], "image_size": size, "fp32_images_per_s": round(p["batch"] / t32, 1),
            "bf16_images_per_s": round(p["batch"] / t16, 1), "ratio_bf16_over_fp32": round(t32 / t16, 2)}


# ---------------------------------------------------------------------------------------------
def ddp_worker(p: dict, out: Path, dtype_name: str) -> None:
    """Runs under torchrun: steps/s of the bare model, then of the same model wrapped in DDP."""
    import torch
    import torch.distributed as dist

    from xmodal.distributed import env_from_environ

    env = env_from_environ()
    cuda = torch.cuda.is_available() and not p["tiny"]
    device = torch.device(f"cuda:{env.local_rank}" if cuda else "cpu")
    dist.init_process_group("nccl" if cuda else "gloo")
    dtype = getattr(torch, dtype_name)
    torch.manual_seed(0)
    model = clip_model(p["tiny"]).to(device).train()
    pixels, ids = make_batch(model, p["batch"], device)
    labels = torch.arange(p["batch"], device=device)

    def stepper(net):
        opt = torch.optim.AdamW(net.parameters(), lr=1e-5)

        def step() -> None:
            with torch.autocast(device.type, dtype=dtype):
                o = net(input_ids=ids, pixel_values=pixels)
                logits = o.logits_per_image
                total = (torch.nn.functional.cross_entropy(logits, labels)
                         + torch.nn.functional.cross_entropy(logits.T, labels)) / 2
            opt.zero_grad(set_to_none=True)
            total.backward()
            opt.step()
        return step

    bare = stepper(model)
    bare()
    t_bare = timed(bare, device, p["steps"])
    wrapped = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if cuda else None)
    ddp = stepper(wrapped)
    ddp()
    t_ddp = timed(ddp, device, p["steps"])
    res = {"backend": dist.get_backend(), "world_size": env.world_size, "bare_steps_per_s": round(1 / t_bare, 3),
           "ddp_steps_per_s": round(1 / t_ddp, 3), "ratio_ddp_over_bare": round(t_bare / t_ddp, 3)}
    dist.destroy_process_group()
    if env.rank == 0:
        out.write_text(json.dumps(res))


def part_ddp(p: dict, device, dtype, out: Path, cap: float) -> dict:
    res_file = out / "ddp_result.json"
    res_file.unlink(missing_ok=True)
    spec = out / "ddp_spec.json"
    spec.write_text(json.dumps({"p": p, "dtype": str(dtype).replace("torch.", "")}))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1",
           str(Path(__file__).resolve()), "--ddp-worker", str(spec), "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=cap)
    if proc.returncode != 0 or not res_file.exists():
        raise RuntimeError(f"torchrun exited {proc.returncode}: {proc.stderr.strip()[-600:]}")
    return json.loads(res_file.read_text())


# ---------------------------------------------------------------------------------------------
def run_part(name: str, p: dict, device, dtype, out: Path, cap: float) -> dict:
    t0 = time.perf_counter()
    try:
        if name == "ddp":
            res = part_ddp(p, device, dtype, out, cap)
        else:
            res = {"eval": part_eval, "train": part_train, "adapt": part_adapt, "extract": part_extract}[name](
                p, device, dtype)
        status = "ok"
    except Exception as e:  # one failing part must not lose the others' figures
        res, status = {"error": f"{type(e).__name__}: {e}"[:800]}, "error"
    wall = time.perf_counter() - t0
    if status == "ok" and wall > cap:
        status = "over_cap"
    return {"status": status, "seconds": round(wall, 2), "cap_s": cap, **res}


def environment(device) -> dict:
    import torch

    info = {"python": platform.python_version(), "torch": torch.__version__, "device": str(device),
            "cpu_count": os.cpu_count()}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dry-run", action="store_true", help="tiny sizes on CPU (in the test suite)")
    ap.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated from {', '.join(PARTS)}")
    ap.add_argument("--out", default="gpu_check_out", help="folder for gpu_check.json")
    ap.add_argument("--ddp-worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.ddp_worker:
        spec = json.loads(Path(args.ddp_worker).read_text())
        ddp_worker(spec["p"], out / "ddp_result.json", spec["dtype"])
        return 0
    import torch

    parts = [x for x in args.parts.split(",") if x]
    bad = [x for x in parts if x not in PARTS]
    if bad:
        ap.error(f"unknown part {bad[0]!r}; choose from {', '.join(PARTS)}")
    if not args.dry_run and not torch.cuda.is_available():
        ap.error("no CUDA device: run on a GPU machine, or pass --dry-run (tiny, CPU)")
    device = torch.device("cpu" if args.dry_run else "cuda")
    dtype = torch.bfloat16
    sizes = DRY if args.dry_run else FULL
    report = {"dry_run": args.dry_run, "environment": environment(device), "parts": {}}
    t0 = time.perf_counter()
    for name in parts:
        res = run_part(name, sizes[name], device, dtype, out, CAPS[name] * (4 if args.dry_run else 1))
        report["parts"][name] = res
        report["total_s"] = round(time.perf_counter() - t0, 2)
        (out / "gpu_check.json").write_text(json.dumps(report, indent=1))
        ratio = {k: v for k, v in res.items() if k.startswith("ratio")}
        print(f"[{name}] {res['status']} in {res['seconds']:.1f}s {json.dumps(ratio)}"
              + (f" {res['error']}" if res["status"] == "error" else ""), flush=True)
    failed = [n for n, r in report["parts"].items() if r["status"] == "error"]
    print(f"total {report['total_s']:.1f}s; results in {out / 'gpu_check.json'}"
          + (f"; FAILED: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
