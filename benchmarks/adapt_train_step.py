"""Benchmark: one ADAPT training step (scores of a batch x batch, hinge loss, backward), both directions.

Each direction is timed, in the same run on the same inputs, through:

- ``autograd``: the reference, autograd over the original computation (adapt every caption's
  or image's tokens, Fovea softmax, mean / max, cosine), over chunks of the conditioning side
  that are recomputed in backward (``torch.utils.checkpoint``) so memory stays bounded;
- ``fused``: the model's training path (``model.args.fused``, default ``auto``: the C kernels,
  ``NativeAdaptScore``, where they apply; else ``_AdaptScore``'s torch.compile'd kernels);
- ``other``: with ``--compare-fused MODE``, the same model with ``fused: MODE`` (``compile``:
  the torch.compile'd kernels the C kernels replace);
- ``rev``: with ``--compare-rev REV``, the training path of ``src/xmodal/models/adapt.py`` at
  git revision ``REV`` (e.g. the code before this benchmark's last change), same inputs.

Inputs come from the benchmark's shapes (random tokens: ``--batch --regions --words --dim``)
or, with ``--config``, from the first training batch of a config exactly as ``xmodal train``
reads it (frozen tower outputs: image grid and word tokens with their real counts, padded as
the text cache stores them), projected to the config's ``latent_dim`` like the model does.

    python benchmarks/adapt_train_step.py                           # batch 128, 25 regions, <= 12 words, 1,024-d
    python benchmarks/adapt_train_step.py --config configs/emoji/adapt_i2t.yaml
    python benchmarks/adapt_train_step.py --config my.yaml data.path=pairs.csv --compare-rev HEAD
    python benchmarks/adapt_train_step.py --dry-run                 # tiny shapes, seconds (a test runs it)
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from xmodal.losses import create_loss  # noqa: E402
from xmodal.models import adapt_native  # noqa: E402
from xmodal.models.adapt import Adapt  # noqa: E402
from xmodal.models.base import TowerOutput  # noqa: E402


def synthetic_inputs(batch: int, regions: int, words: int, dim: int, seed: int = 0) -> tuple[TowerOutput, TowerOutput]:
    """Random regions ``(B, R, D)`` and captions of ``words // 2`` to ``words`` words."""
    g = torch.Generator().manual_seed(seed)
    img = torch.randn(batch, regions, dim, generator=g)
    txt = torch.randn(batch, words, dim, generator=g)
    lengths = torch.randint(words // 2, words + 1, (batch,), generator=g)
    mask = torch.arange(words)[None] < lengths[:, None]  # captions of different lengths
    return TowerOutput(img, img.mean(1), None), TowerOutput(txt, txt.mean(1), mask)


def config_inputs(config: str, overrides: list[str]) -> tuple[TowerOutput, TowerOutput, int]:
    """The first training batch of ``config`` as the model receives it, and its latent size."""
    from xmodal.config import load_config
    from xmodal.data.inputs import BatchOrder
    from xmodal.data.pipeline import prepare_split
    from xmodal.models import create_model

    cfg = load_config(config, overrides)
    model = create_model(cfg.model)
    split = prepare_split(cfg, model, cfg.data.train_split, cfg.data.train_lang, training=True, progress=False)
    text_idx, image_idx = BatchOrder(split.dataset.gt, cfg.train.batch_size, cfg.train.seed).batch(0)
    img, txt = split.images(image_idx), split.texts(text_idx)
    if not (isinstance(img, TowerOutput) and isinstance(txt, TowerOutput)):
        raise SystemExit("--config needs frozen towers (cached tower outputs), like configs/emoji/adapt_*.yaml")
    return img, txt, int(cfg.model.args.get("latent_dim") or img.tokens.shape[-1])


# ------------------------------------------------------------------------------------------
# the reference: autograd over the original computation
# ------------------------------------------------------------------------------------------
def _ref_chunk(model: Adapt, tok: torch.Tensor, mask: torch.Tensor | None, cond: torch.Tensor) -> torch.Tensor:
    """Scores ``(N_cond_chunk, N_tok)``: adapt ``tok`` (N_tok, L, D) by every conditioning row."""
    d = model.dim
    scale, shift, unit = cond[:, :d], cond[:, d:2 * d], cond[:, 2 * d:]
    a = tok[None] * scale[:, None, None] + shift[:, None, None]  # (C, N_tok, L, D)
    logits = a * model.fovea.smooth
    if mask is not None:
        logits = logits.masked_fill(~mask[None, :, :, None], float("-inf"))
    pa = torch.softmax(logits, dim=2) * a  # Fovea
    if model.direction == "t2i":
        if mask is not None:
            pa = pa.masked_fill(~mask[None, :, :, None], 0.0)
        v = pa.sum(2)  # the mean up to a per-image factor: the cosine is the same
    else:
        if mask is not None:
            pa = pa.masked_fill(~mask[None, :, :, None], float("-inf"))
        v = pa.amax(2)
    return F.cosine_similarity(v, unit[:, None], dim=-1, eps=1e-8)  # (C, N_tok)


def autograd_score(model: Adapt, img: TowerOutput, txt: TowerOutput, chunk: int) -> torch.Tensor:
    tok, cond = (img, txt) if model.direction == "t2i" else (txt, img)
    parts = [checkpoint(_ref_chunk, model, tok.tokens, tok.mask, cond.tokens[sl, 0], use_reentrant=False)
             for sl in (slice(s, s + chunk) for s in range(0, cond.tokens.shape[0], chunk))]
    out = torch.cat(parts, dim=0)  # (N_cond, N_tok)
    return out.t() if model.direction == "t2i" else out


def load_revision(rev: str) -> Any:
    """``xmodal.models.adapt`` as it was at git revision ``rev`` (not registered)."""
    src = subprocess.run(["git", "show", f"{rev}:src/xmodal/models/adapt.py"], cwd=ROOT, check=True,
                         capture_output=True, text=True).stdout
    src = src.replace('@MODELS.register("adapt")', "").replace('MODEL_ARGS["adapt"] = AdaptArgs', "")
    name = "xmodal.models.adapt_at_rev"
    spec = importlib.util.spec_from_loader(name, loader=None)
    mod = importlib.util.module_from_spec(spec)
    mod.__package__ = "xmodal.models"
    sys.modules[name] = mod
    exec(compile(src, f"{rev}:adapt.py", "exec"), mod.__dict__)  # noqa: S102 - our own source at a revision
    return mod


# ------------------------------------------------------------------------------------------
# timing
# ------------------------------------------------------------------------------------------
def make_model(cls: type, direction: str, dim: int, in_dims: tuple[int | None, int | None], **kw) -> torch.nn.Module:
    torch.manual_seed(0)
    return cls(None, None, dim, direction=direction, image_in_dim=in_dims[0], text_in_dim=in_dims[1], **kw).train()


def run_step(model, score: Callable, data, step: int) -> tuple[float, list[torch.Tensor]]:
    loss = create_loss("adapt_hinge")
    model.zero_grad()
    img = TowerOutput(data[0].tokens.clone().requires_grad_(True), data[0].pooled, data[0].mask)
    txt = TowerOutput(data[1].tokens.clone().requires_grad_(True), data[1].pooled, data[1].mask)
    t0 = time.perf_counter()
    scores = score(model.encode_image_reps(img), model.encode_text_reps(txt))
    total = sum(v for k, v in loss.from_scores(scores, step=step).items() if k.endswith("_loss"))
    total.backward()
    seconds = time.perf_counter() - t0
    return seconds, [scores.detach(), img.tokens.grad, txt.tokens.grad, model.adapt.fc_gamma.weight.grad]


def time_impl(model, score: Callable, data, repeat: int, warm_up: bool) -> tuple[float, list[torch.Tensor]]:
    """Best of ``repeat`` steps, after one warm-up step where kernels may be compiled."""
    first, outs = run_step(model, score, data, 0)
    times = [run_step(model, score, data, i + 1)[0] for i in range(repeat)] if warm_up else [first]
    if not warm_up:
        times += [run_step(model, score, data, i + 1)[0] for i in range(repeat - 1)]
    return min(times), outs


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def kernel_floor(n_tok: int, length: int, n_cond: int, dim: int) -> dict:
    """The T2I passes of the C kernels alone against the exponential alone, same run: the
    forward and backward over ``n_tok x n_cond`` pairs of ``length x dim`` tokens (every pair
    with gradient), and the kernels' ``exp`` over an L2-sized array on one thread."""
    g = torch.Generator().manual_seed(0)
    tok = torch.randn(n_tok, length, dim, generator=g)
    scale, shift = 1 + 0.3 * torch.randn(n_cond, dim, generator=g), 0.1 * torch.randn(n_cond, dim, generator=g)
    unit = F.normalize(torch.randn(n_cond, dim, generator=g), dim=-1)
    lengths = adapt_native.lengths_of(None, tok)
    tmax, tmin = tok.amax(1), tok.amin(1)
    args = (tok, lengths, tmax, tmin, scale, shift, unit, 10.0)
    fwd = min(_timed(lambda: adapt_native.fovea_forward("t2i", *args, stats=True)) for _ in range(3))
    out, nrm, *stats = adapt_native.fovea_forward("t2i", *args, stats=True)
    grad = torch.randn(n_tok, n_cond, generator=g)
    bwd = min(_timed(lambda: adapt_native.fovea_backward("t2i", *args, stats, nrm, out, grad)) for _ in range(3))
    y = -10 * torch.rand(1 << 16, generator=g)  # 256 KB: the exponential's own rate, not memory's
    reps = 64
    one = min(_timed(lambda: [adapt_native.exp(y) for _ in range(reps)]) for _ in range(3))
    elements = n_tok * n_cond * length * dim
    exp_rate = reps * y.numel() / one * torch.get_num_threads()  # per thread, times the threads
    return {"elements_per_pass": elements, "forward_s": fwd, "backward_s": bwd,
            "forward_rate": elements / fwd, "backward_rate": elements / bwd, "exp_rate_all_threads": exp_rate,
            "two_exp_passes_s": 2 * elements / exp_rate}


def _timed(fn: Callable) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def bench_direction(direction: str, data, dim: int, in_dims, args, rev_mod) -> dict:
    kw = {"fused": args.fused}  # dry run: tiny shapes stay under the compile threshold
    impls: dict[str, tuple[torch.nn.Module, Callable]] = {}
    if not args.no_autograd:
        ref = make_model(Adapt, direction, dim, in_dims, **kw)
        impls["autograd"] = (ref, lambda i, t: autograd_score(ref, i, t, args.ref_chunk))
    ours = make_model(Adapt, direction, dim, in_dims, **kw)
    impls["fused"] = (ours, ours.score)
    if args.compare_fused:
        other = make_model(Adapt, direction, dim, in_dims, fused=args.compare_fused)
        impls["other"] = (other, other.score)
    if rev_mod is not None:
        old = make_model(rev_mod.Adapt, direction, dim, in_dims, **kw)
        old.load_state_dict(ours.state_dict())
        impls["rev"] = (old, old.score)
    row: dict[str, Any] = {"variant": direction}
    outs = {}
    for name, (model, score) in impls.items():
        row[f"{name}_s"], outs[name] = time_impl(model, score, data, args.repeat, warm_up=name != "autograd")
        print(f"  {direction} {name}: {row[f'{name}_s']:.3f} s/step", flush=True)
    # the fused path's scores and gradients against the reference's (float32)
    if "autograd" in outs:
        row["max_rel_err"] = max(rel_err(a, b) for a, b in zip(outs["fused"], outs["autograd"]))
    return row


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--regions", type=int, default=25)
    p.add_argument("--words", type=int, default=12)
    p.add_argument("--dim", type=int, default=1024)
    p.add_argument("--config", default=None, help="time the first training batch of this config instead")
    p.add_argument("overrides", nargs="*", help="dotted overrides of --config")
    p.add_argument("--variants", default="t2i,i2t")
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--ref-chunk", type=int, default=8, help="conditioning rows per checkpointed autograd chunk")
    p.add_argument("--fused", default="auto", choices=["auto", "native", "compile", "eager"], help="model.args.fused")
    p.add_argument("--compare-rev", default=None, help="also time adapt.py at this git revision")
    p.add_argument("--compare-fused", default=None, choices=["native", "compile", "eager"],
                   help="also time the training path with this model.args.fused (e.g. compile: torch.compile'd kernels)")
    p.add_argument("--no-autograd", action="store_true", help="skip the (slow) reference: fused (and rev) only")
    p.add_argument("--kernel-floor", action="store_true",
                   help="also time the C kernels' T2I passes alone and their exponential alone (needs a C compiler)")
    p.add_argument("--dry-run", action="store_true", help="tiny shapes, one step each (C kernels, or eager torch ops below the compile threshold)")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if args.dry_run:
        args.batch, args.regions, args.words, args.dim, args.repeat = 8, 4, 5, 16, 1
    if args.config:
        img, txt, dim = config_inputs(args.config, args.overrides)
        in_dims = (img.tokens.shape[-1], txt.tokens.shape[-1])
        data = (img, txt)
    else:
        data, dim, in_dims = synthetic_inputs(args.batch, args.regions, args.words, args.dim), args.dim, (None, None)
    img, txt = data
    lengths = txt.mask.sum(1) if txt.mask is not None else torch.full((txt.tokens.shape[0],), txt.tokens.shape[1])
    print(f"batch {img.tokens.shape[0]}: {img.tokens.shape[1]} regions x {img.tokens.shape[2]}-d, words "
          f"{int(lengths.min())}-{int(lengths.max())} (mean {float(lengths.float().mean()):.1f}, padded to "
          f"{txt.tokens.shape[1]}) x {txt.tokens.shape[2]}-d, latent {dim}; {torch.get_num_threads()} threads, "
          f"load {os.getloadavg()[0]:.1f}")
    rev_mod = load_revision(args.compare_rev) if args.compare_rev else None
    rows = [bench_direction(v, data, dim, in_dims, args, rev_mod) for v in args.variants.split(",")]
    ref = not args.no_autograd
    head = f"{'variant':<8} {'fused (s)':>10}" + (f" {'autograd (s)':>12} {'speed-up':>9}" if ref else "")
    if args.compare_fused:
        head += f" {args.compare_fused + ' (s)':>12} {'vs it':>6}"
    if rev_mod is not None:
        head += f" {args.compare_rev + ' (s)':>14} {'vs rev':>7}"
    print(head + (f" {'max rel err':>12}" if ref else ""))
    for r in rows:
        line = f"{r['variant']:<8} {r['fused_s']:>10.3f}"
        if ref:
            line += f" {r['autograd_s']:>12.3f} {r['autograd_s'] / r['fused_s']:>8.1f}x"
        if args.compare_fused:
            line += f" {r['other_s']:>12.3f} {r['other_s'] / r['fused_s']:>5.1f}x"
        if rev_mod is not None:
            line += f" {r['rev_s']:>14.3f} {r['rev_s'] / r['fused_s']:>6.1f}x"
        print(line + (f" {r['max_rel_err']:>12.1e}" if ref else ""))
    floor = None
    if args.kernel_floor:
        floor = kernel_floor(img.tokens.shape[0], img.tokens.shape[1], txt.tokens.shape[0], dim)
        print(f"T2I C kernels alone: {floor['elements_per_pass']:.2e} elements a pass; forward "
              f"{floor['forward_s']:.3f} s ({floor['forward_rate']:.2e}/s), backward {floor['backward_s']:.3f} s "
              f"({floor['backward_rate']:.2e}/s); their exp alone {floor['exp_rate_all_threads']:.2e}/s on "
              f"{torch.get_num_threads()} threads: two exp passes take {floor['two_exp_passes_s']:.3f} s at least")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "rows": rows, "threads": torch.get_num_threads(),
                                               "kernel_floor": floor, "load_end": os.getloadavg()[0]}, indent=1))
    return rows


if __name__ == "__main__":
    main()
