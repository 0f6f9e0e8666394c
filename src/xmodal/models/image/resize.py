"""Fitting an image of any shape into a pixel tower's input: ``crop``, ``squash`` or ``letterbox``.

Every pixel tower takes a ``resize`` argument (``model.image.args.resize`` in a config,
``--tower-arg resize=...`` for ``xmodal extract``):

* ``crop`` (the default): resize so the image covers the input (the shorter side fills it, or
  ``resize_shorter`` pixels when the model asks for a margin), then cut the center. A
  non-square image loses its edges.
* ``squash``: resize straight to the input size; nothing is lost, but the aspect ratio is not
  kept (a 2:1 image is squeezed to half its width).
* ``letterbox``: resize so the longer side fits, keeping the aspect ratio, and pad the rest
  with ``letterbox_fill``: ``edge`` (the image's own border colour: the per-channel lower
  median of its outermost ring of pixels, so a product photo on white is padded white and a
  photo gets its dominant border colour), ``white``, ``black``, or ``[r, g, b]`` (0-255).

All three use bicubic resampling (PIL) and return uint8 ``(3, H, W)`` RGB tensors; for a
square image (or one already at the input's aspect) the three modes give the same pixels.
The choice of defaults is measured in ``docs/models.md`` ("Resizing non-square images").
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch

from ...errors import ConfigError

RESIZE_MODES = ("crop", "squash", "letterbox")
FILL_NAMES = {"white": (255, 255, 255), "black": (0, 0, 0)}
DEFAULT_RESIZE = "crop"
DEFAULT_FILL = "edge"


def check_resize(mode: Any, fill: Any = DEFAULT_FILL, *, owner: str = "tower") -> tuple[str, str | tuple[int, int, int]]:
    """Validate a ``resize`` mode and ``letterbox_fill``; returns ``(mode, fill)`` with ``fill``
    ``"edge"`` or an ``(r, g, b)`` tuple. A bad value is a :class:`ConfigError` naming the field."""
    if mode not in RESIZE_MODES:
        raise ConfigError(f"{owner}: resize must be one of {', '.join(RESIZE_MODES)}, got {mode!r}")
    if fill == "edge":
        return mode, "edge"
    if isinstance(fill, str) and fill in FILL_NAMES:
        return mode, FILL_NAMES[fill]
    ok = (isinstance(fill, (list, tuple)) and len(fill) == 3
          and all(isinstance(c, int) and not isinstance(c, bool) and 0 <= c <= 255 for c in fill))
    if not ok:
        raise ConfigError(f"{owner}: letterbox_fill must be edge, white, black or [r, g, b] with integers "
                          f"0-255, got {fill!r}")
    return mode, (int(fill[0]), int(fill[1]), int(fill[2]))


def border_colour(image: Any) -> tuple[int, int, int]:
    """The per-channel lower median of the outermost ring of pixels of an RGB PIL image."""
    arr = np.asarray(image, dtype=np.uint8)  # (H, W, 3)
    ring = np.concatenate([arr[0], arr[-1], arr[1:-1, 0], arr[1:-1, -1]])  # (2W + 2(H-2), 3)
    ring = np.sort(ring, axis=0)
    mid = ring[(len(ring) - 1) // 2]  # the lower median: always a value some border pixel has
    return int(mid[0]), int(mid[1]), int(mid[2])


def _to_tensor(image: Any) -> torch.Tensor:
    arr = np.asarray(image, dtype=np.uint8)  # (H, W, 3)
    # numpy's transpose copy: torch's uint8 permute + contiguous is 10-15x slower on CPU
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))  # (3, H, W)


def _crop(image: Any, h: int, w: int, resize_shorter: int | None) -> Any:
    from PIL import Image

    iw, ih = image.size
    scale = max(h / ih, w / iw)  # shorter side (relative to the crop) fills the crop
    if resize_shorter is not None:
        scale = max(scale, resize_shorter / min(iw, ih))
    nw, nh = max(w, round(iw * scale)), max(h, round(ih * scale))
    image = image.resize((nw, nh), Image.BICUBIC)
    left, top = (nw - w) // 2, (nh - h) // 2
    return image.crop((left, top, left + w, top + h))


def _letterbox(image: Any, h: int, w: int, fill: str | Sequence[int]) -> Any:
    from PIL import Image

    iw, ih = image.size
    scale = min(h / ih, w / iw)  # longer side (relative to the input) fits
    nw, nh = min(w, max(1, round(iw * scale))), min(h, max(1, round(ih * scale)))
    colour = border_colour(image) if fill == "edge" else tuple(fill)
    if (nw, nh) != (iw, ih):
        image = image.resize((nw, nh), Image.BICUBIC)
    if (nw, nh) == (w, h):
        return image
    canvas = Image.new("RGB", (w, h), colour)
    canvas.paste(image, ((w - nw) // 2, (h - nh) // 2))
    return canvas


def resize_image(image: Any, size: int | tuple[int, int], mode: str = DEFAULT_RESIZE, *,
                 resize_shorter: int | None = None, fill: str | Sequence[int] = DEFAULT_FILL) -> torch.Tensor:
    """PIL image -> uint8 tensor ``(3, H, W)`` RGB at ``size`` (an int, or ``(height, width)``).

    ``mode`` is ``crop``, ``squash`` or ``letterbox`` (see the module docstring);
    ``resize_shorter`` only applies to ``crop``, ``fill`` only to ``letterbox``.
    """
    from PIL import Image

    h, w = (size, size) if isinstance(size, int) else size
    image = image.convert("RGB")
    if mode == "crop":
        image = _crop(image, h, w, resize_shorter)
    elif mode == "squash":
        image = image.resize((w, h), Image.BICUBIC)
    elif mode == "letterbox":
        image = _letterbox(image, h, w, check_resize(mode, fill, owner="resize_image")[1])
    else:
        check_resize(mode, owner="resize_image")
    return _to_tensor(image)  # (3, H, W)
