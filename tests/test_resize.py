"""Resize modes of the pixel towers (``crop`` / ``squash`` / ``letterbox``): exact pixels on tiny
hand-made images, ``crop`` identical to the center crop the towers used before the modes existed,
every pixel tower taking ``resize`` from its config args, and the benchmark's dry run."""
from __future__ import annotations

import hashlib
import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from xmodal.errors import ConfigError
from xmodal.models.image.resize import RESIZE_MODES, border_colour, check_resize, resize_image

RED, BLUE, GREEN, WHITE, BLACK = (255, 0, 0), (0, 0, 255), (0, 255, 0), (255, 255, 255), (0, 0, 0)
GREY = (10, 20, 30)


def image_of(rows: list[list[tuple[int, int, int]]]) -> Image.Image:
    """A PIL RGB image from rows of (r, g, b) pixels."""
    return Image.fromarray(np.array(rows, dtype=np.uint8))


def pixels(t: torch.Tensor) -> list[list[tuple[int, ...]]]:
    """(3, H, W) uint8 tensor -> rows of (r, g, b) tuples."""
    arr = t.permute(1, 2, 0).numpy()  # (H, W, 3)
    return [[tuple(int(c) for c in px) for px in row] for row in arr]


# --------------------------------------------------------------------------- golden pixels
def test_crop_keeps_the_center_exactly() -> None:
    wide = image_of([[RED, GREEN, BLUE, WHITE], [BLACK, GREY, RED, BLUE]])  # 4 x 2
    assert pixels(resize_image(wide, 2, "crop")) == [[GREEN, BLUE], [GREY, RED]]
    tall = image_of([[RED, GREEN], [BLUE, WHITE], [BLACK, GREY], [RED, RED]])  # 2 x 4
    assert pixels(resize_image(tall, 2, "crop")) == [[BLUE, WHITE], [BLACK, GREY]]


def test_squash_keeps_everything_without_aspect() -> None:
    row = image_of([[RED, BLUE]])  # 2 x 1: stretched to 2 x 2, both columns kept
    assert pixels(resize_image(row, 2, "squash")) == [[RED, BLUE], [RED, BLUE]]
    col = image_of([[RED], [BLUE]])  # 1 x 2
    assert pixels(resize_image(col, 2, "squash")) == [[RED, RED], [BLUE, BLUE]]
    assert pixels(resize_image(image_of([[GREY] * 8] * 4), (3, 5), "squash")) == [[GREY] * 5] * 3


def test_letterbox_pads_without_resampling_when_the_long_side_fits() -> None:
    wide = image_of([[RED, RED, BLUE, BLUE]] * 2)  # 4 x 2 into 4 x 4: one fill row above and below
    assert pixels(resize_image(wide, 4, "letterbox", fill="white")) == \
        [[WHITE] * 4, [RED, RED, BLUE, BLUE], [RED, RED, BLUE, BLUE], [WHITE] * 4]
    tall = image_of([[RED, BLUE]] * 4)  # 2 x 4 into 4 x 4: one fill column left and right
    assert pixels(resize_image(tall, 4, "letterbox", fill=[1, 2, 3])) == [[(1, 2, 3), RED, BLUE, (1, 2, 3)]] * 4
    odd = image_of([[GREEN] * 5] * 2)  # 5 x 2 into 5 x 5: top pad (5 - 2) // 2 = 1, bottom 2
    assert pixels(resize_image(odd, 5, "letterbox", fill="black")) == \
        [[BLACK] * 5, [GREEN] * 5, [GREEN] * 5, [BLACK] * 5, [BLACK] * 5]


def test_letterbox_resizes_the_long_side_then_pads() -> None:
    flat = image_of([[GREY] * 8] * 4)  # 8 x 4 -> 4 x 2 (a constant image stays constant), padded to 4 x 4
    assert pixels(resize_image(flat, 4, "letterbox", fill="white")) == [[WHITE] * 4, [GREY] * 4, [GREY] * 4, [WHITE] * 4]
    thin = image_of([[GREY] * 64])  # 64 x 1 -> 4 x 1 (never 0 rows), top pad (4 - 1) // 2 = 1
    out = pixels(resize_image(thin, 4, "letterbox", fill="black"))
    assert out == [[BLACK] * 4, [GREY] * 4, [BLACK] * 4, [BLACK] * 4]
    flat_hw = pixels(resize_image(flat, (2, 6), "letterbox", fill="white"))  # 8 x 4 into 6 wide x 2 high
    assert flat_hw == [[WHITE, GREY, GREY, GREY, GREY, WHITE]] * 2


def test_letterbox_edge_fill_is_the_border_median() -> None:
    rows = [[GREY] * 5 for _ in range(3)]
    rows[0][0] = RED  # one odd border pixel out of 12 does not move the median
    rows[1][2] = BLUE  # an interior pixel is not part of the border
    img = image_of(rows)  # 5 x 3
    assert border_colour(img) == GREY
    out = pixels(resize_image(img, 5, "letterbox"))  # default fill: edge
    assert out[0] == [GREY] * 5 and out[4] == [GREY] * 5
    assert out[1:4] == rows
    # lower median per channel: 2 red + 2 blue border pixels -> (0, 0, 0), a value the border has
    assert border_colour(image_of([[RED, BLUE], [BLUE, RED]])) == (0, 0, 0)


# hashes of the center crop as the towers computed it before resize modes existed
# (xmodal.models.image.efficientnet.resize_center_crop at commit 10e59aa)
CROP_BEFORE = [((37, 23), 16, None, "a3dd558dfe0074a4"), ((23, 37), 16, None, "384ec5fad68d9942"),
               ((50, 20), (12, 18), None, "f79937c3a29aafad"), ((64, 64), 160, None, "b4ed1b7d6c0f1784"),
               ((40, 30), 16, 20, "43d77de127221436"), ((9, 31), (8, 8), None, "70081f674e99e77f")]


def test_crop_is_bit_identical_to_the_previous_center_crop() -> None:
    from xmodal.models.image.efficientnet import resize_center_crop

    rng = np.random.default_rng(20)
    for (w, h), size, shorter, digest in CROP_BEFORE:
        img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        out = resize_image(img, size, "crop", resize_shorter=shorter)
        assert hashlib.sha256(out.numpy().tobytes()).hexdigest()[:16] == digest, (w, h, size)
        assert torch.equal(out, resize_center_crop(img, size, shorter))


def test_square_images_are_the_same_in_every_mode() -> None:
    rng = np.random.default_rng(1)
    img = Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8))
    outs = [resize_image(img, 16, mode) for mode in RESIZE_MODES]
    assert all(torch.equal(outs[0], o) for o in outs[1:])
    rgba = Image.fromarray(rng.integers(0, 256, (6, 10, 4), dtype=np.uint8), "RGBA")
    assert resize_image(rgba, 8, "letterbox").shape == (3, 8, 8)


@pytest.mark.parametrize("mode, fill, words", [
    ("pad", "edge", "resize must be one of crop, squash, letterbox, got 'pad'"),
    ("letterbox", "grey", "letterbox_fill must be edge, white, black or [r, g, b]"),
    ("letterbox", [0, 0, 256], "got [0, 0, 256]"),
    ("letterbox", [0, 0], "got [0, 0]"),
    ("letterbox", [True, 0, 0], "letterbox_fill"),
])
def test_bad_resize_settings_are_config_errors(mode: str, fill, words: str) -> None:
    with pytest.raises(ConfigError, match=r"^tower: ") as e:
        check_resize(mode, fill)
    assert words in str(e.value)
    with pytest.raises(ConfigError):
        resize_image(image_of([[RED]]), 2, mode, fill=fill)


# --------------------------------------------------------------------------- the towers
def test_efficientnet_takes_resize_from_its_config_args() -> None:
    """``model.image.args.resize`` reaches the tower as build_towers creates it."""
    from xmodal.config import load_config
    from xmodal.models.base import IMAGE_TOWERS
    from xmodal.models.image.efficientnet import resize_center_crop

    def tower(*overrides: str):
        cfg = load_config(None, ["model.image.name=efficientnet_lite0", "model.image.args.image_size=32", *overrides])
        return IMAGE_TOWERS.create(cfg.model.image.name, **cfg.model.image.args)

    wide = Image.fromarray(np.random.default_rng(2).integers(0, 256, (40, 100, 3), dtype=np.uint8))
    default = tower()
    assert default.resize == "crop" and torch.equal(default.preprocess(wide), resize_center_crop(wide, 32))
    squash = tower("model.image.args.resize=squash")
    assert torch.equal(squash.preprocess(wide), resize_image(wide, 32, "squash"))
    box = tower("model.image.args.resize=letterbox", "model.image.args.letterbox_fill=[0, 128, 255]")
    out = box.preprocess(wide)  # 100 x 40 -> 32 x 13, 9 fill rows above
    assert torch.equal(out, resize_image(wide, 32, "letterbox", fill=[0, 128, 255]))
    assert out[:, 0, 0].tolist() == [0, 128, 255] and box.eval()(out[None]).pooled.shape == (1, 1280)
    with pytest.raises(ConfigError, match="efficientnet_lite0: resize must be one of"):
        tower("model.image.args.resize=fit")


def test_hf_vision_resize_modes(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    from xmodal.models.base import IMAGE_TOWERS

    cfg = transformers.ViTConfig(image_size=16, patch_size=8, hidden_size=8, num_hidden_layers=1,
                                 num_attention_heads=2, intermediate_size=8)
    transformers.ViTModel(cfg).save_pretrained(tmp_path)
    # a processor that resizes the shorter side to 20, then crops 16 (as ConvNeXt / CLIP do)
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(
        {"do_center_crop": True, "crop_size": {"height": 16, "width": 16}, "size": {"shortest_edge": 20}}))
    wide = Image.fromarray(np.random.default_rng(3).integers(0, 256, (30, 50, 3), dtype=np.uint8))
    crop = IMAGE_TOWERS.create("hf_vision", name_or_path=str(tmp_path), frozen=True)
    assert crop.resize == "crop" and crop.resize_shorter == 20
    assert torch.equal(crop.preprocess(wide), resize_image(wide, 16, "crop", resize_shorter=20))
    box = IMAGE_TOWERS.create("hf_vision", name_or_path=str(tmp_path), frozen=True, resize="letterbox",
                              letterbox_fill="black")
    out = box.preprocess(wide)  # 50 x 30 -> 16 x 10 (the crop margin does not apply), 3 black rows above
    assert torch.equal(out, resize_image(wide, 16, "letterbox", fill="black"))
    assert out[:, :3].eq(0).all() and out[:, 13:].eq(0).all() and not out[:, 3:13].eq(0).all()
    assert box(out[None]).pooled.shape == (1, 8)
    with pytest.raises(ConfigError, match="hf_vision: letterbox_fill"):
        IMAGE_TOWERS.create("hf_vision", name_or_path=str(tmp_path), resize="letterbox", letterbox_fill="red")


def test_resize_mode_is_in_the_feature_cache_key() -> None:
    """The frozen-feature cache is keyed by the tower's config args, so each resize mode is its own entry."""
    from xmodal.config import TowerConfig
    from xmodal.data import emoji, load_dataset
    from xmodal.data.features import cache_key
    from xmodal.data.pipeline import _tower_spec  # noqa: PLC2701 - the spec the trainer keys its cache by

    ds = load_dataset("emoji", emoji.default_path(), "val")
    base = {"image_size": 160}
    keys = {mode: cache_key(ds, _tower_spec(TowerConfig("efficientnet_lite0", {**base, "resize": mode})))
            for mode in RESIZE_MODES}
    assert len(set(keys.values())) == 3


# --------------------------------------------------------------------------- the benchmark
def test_resize_benchmark_dry_run(tmp_path: Path, capsys: pytest.CaptureFixture,
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "resize_modes.py"
    spec = importlib.util.spec_from_file_location("resize_modes_bench", path)
    bench = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, bench)  # its dataclasses look their module up
    spec.loader.exec_module(bench)
    assert bench.join_labels(["a", "b", "c"]) == "a, b and c"
    out = tmp_path / "r.json"
    assert bench.main(["--dry-run", "--modes", "crop,squash,letterbox", "--json", str(out)]) == 0
    res = json.loads(out.read_text())["results"]
    assert set(res) == {"crop", "squash", "letterbox"}
    for mode in res:
        assert set(res[mode]) == {"single", "wide2", "tall2", "wide3", "composed", "all"}
        m = res[mode]["composed"]
        assert 0 <= m["t2i_r1"] <= m["t2i_r5"] <= m["t2i_r10"] <= 100
        assert m["rsum"] == pytest.approx(sum(m[k] for k in m if k != "rsum"))
    # square single emoji get the same pixels in every mode, hence the same metrics
    assert res["crop"]["single"] == res["squash"]["single"] == res["letterbox"]["single"]
    assert "| wide2 | 3 | 3 | letterbox |" in capsys.readouterr().out
