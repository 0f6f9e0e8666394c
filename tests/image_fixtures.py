"""Writers for real good and bad image files, shared by test_images.py and test_extract.py."""
from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image


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
