"""Write a user-style ``table`` dataset from the embedded emoji data (PNG files + ``pairs.csv``).

A stand-in for "my own table": ``--images`` pictures of the emoji train split (both styles
of a concept, as files), one row per caption with ``--captions`` captions per image: the
English label, then label + tags joined (``"cat face: cat, face, pet"``), so captions have the
word counts of a small product or photo table rather than the emoji labels' few words.

    python benchmarks/emoji_table.py --out /tmp/emoji_table --images 543
    xmodal train configs/emoji/adapt_i2t.yaml --out runs/t data.format=table \\
        data.path=/tmp/emoji_table/pairs.csv train.steps=20
    python benchmarks/adapt_train_step.py --config configs/emoji/adapt_i2t.yaml \\
        data.format=table data.path=/tmp/emoji_table/pairs.csv
"""
from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from xmodal.data.emoji import read  # noqa: E402
from xmodal.utils import atomic_write  # noqa: E402


def write_table(out: Path, images: int, captions: int = 2) -> Path:
    """Write ``out/images/*.png`` and ``out/pairs.csv``; returns the CSV's path."""
    ds = read("emoji", "train", lang="en", captions="label+tags")
    pixels = ds.meta["pixels"]
    n = min(images, ds.num_images)
    (out / "images").mkdir(parents=True, exist_ok=True)
    # the texts of each image: its concept's label and label + tags (both styles share them)
    texts_of: dict[int, list[str]] = {}
    for t, cap in enumerate(ds.captions):
        for i in ds.gt.images_of(t):
            texts_of.setdefault(int(i), []).append(cap)
    rows = []
    for i in range(n):
        name = f"images/{i:05d}.png"
        pixels[i].save(out / name)
        caps = texts_of.get(i, [])
        label = caps[0] if caps else ds.image_ids[i]
        variants = [label] + [f"{label}: {c}" for c in caps[1:]]
        rows.extend({"image": name, "caption": c} for c in variants[:captions])
    path = out / "pairs.csv"

    def write(p: Path) -> None:
        with open(p, "w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, fieldnames=["image", "caption"])
            w.writeheader()
            w.writerows(rows)

    atomic_write(path, write)
    return path


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--images", type=int, default=543)
    p.add_argument("--captions", type=int, default=2, help="captions per image (label, label + tags)")
    args = p.parse_args(argv)
    path = write_table(Path(args.out), args.images, args.captions)
    print(path)


if __name__ == "__main__":
    main()
