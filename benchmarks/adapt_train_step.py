"""Benchmark: one ADAPT-I2T training step (scores of a batch x batch, hinge loss, backward).

ADAPT-I2T trains through ``_FoveaMaxI2T``, the analytic gradient of the Fovea max over
words. The reference, timed in the same run on the same inputs, is the autograd path the
model takes with a learnt smoothing (``train_smooth: true``: autograd over chunks of
captions, recomputed in backward, i.e. differentiating the original computation). Both
give the same gradients (tests/test_adapt.py). (ADAPT-T2I's Fovea mean has had an analytic
gradient from the start.)

    python benchmarks/adapt_train_step.py                      # batch 128, 25 regions, 12 words, 1,024-d
    python benchmarks/adapt_train_step.py --batch 64 --repeat 2 --json out.json
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from xmodal.losses import create_loss  # noqa: E402
from xmodal.models.adapt import Adapt  # noqa: E402
from xmodal.models.base import TowerOutput  # noqa: E402


def inputs(batch: int, regions: int, words: int, dim: int, seed: int = 0) -> tuple[TowerOutput, TowerOutput]:
    g = torch.Generator().manual_seed(seed)
    img = torch.randn(batch, regions, dim, generator=g)
    txt = torch.randn(batch, words, dim, generator=g)
    mask = torch.ones(batch, words, dtype=torch.bool)
    lengths = torch.randint(words // 2, words + 1, (batch,), generator=g)
    mask &= torch.arange(words)[None] < lengths[:, None]  # captions of different lengths
    return TowerOutput(img, img.mean(1), None), TowerOutput(txt, txt.mean(1), mask)


def step_seconds(direction: str, learnt_smooth: bool, data, repeat: int) -> float:
    torch.manual_seed(0)
    model = Adapt(None, None, data[0].tokens.shape[-1], direction=direction, train_smooth=learnt_smooth).train()
    loss = create_loss("adapt_hinge")
    times = []
    for i in range(repeat + 1):  # the first step warms up (and compiles, for T2I)
        img = TowerOutput(data[0].tokens.clone().requires_grad_(True), None, data[0].mask)
        txt = TowerOutput(data[1].tokens.clone().requires_grad_(True), None, data[1].mask)
        t0 = time.perf_counter()
        scores = model.score(model.encode_image_reps(img), model.encode_text_reps(txt))
        total = sum(v for k, v in loss.from_scores(scores, step=i).items() if k.endswith("_loss"))
        total.backward()
        times.append(time.perf_counter() - t0)
    return min(times[1:])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--regions", type=int, default=25)
    p.add_argument("--words", type=int, default=12)
    p.add_argument("--dim", type=int, default=1024)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    data = inputs(args.batch, args.regions, args.words, args.dim)
    rows = []
    print(f"batch {args.batch}, {args.regions} regions, <= {args.words} words, {args.dim}-d, "
          f"{torch.get_num_threads()} threads, load {os.getloadavg()[0]:.1f}")
    print(f"{'variant':<10} {'autograd (s)':>13} {'analytic (s)':>13} {'speed-up':>9}")
    for direction in ("i2t",):
        ref = step_seconds(direction, True, data, args.repeat)
        ours = step_seconds(direction, False, data, args.repeat)
        rows.append({"variant": direction, "autograd_s": ref, "analytic_s": ours, "speedup": ref / ours})
        print(f"{direction:<10} {ref:>13.2f} {ours:>13.2f} {ref / ours:>8.1f}x")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "rows": rows,
                                               "load_end": os.getloadavg()[0]}, indent=1))


if __name__ == "__main__":
    main()
