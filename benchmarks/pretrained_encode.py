"""A pretrained dual encoder through xmodal against ``transformers`` itself, in one process.

    python benchmarks/pretrained_encode.py              # random CLIP, 224 px ViT (patch 32), hidden 256
    python benchmarks/pretrained_encode.py --dry-run    # the tests' tiny model, a few items

A random ``CLIPModel`` of the given size is saved with ``save_pretrained`` (with MiniLM's
tokenizer and a ``CLIPImageProcessorPil``: shortest edge 224, crop 224), converted with
``xmodal pretrained`` and loaded with :func:`xmodal.load`. Then, on the same images (random
sizes around 320 x 240) and captions, each measured ``--repeats`` times, the two sides
interleaved (the best of each kept):

- images: ``transformers`` (its PIL image processor on the batch + ``get_image_features``)
  against xmodal (``tower.preprocess`` per image + ``encode_image``);
- texts: ``transformers`` (tokenizer + ``get_text_features``) against xmodal ``encode_text``;
- loading: ``AutoModel.from_pretrained`` + processor + tokenizer against ``xmodal.load(RUN)``
  (each tower reads the checkpoint: about two loads).

It prints each time and the ratio xmodal / transformers (1.0 = as fast; lower is faster), and
the lowest cosine between the two sides' embeddings (must be >= 0.9999).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch


def _best(fn: Callable[[], Any], repeats: int) -> tuple[float, Any]:
    best, out = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def build_source(folder: Path, hidden: int, layers: int, image: int, patch: int) -> Path:
    """A random CLIPModel folder (weights, MiniLM tokenizer, PIL image processor)."""
    from transformers import AutoTokenizer, CLIPConfig, CLIPModel
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    from xmodal.models.text.hf import default_text_model_path

    tok = AutoTokenizer.from_pretrained(default_text_model_path(), local_files_only=True)
    text = dict(vocab_size=tok.vocab_size, hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
                num_attention_heads=max(hidden // 64, 2), max_position_embeddings=77, pad_token_id=tok.pad_token_id,
                eos_token_id=tok.sep_token_id, bos_token_id=tok.cls_token_id)
    vision = dict(hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
                  num_attention_heads=max(hidden // 64, 2), image_size=image, patch_size=patch)
    torch.manual_seed(0)
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=hidden)).eval()
    model.save_pretrained(str(folder))
    tok.save_pretrained(str(folder))
    CLIPImageProcessorPil(size={"shortest_edge": image}, crop_size={"height": image, "width": image}).save_pretrained(
        str(folder))
    return folder


def measure(args: argparse.Namespace, root: Path) -> dict:
    from PIL import Image
    from transformers import AutoImageProcessor, AutoModel, AutoTokenizer

    import xmodal
    from xmodal.cli import main as xmodal_main

    src = build_source(root / "source", args.hidden, args.layers, args.image, args.patch)
    if xmodal_main(["pretrained", f"hf:{src}", "--out", str(root / "run"), "--json"]) != 0:
        raise SystemExit("xmodal pretrained failed")
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (int(rng.integers(200, 280)), int(rng.integers(280, 360)), 3),
                                           dtype=np.uint8)) for _ in range(args.n)]
    words = "a dog cat red blue runs on the grass near two small houses under sky".split()
    texts = [" ".join(rng.choice(words, size=int(rng.integers(3, 14)))) for _ in range(args.n)]

    t_hf_load, (model, proc, tok) = _best(lambda: (AutoModel.from_pretrained(str(src)).eval(),
                                                   AutoImageProcessor.from_pretrained(str(src), backend="pil"),
                                                   AutoTokenizer.from_pretrained(str(src))), args.repeats)
    t_xm_load, run = _best(lambda: xmodal.load(root / "run"), args.repeats)
    tower = run.model.tower("image")

    @torch.inference_mode()
    def hf_images() -> torch.Tensor:
        return model.get_image_features(**proc(images=images, return_tensors="pt")).pooler_output

    @torch.inference_mode()
    def xm_images() -> torch.Tensor:
        return run.model.encode_image(torch.stack([tower.preprocess(im) for im in images]))

    @torch.inference_mode()
    def hf_texts() -> torch.Tensor:
        enc = tok(texts, padding=True, truncation=True, max_length=77, return_tensors="pt")
        return model.get_text_features(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).pooler_output

    @torch.inference_mode()
    def xm_texts() -> torch.Tensor:
        return run.model.encode_text(texts)

    rows = {}
    for name, hf_fn, xm_fn in (("images", hf_images, xm_images), ("texts", hf_texts, xm_texts)):
        t_hf = t_xm = float("inf")
        for _ in range(args.repeats):  # interleaved, so that a load change on the machine hits both
            dt, ref = _best(hf_fn, 1)
            t_hf = min(t_hf, dt)
            dt, out = _best(xm_fn, 1)
            t_xm = min(t_xm, dt)
        cos = float(torch.nn.functional.cosine_similarity(out, ref).min())
        rows[name] = {"transformers_s": t_hf, "xmodal_s": t_xm, "ratio": t_xm / t_hf, "min_cosine": cos}
    rows["load"] = {"transformers_s": t_hf_load, "xmodal_s": t_xm_load, "ratio": t_xm_load / t_hf_load}
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--image", type=int, default=224)
    p.add_argument("--patch", type=int, default=32)
    p.add_argument("--n", type=int, default=64, help="images and captions encoded (one batch each)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--dry-run", action="store_true", help="tiny model, 4 items, one repeat (for the tests)")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = p.parse_args(argv)
    if args.dry_run:
        args.hidden, args.layers, args.image, args.patch, args.n, args.repeats = 32, 2, 32, 8, 4, 1
    torch.set_num_threads(max(torch.get_num_threads(), 1))
    with tempfile.TemporaryDirectory() as tmp:
        rows = measure(args, Path(tmp))
    print(f"random CLIP: hidden {args.hidden}, {args.layers} layers, {args.image} px / patch {args.patch}, "
          f"{args.n} items, best of {args.repeats}, {torch.get_num_threads()} threads")
    print(f"{'':8} {'transformers':>13} {'xmodal':>9} {'ratio':>7} {'min cos':>9}")
    for name, r in rows.items():
        cos = f"{r['min_cosine']:.6f}" if "min_cosine" in r else ""
        print(f"{name:8} {r['transformers_s']:12.3f}s {r['xmodal_s']:8.3f}s {r['ratio']:7.2f} {cos:>9}")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "results": rows}, indent=2))
    bad = [n for n, r in rows.items() if r.get("min_cosine", 1.0) < 0.9999]
    if bad:
        print(f"embeddings differ from transformers' on: {', '.join(bad)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
