"""Benchmark: exact ADAPT pair scoring, and two-stage (shortlist + re-rank) evaluation.

Part 1 - speed. Exact ADAPT-T2I scores of ``--images x --captions`` pairs (36 regions x
1,024-d by default, the paper's setting) with :class:`xmodal.models.adapt.Adapt`, against
the original implementation's evaluation loop, re-implemented here as the reference:
``Similarity.forward_shared`` visits shards of 128 images x 128 captions and
``AdaptiveEmbeddingT2I.forward`` adapts the shard's regions **one caption at a time**
(``ADAPT`` layer, ``Fovea`` softmax over regions, mean, cosine). The reference is timed on
the first ``--ref-captions`` captions against every image and its pairs/s extrapolated;
both computations are checked to agree on those pairs. Same for ADAPT-I2T (the original
loops over images) on a subset of both sides.

Part 2 - two-stage evaluation. A synthetic image-caption collection where a mean-pooled
first stage is decent but caption-conditioned pooling helps: images hold a few objects
of very different sizes (1 to 8 of 36 regions) in faint clutter, and captions name 2-3
of them, large or small. A dual encoder over mean-pooled regions (InfoNCE) is the first
stage; a small ADAPT-T2I (with linear region and word projections) is trained with
ADAPT's hinge loss. Table: shortlist size ``k`` vs rsum vs seconds, against exact ADAPT
evaluation of every pair.

    python benchmarks/pair_scoring.py                       # full run (about 12 minutes on 2 idle cores)
    python benchmarks/pair_scoring.py --quick               # small sizes, a minute or two
    python benchmarks/pair_scoring.py --skip-two-stage --json out.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from xmodal.data.base import GroundTruth  # noqa: E402
from xmodal.eval.metrics import metrics_from_ranks, ranks_from_embeddings  # noqa: E402
from xmodal.eval.pairs import exact_ranks, pair_rescore_fn, score_matrix_blocks, two_stage_ranks  # noqa: E402
from xmodal.models import adapt as adapt_mod  # noqa: E402
from xmodal.models import adapt_native  # noqa: E402
from xmodal.models.adapt import Adapt  # noqa: E402
from xmodal.models.base import TowerOutput  # noqa: E402

SHARD = 128  # the original's shared_size


# ------------------------------------------------------------------------------------------
# the original computation (jwehrmann/retrieval.pytorch), as the reference
# ------------------------------------------------------------------------------------------
@torch.no_grad()
def original_t2i_shard(model: Adapt, img_embed: torch.Tensor, cap_vectors: torch.Tensor) -> torch.Tensor:
    """``AdaptiveEmbeddingT2I.forward`` on one shard: regions (B, D, R), captions one by one."""
    B, D, _ = img_embed.shape
    sims = torch.zeros(B, len(cap_vectors))
    fc_gamma, fc_beta, smooth = model.adapt.fc_gamma, model.adapt.fc_beta, model.fovea.smooth
    for i, cap_repr in enumerate(cap_vectors):
        cap_repr = cap_repr[None]  # (1, D)
        value = img_embed.view(B, D, 1, -1)  # ADAPT layer, groups = 1
        gammas = fc_gamma(cap_repr).view(1, D, 1, 1)
        betas = fc_beta(cap_repr).view(1, D, 1, 1)
        adapted = (value * (gammas + 1) + betas).view(B, D, -1)
        out = torch.softmax(adapted * smooth, dim=-1) * adapted  # Fovea
        img_vector = F.normalize(out.mean(-1), dim=-1)
        cap_vector = F.normalize(cap_repr, dim=-1)
        sims[:, i] = (img_vector @ cap_vector.t()).squeeze(-1)
    return sims


@torch.no_grad()
def original_i2t_shard(model: Adapt, img_vectors: torch.Tensor, cap_embed: torch.Tensor) -> torch.Tensor:
    """``AdaptiveEmbeddingI2T.forward`` on one shard: words (B, D, T), images one by one."""
    sims = torch.zeros(len(img_vectors), cap_embed.shape[0])
    B, D, _ = cap_embed.shape
    fc_gamma, fc_beta, smooth = model.adapt.fc_gamma, model.adapt.fc_beta, model.fovea.smooth
    for i, img_vector in enumerate(img_vectors):
        query = img_vector[None]
        value = cap_embed.view(B, D, 1, -1)
        adapted = (value * (fc_gamma(query).view(1, D, 1, 1) + 1) + fc_beta(query).view(1, D, 1, 1)).view(B, D, -1)
        out = torch.softmax(adapted * smooth, dim=-1) * adapted
        txt_vector = F.normalize(out.max(dim=-1)[0], dim=-1)
        sims[i, :] = (F.normalize(query, dim=-1) @ txt_vector.t()).squeeze(0)
    return sims


def original_forward_shared(shard_fn, a: torch.Tensor, b: torch.Tensor, n_a: int, n_b: int) -> torch.Tensor:
    """``Similarity.forward_shared``: every 128 x 128 shard pair."""
    d = torch.zeros(n_a, n_b)
    for i in range(0, n_a, SHARD):
        for j in range(0, n_b, SHARD):
            d[i:i + SHARD, j:j + SHARD] = shard_fn(a[i:i + SHARD], b[j:j + SHARD])
    return d


# ------------------------------------------------------------------------------------------
# part 1: speed
# ------------------------------------------------------------------------------------------
def speed(args) -> dict:
    torch.manual_seed(0)
    n, m, r, d, words = args.images, args.captions, args.regions, args.dim, 12
    res: dict = {"images": n, "captions": m, "regions": r, "dim": d}
    regions = torch.randn(n, r, d)
    tokens = torch.randn(m, words, d)
    for direction in ("t2i", "i2t"):
        model = Adapt(None, None, d, direction=direction, fused="auto").eval()
        with torch.no_grad():
            model.adapt.fc_gamma.weight.mul_(3.0)
            img = model.encode_image_reps(TowerOutput(regions, regions.mean(1), None))
            txt = model.encode_text_reps(TowerOutput(tokens, tokens.mean(1), None))
        out: dict = {}
        if direction == "t2i":
            ref_m = min(args.ref_captions, m)
            t0 = time.perf_counter()
            ref = original_forward_shared(lambda a, b: original_t2i_shard(model, a, b),
                                          img.tokens.permute(0, 2, 1), txt.pooled[:ref_m], n, ref_m)
            t_ref = time.perf_counter() - t0
            out["reference"] = {"pairs": n * ref_m, "seconds": t_ref, "pairs_per_s": n * ref_m / t_ref,
                                "note": f"first {ref_m} captions x all images, extrapolated"}
            sub = (slice(0, n), slice(0, ref_m))
        else:
            ref_n = min(args.ref_images, n)
            t0 = time.perf_counter()
            ref = original_forward_shared(lambda a, b: original_i2t_shard(model, a, b), img.pooled[:ref_n],
                                          txt.tokens.permute(0, 2, 1), ref_n, m)
            t_ref = time.perf_counter() - t0
            out["reference"] = {"pairs": ref_n * m, "seconds": t_ref, "pairs_per_s": ref_n * m / t_ref,
                                "note": f"first {ref_n} images x all captions, extrapolated"}
            sub = (slice(0, ref_n), slice(0, m))
        # fused algebra without compilation, on the reference's pairs
        model.fused = "eager"
        t0 = time.perf_counter()
        with torch.inference_mode():
            eager = model.score(_take(img, sub[0]), _take(txt, sub[1]))
        t_eager = time.perf_counter() - t0
        out["fused_eager"] = {"pairs": eager.numel(), "seconds": t_eager, "pairs_per_s": eager.numel() / t_eager}
        # torch.compile'd kernels: warm-up, then the reference's pairs
        if adapt_mod.compile_available():
            model.fused = "compile"
            t0 = time.perf_counter()
            with torch.inference_mode():
                model.score(_take(img, slice(0, 8)), _take(txt, slice(0, 8)))
            out["compile_warmup_seconds"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            with torch.inference_mode():
                comp = model.score(_take(img, sub[0]), _take(txt, sub[1]))
            t_comp = time.perf_counter() - t0
            out["fused_compile"] = {"pairs": comp.numel(), "seconds": t_comp, "pairs_per_s": comp.numel() / t_comp}
        # what evaluation uses (fused: auto, the C kernels where they apply): the full matrix in evaluation tiles
        model.fused = "auto"
        out["native"] = adapt_native.available()
        full = torch.empty(n, m)
        t0 = time.perf_counter()
        for si, st, block in score_matrix_blocks(model, img, txt, image_block=args.image_block, text_block=1024):
            full[si, st] = block
        t_full = time.perf_counter() - t0
        out["fused"] = {"pairs": n * m, "seconds": t_full, "pairs_per_s": n * m / t_full,
                        "compiled": bool(adapt_mod.compile_available())}
        out["max_abs_diff_vs_reference"] = float((full[sub] - ref).abs().max())
        out["max_abs_diff_eager_vs_compiled"] = float((full[sub] - eager).abs().max())
        out["speedup"] = out["fused"]["pairs_per_s"] / out["reference"]["pairs_per_s"]
        out["speedup_eager"] = out["fused_eager"]["pairs_per_s"] / out["reference"]["pairs_per_s"]
        res[direction] = out
        comp_rate = out.get("fused_compile", {}).get("pairs_per_s", float("nan"))
        print(f"[{direction}] reference {out['reference']['pairs_per_s']:,.0f} pairs/s | fused eager "
              f"{out['fused_eager']['pairs_per_s']:,.0f} | torch.compile {comp_rate:,.0f} | "
              f"auto ({'C kernels' if out['native'] else 'compiled'}) {out['fused']['pairs_per_s']:,.0f} "
              f"({out['fused']['seconds']:.1f} s for {n * m:,} pairs) | speed-up {out['speedup']:.1f}x | "
              f"max |diff| {out['max_abs_diff_vs_reference']:.1e}", flush=True)
        if direction == "i2t" and args.skip_i2t:
            break
    return res


def _take(reps: TowerOutput, sl: slice) -> TowerOutput:
    return TowerOutput(reps.tokens[sl], reps.pooled[sl], None if reps.mask is None else reps.mask[sl])


# ------------------------------------------------------------------------------------------
# part 2: two-stage evaluation on synthetic data
# ------------------------------------------------------------------------------------------
class Synthetic:
    """Images: ``objects`` concepts of 1-8 regions each in faint clutter; captions name 2-3.

    Concepts have sparse non-negative visual codes (``din``-d); a word's features are a
    fixed linear function of its concept's code plus noise (``dw``-d); captions add 2-4
    function words. Mean-pooling favours large objects; captions name small ones too.
    """

    def __init__(self, concepts: int = 400, din: int = 64, dw: int = 64, regions: int = 36, words: int = 10,
                 objects: int = 6, seed: int = 0) -> None:
        g = np.random.default_rng(seed)
        self.din, self.dw, self.regions, self.words = din, dw, regions, words
        self.objects, self.concepts = objects, concepts
        self.codes = np.zeros((concepts, din), np.float32)
        for c in range(concepts):
            self.codes[c, g.choice(din, 6, replace=False)] = g.uniform(0.5, 1.5, 6)
        mix = g.standard_normal((dw, din)).astype(np.float32) / np.sqrt(din)
        self.word_of = self.codes @ mix.T  # (concepts, dw)
        self.stop = 0.5 * g.standard_normal((30, dw)).astype(np.float32)

    def sample(self, n: int, caps: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, np.ndarray]:
        g = np.random.default_rng(seed)
        objs = np.stack([g.choice(self.concepts, self.objects, replace=False) for _ in range(n)])
        regions = 0.15 * np.abs(g.standard_normal((n, self.regions, self.din))).astype(np.float32)
        sizes = g.choice([1, 2, 4, 8], size=(n, self.objects), p=[0.4, 0.3, 0.2, 0.1])
        for i in range(n):
            perm, pos = g.permutation(self.regions), 0
            for j in range(self.objects):
                where = perm[pos:pos + sizes[i, j]]
                pos += sizes[i, j]
                regions[i, where] += self.codes[objs[i, j]] * g.uniform(0.7, 1.3, (len(where), 1)).astype(np.float32)
        words = np.zeros((n * caps, self.words, self.dw), np.float32)
        mask = np.zeros((n * caps, self.words), bool)
        t2i = np.repeat(np.arange(n), caps)
        for t in range(n * caps):
            named = g.choice(self.objects, g.integers(2, 4), replace=False)
            toks = [self.word_of[objs[t2i[t], j]] for j in named]
            toks += [self.stop[s] for s in g.integers(0, len(self.stop), g.integers(2, 5))]
            toks = np.stack(toks) + 0.1 * g.standard_normal((len(toks), self.dw)).astype(np.float32)
            words[t, :len(toks)] = toks
            mask[t, :len(toks)] = True
        return torch.from_numpy(regions), torch.from_numpy(words), torch.from_numpy(mask), t2i


def train_adapt(data: Synthetic, regions, words, mask, t2i, steps: int, dim: int, batch: int = 128) -> Adapt:
    from xmodal.losses import create_loss
    from xmodal.models.image.features import FeatureTower

    torch.manual_seed(0)
    model = Adapt(FeatureTower(data.din, dim), FeatureTower(data.dw, dim), dim, direction="t2i", fused="compile")
    loss = create_loss("adapt_hinge", beta=0.991)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    g = torch.Generator().manual_seed(0)
    t0 = time.perf_counter()
    for step in range(steps):
        tidx = torch.randint(0, len(t2i), (batch,), generator=g)
        iidx = torch.from_numpy(t2i[tidx.numpy()])
        img = model.encode_image_reps(regions[iidx])
        txt = model.encode_text_reps({"features": words[tidx], "mask": mask[tidx]})
        out = loss.from_scores(model.score(img, txt), pos_mask=iidx[:, None] == iidx[None, :], step=step)
        opt.zero_grad()
        out["hinge_loss"].backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 2.0)
        opt.step()
        sched.step()
        if step % 200 == 0 or step == steps - 1:
            print(f"  adapt step {step:5d}  loss {float(out['hinge_loss']):9.2f}  {time.perf_counter() - t0:6.1f} s",
                  flush=True)
    return model.eval()


def train_first_stage(regions, words, mask, t2i, steps: int, dim: int, batch: int = 256):
    """Dual encoder: linear maps of mean-pooled regions and mean-pooled words, InfoNCE."""
    torch.manual_seed(0)
    wi, wt = torch.nn.Linear(regions.shape[-1], dim), torch.nn.Linear(words.shape[-1], dim)
    opt = torch.optim.Adam([*wi.parameters(), *wt.parameters()], lr=3e-3)
    mreg = regions.mean(1)
    mtxt = (words * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        tidx = torch.randint(0, len(t2i), (batch,), generator=g)
        iidx = torch.from_numpy(t2i[tidx.numpy()])
        logits = F.normalize(wi(mreg[iidx]), dim=-1) @ F.normalize(wt(mtxt[tidx]), dim=-1).T / 0.05
        pos = (iidx[:, None] == iidx[None, :]).float()
        loss = -(F.log_softmax(logits, 1) * pos / pos.sum(1, keepdim=True)).sum(1).mean() \
            - (F.log_softmax(logits, 0) * pos / pos.sum(0, keepdim=True)).sum(0).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()

    @torch.no_grad()
    def embed(reg, wrd, msk):
        txt = (wrd * msk[..., None]).sum(1) / msk.sum(1, keepdim=True)
        return F.normalize(wi(reg.mean(1)), dim=-1), F.normalize(wt(txt), dim=-1)

    return embed


def two_stage(args) -> dict:
    data = Synthetic(din=args.ts_dim, dw=args.ts_dim, regions=args.regions)
    t0 = time.perf_counter()
    train = data.sample(args.ts_train_images, 5, seed=1)
    test = data.sample(args.ts_images, 5, seed=2)
    gt = GroundTruth.from_map(test[3], args.ts_images)
    print(f"[two-stage] data {time.perf_counter() - t0:.1f} s; test {args.ts_images} images x "
          f"{len(test[3])} captions, {args.regions} regions x {args.ts_dim}-d", flush=True)
    t0 = time.perf_counter()
    model = train_adapt(data, *train, steps=args.ts_steps, dim=args.ts_dim)
    t_train = time.perf_counter() - t0
    embed = train_first_stage(*train, steps=800, dim=args.ts_dim)
    fi, ft = embed(test[0], test[1], test[2])
    with torch.inference_mode():
        img = model.encode_image_reps(test[0])
        txt = model.encode_text_reps({"features": test[1], "mask": test[2]})
    first = metrics_from_ranks(*ranks_from_embeddings(fi, ft, gt))
    with torch.inference_mode():  # compile the kernels outside the timings: a small run of each path
        few_img, few_txt = np.arange(300), np.flatnonzero(test[3] < 300)
        few = (_take(img, slice(0, 300)), _take(txt, slice(0, len(few_txt))), gt.subset(few_txt, few_img))
        exact_ranks(model, *few, image_block=1024)
        for k in (1, 10):
            two_stage_ranks(fi[:300], ft[few_txt], pair_rescore_fn(model, few[0], few[1]), few[2], k)
    t0 = time.perf_counter()
    exact = metrics_from_ranks(*exact_ranks(model, img, txt, gt, image_block=1024))
    t_exact = time.perf_counter() - t0
    rows = [{"k": "first stage only", "rsum": first["rsum"], "seconds": None, "pairs": 0}]
    for k in args.ks:
        t0 = time.perf_counter()
        out = two_stage_ranks(fi, ft, pair_rescore_fn(model, img, txt), gt, k)
        dt = time.perf_counter() - t0
        met = metrics_from_ranks(out["i2t_ranks"], out["t2i_ranks"])
        rows.append({"k": k, "rsum": met["rsum"], "seconds": dt, "pairs": out["pairs_scored"],
                     "i2t_r1": met["i2t_r1"], "t2i_r1": met["t2i_r1"]})
    rows.append({"k": "all (exact)", "rsum": exact["rsum"], "seconds": t_exact, "pairs": args.ts_images * len(test[3]),
                 "i2t_r1": exact["i2t_r1"], "t2i_r1": exact["t2i_r1"]})
    print(f"[two-stage] ADAPT trained {args.ts_steps} steps in {t_train:.0f} s; first-stage rsum {first['rsum']:.1f}, "
          f"exact ADAPT rsum {exact['rsum']:.1f} in {t_exact:.1f} s")
    print(f"{'k':>16} {'rsum':>7} {'% exact':>8} {'seconds':>8} {'/ exact':>8} {'pairs scored':>13}")
    for row in rows:
        sec = row["seconds"]
        print(f"{str(row['k']):>16} {row['rsum']:7.1f} {100 * row['rsum'] / exact['rsum']:7.1f}% "
              f"{'-' if sec is None else f'{sec:.1f}':>8} {'-' if sec is None else f'{sec / t_exact:.3f}':>8} "
              f"{row['pairs']:13,d}", flush=True)
    return {"train_seconds": t_train, "first_stage": first, "exact": exact, "exact_seconds": t_exact, "rows": rows,
            "test_images": args.ts_images, "test_captions": int(len(test[3])), "dim": args.ts_dim,
            "train_steps": args.ts_steps}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=1000)
    p.add_argument("--captions", type=int, default=5000)
    p.add_argument("--regions", type=int, default=36)
    p.add_argument("--dim", type=int, default=1024)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--image-block", type=int, default=1024, help="image rows per evaluation tile")
    p.add_argument("--ref-captions", type=int, default=64, help="captions the T2I reference is timed on")
    p.add_argument("--ref-images", type=int, default=16, help="images the I2T reference is timed on")
    p.add_argument("--skip-i2t", action="store_true")
    p.add_argument("--skip-speed", action="store_true")
    p.add_argument("--skip-two-stage", action="store_true")
    p.add_argument("--ts-images", type=int, default=5000, help="two-stage test images (5 captions each)")
    p.add_argument("--ts-train-images", type=int, default=8000)
    p.add_argument("--ts-dim", type=int, default=64)
    p.add_argument("--ts-steps", type=int, default=800, help="ADAPT training steps for the two-stage part")
    p.add_argument("--ks", type=int, nargs="+", default=[10, 20, 50, 100, 200])
    p.add_argument("--quick", action="store_true", help="small sizes for a smoke run")
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args(argv)
    if args.quick:
        args.images, args.captions, args.dim, args.ref_captions, args.ref_images = 200, 1000, 256, 16, 8
        args.ts_images, args.ts_train_images, args.ts_steps = 600, 2000, 150
    torch.set_num_threads(args.threads)
    env = {"torch": torch.__version__, "threads": torch.get_num_threads(),
           "cpu": platform.processor() or platform.machine(),
           "cpu_capability": torch.backends.cpu.get_cpu_capability(), "compile": adapt_mod.compile_available(),
           "load_average_at_start": os.getloadavg()[0]}
    print(f"torch {env['torch']}, {env['threads']} threads, {env['cpu_capability']}, compile={env['compile']}, "
          f"load average {env['load_average_at_start']:.1f}", flush=True)
    results: dict = {"env": env, "args": vars(args)}
    if not args.skip_speed:
        results["speed"] = speed(args)
    if not args.skip_two_stage:
        results["two_stage"] = two_stage(args)
    results["env"]["load_average_at_end"] = os.getloadavg()[0]
    if args.json:
        tmp = Path(args.json).with_suffix(".tmp")
        tmp.write_text(json.dumps(results, indent=2, default=str) + "\n")
        os.replace(tmp, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
