"""Bad images reach training as reported skips (or a clear error with on_error=fail), never a traceback."""
from __future__ import annotations

import csv
import subprocess
import sys

from image_fixtures import write_ok, write_png_claiming, write_truncated


def _table(tmp_path):
    img = tmp_path / "img"
    img.mkdir()
    rows = []
    words = ["red", "blue", "green", "black", "white", "pink", "gray", "gold"]
    for k, w in enumerate(words):
        write_ok(img / f"{k}.png", seed=k, size=(40, 40))
        rows.append({"image": f"img/{k}.png", "caption": f"a {w} picture", "split": "train" if k < 6 else "val"})
    write_truncated(img / "trunc.png")
    write_png_claiming(img / "huge.png", 20000, 20000)
    rows += [{"image": "img/trunc.png", "caption": "a truncated picture", "split": "train"},
             {"image": "img/missing.png", "caption": "a missing picture", "split": "train"},
             {"image": "img/huge.png", "caption": "a huge picture", "split": "train"}]
    with open(tmp_path / "data.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["image", "caption", "split"])
        w.writeheader()
        w.writerows(rows)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"""
data: {{format: table, path: {tmp_path / 'data.csv'}, train_split: train, val_split: val, test_split: val}}
model:
  embed_dim: 16
  image: {{name: efficientnet_lite0, args: {{image_size: 64}}, frozen: true}}
  text: {{name: hf, args: {{pooling: mean, max_length: 16}}, frozen: true}}
train: {{steps: 3, batch_size: 4, eval_every: 3, tensorboard: false}}
""")
    return cfg


def test_bad_images_are_reported_skips(tmp_path):
    cfg = _table(tmp_path)
    proc = subprocess.run([sys.executable, "-m", "xmodal", "train", str(cfg), "--out", str(tmp_path / "run"),
                           "--no-progress"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    for name in ("trunc.png", "missing.png", "huge.png"):
        assert name in proc.stderr  # each skip is reported with its path
    assert "6 images" not in proc.stderr or "skipp" in proc.stderr.lower()


def test_bad_images_fail_when_asked(tmp_path):
    cfg = _table(tmp_path)
    proc = subprocess.run([sys.executable, "-m", "xmodal", "extract", "--format", "table", "--path",
                           str(tmp_path / "data.csv"), "--split", "train", "--out", str(tmp_path / "f"),
                           "--image-size", "64", "--on-error", "fail", "--no-progress"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and ".png" in proc.stderr


def test_train_fails_on_bad_image_when_configured(tmp_path):
    cfg = _table(tmp_path)
    proc = subprocess.run([sys.executable, "-m", "xmodal", "train", str(cfg), "--out", str(tmp_path / "run"),
                           "--no-progress", "data.on_bad_image=fail"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and "trunc.png" in proc.stderr
