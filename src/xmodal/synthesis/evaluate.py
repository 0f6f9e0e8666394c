"""The X-MRS check of synthesis: synthesized images as retrieval queries, and a grid.

For every caption of a split, an image is synthesized from the caption's embedding; the
retrieval model embeds that image (through its image tower, from pixels) and ranks all the
split's captions: R@K is the share of synthesized images whose source caption is in the
top K. The same is reported for the real images as queries (their positives are their
captions), both encoded from the same 64x64 pixels.

A generator trained with the retrieval-consistency term optimises the very image tower
that this check uses, and could pass it with patterns that mean nothing to any other model
(adversarial examples). ``judge=RUN`` repeats the check with an independently trained run's
towers embedding both the synthesized images and the captions: a gain that holds there is
in the images, one that vanishes is in the tower.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..data.base import GroundTruth
from .train import load_synthesizer, prepare_conditions, synthesize

log = logging.getLogger(__name__)


@torch.inference_mode()
def embed_pixels(model, pixels: np.ndarray, batch_size: int = 64, progress: bool = False) -> torch.Tensor:
    """Image embeddings ``(N, D)`` of uint8 pixels ``(N, H, W, 3)`` through the model's image tower."""
    from ..progress import track

    out = []
    for s in track(range(0, len(pixels), batch_size), description="embedding images", enabled=progress):
        x = torch.from_numpy(np.ascontiguousarray(pixels[s:s + batch_size])).permute(0, 3, 1, 2)  # (B, 3, H, W)
        out.append(model.encode_image(x).float())
    return torch.cat(out)


def _recalls(img: torch.Tensor, txt: torch.Tensor, gt: GroundTruth) -> dict[str, float]:
    from ..eval.metrics import ranks_from_embeddings, recall_stats

    i2t, _ = ranks_from_embeddings(img, txt, gt)
    stats = recall_stats(i2t)
    return {k: float(v) for k, v in stats.items()}


def evaluate_synthesis(syn_dir: str | Path, *, split: str | None = None, lang: str | None = None, seed: int = 0,
                       grid: str | Path | None = None, grid_items: int = 12, judge: str | Path | None = None,
                       progress: bool = False) -> dict[str, Any]:
    """Image -> caption recalls of synthesized vs real images on ``split`` (default: the test split).

    With ``judge`` (another trained run over the same data), ``result["judge"]`` holds the same
    two rows with that run's towers embedding the images and the captions.
    """
    from ..models import load

    G, info = load_synthesizer(syn_dir)
    run_ = load(info["run"])
    model, cfg = run_.model, run_.config
    split = split or cfg.data.test_split
    lang = lang or cfg.data.eval_lang
    cond = prepare_conditions(run_, split, lang, progress=progress)
    ds = cond.dataset
    fake = synthesize(G, cond.text_emb, seed=seed)  # (M, 64, 64, 3): one per caption
    fake_emb = embed_pixels(model, fake, progress=progress)
    real_emb = embed_pixels(model, cond.pixels, progress=progress)
    own = GroundTruth.from_map(np.arange(ds.num_texts), ds.num_texts)  # caption t <-> its synthesized image t
    result = {
        "split": split, "lang": lang, "captions": ds.num_texts, "images": ds.num_images,
        "synthesized": _recalls(fake_emb, cond.text_emb, own),
        "real": _recalls(real_emb, cond.text_emb, ds.gt),
    }
    if judge is not None:
        result["judge"] = judge_synthesis(judge, fake, cond, split, lang, progress=progress)
    if grid is not None:
        result["grid"] = str(write_grid(grid, ds, fake, cond.pixels, grid_items))
    return result


def judge_synthesis(judge: str | Path, fake: np.ndarray, cond, split: str, lang: str | None,
                    progress: bool = False) -> dict[str, Any]:
    """The check scored by run ``judge``: its towers embed ``fake`` (one per caption of ``cond``),
    the real images and the captions of the same split."""
    from ..errors import XmodalError
    from ..models import load

    judge_run = load(judge)
    model = judge_run.model
    if model.tower("image") is None or model.tower("image").input_kind != "pixels":
        raise XmodalError(f"judge {judge}: its image tower ({type(model.image_tower).__name__}) does not read "
                          "pixels, so it cannot embed synthesized images")
    jc = prepare_conditions(judge_run, split, lang, progress=progress)
    ds, jds = cond.dataset, jc.dataset
    if list(jds.text_ids) != list(ds.text_ids) or list(jds.image_ids) != list(ds.image_ids):
        raise XmodalError(f"judge {judge}: its {split} split ({jds.num_texts} captions, {jds.num_images} images) "
                          f"is not the synthesis run's ({ds.num_texts}, {ds.num_images}); judge with a run "
                          "trained on the same data")
    own = GroundTruth.from_map(np.arange(ds.num_texts), ds.num_texts)
    return {
        "run": str(judge),
        "synthesized": _recalls(embed_pixels(model, fake, progress=progress), jc.text_emb, own),
        "real": _recalls(embed_pixels(model, jc.pixels, progress=progress), jc.text_emb, jds.gt),
    }


def pick_items(num_texts: int, k: int) -> np.ndarray:
    """``k`` caption indices spread evenly over the split (deterministic)."""
    return np.unique(np.linspace(0, num_texts - 1, num=min(k, num_texts)).round().astype(np.int64))


def write_grid(path: str | Path, ds, fake: np.ndarray, real: np.ndarray, k: int = 12, cols: int = 4,
               scale: int = 2) -> Path:
    """PNG grid: for ``k`` captions, the synthesized image next to a real image, caption below."""
    from PIL import Image, ImageDraw

    from ..utils import atomic_write

    items = pick_items(ds.num_texts, k)
    cell = 64 * scale
    pad, text_h = 8, 30
    rows = (len(items) + cols - 1) // cols
    width = cols * (2 * cell + 3 * pad)
    height = rows * (cell + text_h + 2 * pad) + 24
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    draw.text((pad, 6), "each pair: synthesized from the caption (left) | real image (right)", fill="black")
    first = ds.gt.first_image()
    for n, t in enumerate(items):
        r, c = divmod(n, cols)
        x0, y0 = c * (2 * cell + 3 * pad) + pad, 24 + r * (cell + text_h + 2 * pad) + pad
        canvas.paste(Image.fromarray(fake[t]).resize((cell, cell), Image.NEAREST), (x0, y0))
        canvas.paste(Image.fromarray(real[first[t]]).resize((cell, cell), Image.NEAREST), (x0 + cell + pad, y0))
        caption = ds.captions[t]
        caption = caption if len(caption) <= 40 else caption[:37] + "..."
        draw.text((x0, y0 + cell + 4), caption.encode("ascii", "replace").decode(), fill="black")
    path = Path(path)
    atomic_write(path, lambda p: canvas.save(p, format="PNG", optimize=True))
    return path
