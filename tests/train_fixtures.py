"""A small learnable precomp-format dataset and a matching config, for training tests."""
from __future__ import annotations

from pathlib import Path

import numpy as np

COLORS = ["red", "green", "blue", "yellow", "black", "white", "pink", "brown"]
SHAPES = ["circle", "square", "star", "heart", "cross", "ring", "arrow", "moon"]


def write_synthetic_precomp(folder: Path, sizes=(("train", 240), ("dev", 40), ("test", 40)),
                            dim: int = 16, seed: int = 0) -> Path:
    """Images = 3 regions (color vector, shape vector, noise); 2 captions per image, in order."""
    rng = np.random.default_rng(seed)
    color_vec = rng.standard_normal((len(COLORS), dim)).astype(np.float32)
    shape_vec = rng.standard_normal((len(SHAPES), dim)).astype(np.float32)
    folder.mkdir(parents=True, exist_ok=True)
    for split, n in sizes:
        c = rng.integers(0, len(COLORS), n)
        s = rng.integers(0, len(SHAPES), n)
        regions = np.stack([color_vec[c], shape_vec[s], rng.standard_normal((n, dim))], axis=1)
        regions += 0.3 * rng.standard_normal(regions.shape)
        np.save(folder / f"{split}_ims.npy", regions.astype(np.float32))
        caps = []
        for ci, si in zip(c, s):
            caps += [f"a {COLORS[ci]} {SHAPES[si]}", f"{SHAPES[si]} that is {COLORS[ci]}"]
        (folder / f"{split}_caps.txt").write_text("\n".join(caps) + "\n")
    return folder


def write_tiny_config(path: Path, data: Path, steps: int = 60, extra: str = "") -> Path:
    path.write_text(f"""
name: tiny
data: {{format: precomp, path: {data}, train_split: train, val_split: dev, test_split: test}}
model:
  type: dual_encoder
  embed_dim: 32
  image: {{name: features, args: {{in_dim: 16, out_dim: 32, pooling: mean}}, frozen: false}}
  text: {{name: bigru, args: {{word_dim: 16, out_dim: 32}}, frozen: false}}
  image_head: {{input: pooled, proj: linear}}
  text_head: {{input: pooled, proj: linear}}
loss: {{name: hinge, args: {{margin: 0.2, max_violation: false}}}}
optim: {{name: adam, lr: 0.005, schedule: cosine, warmup_steps: 5}}
train: {{steps: {steps}, batch_size: 16, eval_every: 20, log_every: 10, tensorboard: false}}
{extra}
""")
    return path
