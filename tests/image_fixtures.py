"""Writers for real good and bad image files, shared by test_images.py and test_extract.py; a
deterministic pixel tower for extraction tests."""
from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from xmodal.models.base import ImageTower, TowerOutput


def write_ok(path: Path, seed: int = 0, size: tuple[int, int] = (24, 20), fmt: str | None = None) -> Path:
    """A random-noise RGB image (distinct per seed)."""
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)  # (H, W, 3)
    Image.fromarray(arr).save(path, format=fmt)
    return path


def write_truncated(path: Path, fmt: str = "PNG", seed: int = 1) -> Path:
    """A valid image cut in half: the header parses, the pixel data ends early."""
    buf = io.BytesIO()
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)).save(buf, format=fmt)
    data = buf.getvalue()
    path.write_bytes(data[: len(data) // 2])
    return path


def write_corrupt_png(path: Path, seed: int = 2) -> Path:
    """A full-length PNG whose compressed pixel data has been scrambled."""
    buf = io.BytesIO()
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)).save(buf, format="PNG")
    data = bytearray(buf.getvalue())
    start = data.find(b"IDAT") + 30
    for k in range(start, start + 40):
        data[k] ^= 0xFF
    path.write_bytes(bytes(data))
    return path


def write_not_image(path: Path) -> Path:
    path.write_text("this is a caption file, not a picture\n")
    return path


def write_png_claiming(path: Path, width: int, height: int) -> Path:
    """A tiny PNG whose IHDR claims ``width x height`` (a decompression-bomb header).

    Saves a 1x1 greyscale PNG and patches the IHDR width/height, recomputing its CRC, so
    the file is ~70 bytes but a decoder trusting the header would allocate width*height bytes.
    """
    buf = io.BytesIO()
    Image.new("L", (1, 1)).save(buf, format="PNG")
    data = bytearray(buf.getvalue())
    assert data[12:16] == b"IHDR"  # 8-byte signature, then length(4) + type(4) + data(13) + crc(4)
    data[16:20] = struct.pack(">I", width)
    data[20:24] = struct.pack(">I", height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    path.write_bytes(bytes(data))
    return path


COLOURS = {"red": (220, 20, 20), "green": (20, 180, 20), "blue": (20, 20, 220), "yellow": (230, 220, 20)}


def train_pixel_run(root: Path) -> tuple[Path, Path]:
    """8 coloured PNGs under ``root/imgs`` (half in ``sub/``), a table of them, and a frozen
    EfficientNet-lite0 (64 px) + BiGRU run trained 3 steps on it. Returns (image folder, run)."""
    from xmodal.cli import main

    imgs = root / "imgs"
    (imgs / "sub").mkdir(parents=True)
    rows = ["image,caption"]
    for name, rgb in COLOURS.items():
        for j in range(2):
            p = imgs / ("sub" if j else "") / f"{name}{j}.png"
            img = Image.new("RGB", (40 + 8 * j, 48), rgb)
            img.paste((255, 255, 255) if j else (0, 0, 0), (4 + 10 * j, 4, 20 + 10 * j, 30))  # distinct pixels
            img.save(p)
            rows.append(f"{p},a {name} picture")
    (root / "data.csv").write_text("\n".join(rows) + "\n")
    cfg = root / "pix.yaml"
    cfg.write_text(f"""
name: pix
data: {{format: table, path: {root / 'data.csv'}, train_split: all, val_split: all, test_split: all}}
model:
  type: dual_encoder
  embed_dim: 16
  image: {{name: efficientnet_lite0, args: {{image_size: 64}}, frozen: true}}
  text: {{name: bigru, args: {{word_dim: 8, out_dim: 16}}, frozen: false}}
loss: {{name: infonce}}
optim: {{name: adam, lr: 0.01}}
train: {{steps: 3, batch_size: 4, eval_every: 3, log_every: 3, tensorboard: false}}
""")
    run = root / "run"
    assert main(["train", str(cfg), "--out", str(run), "--no-progress"]) == 0
    return imgs, run



class PoolPixelTower(ImageTower):
    """Deterministic pixel tower for extraction tests: 16 px, 4x4 average-pooled cells through a
    fixed linear map (``weights``: ``sin`` or ``cos`` of 0, 1, 2, ...); picklable, for decode
    workers and spawned processes."""

    input_kind = "pixels"

    def __init__(self, dim: int = 6, weights: str = "sin") -> None:
        super().__init__()
        self.image_size, self.output_dim = 16, dim
        self.proj = nn.Linear(3, dim)
        with torch.no_grad():
            fn = {"sin": torch.sin, "cos": torch.cos}[weights]
            self.proj.weight.copy_(fn(torch.arange(3 * dim, dtype=torch.float32)).reshape(dim, 3))
            self.proj.bias.zero_()

    def preprocess(self, img: Image.Image) -> torch.Tensor:
        img = img.convert("RGB").resize((16, 16), Image.BILINEAR)
        return torch.from_numpy(np.ascontiguousarray(np.asarray(img).transpose(2, 0, 1)))  # (3, 16, 16)

    def forward(self, x: torch.Tensor) -> TowerOutput:
        cells = F.avg_pool2d(x.float() / 255.0, 4)  # (B, 3, 4, 4)
        tokens = self.proj(cells.flatten(2).transpose(1, 2))  # (B, 16, dim)
        return TowerOutput(tokens=tokens, pooled=tokens.mean(1), mask=None)
