"""Safe image loading: every bad file gives one clear ImageLoadError naming it."""
from __future__ import annotations

import threading
import time
import warnings

import numpy as np
import pytest
from PIL import Image

from image_fixtures import (write_corrupt_png, write_not_image, write_ok, write_png_claiming,
                            write_truncated)
from xmodal.data.images import DEFAULT_MAX_PIXELS, ImageLoadError, open_image, read_image_size
from xmodal.errors import DataError


def _error(path, **kw) -> ImageLoadError:
    with pytest.raises(ImageLoadError) as info:
        open_image(path, **kw)
    err = info.value
    assert isinstance(err, DataError)
    assert err.path == str(path)
    assert str(path) in str(err) and err.reason in str(err)
    return err


@pytest.mark.parametrize("fmt,suffix", [("PNG", "png"), ("JPEG", "jpg"), ("WEBP", "webp"), ("BMP", "bmp")])
def test_good_images_decode_to_rgb(tmp_path, fmt, suffix):
    path = write_ok(tmp_path / f"ok.{suffix}", seed=3, size=(24, 20), fmt=fmt)
    img = open_image(path)
    assert img.mode == "RGB" and img.size == (24, 20)
    if fmt in ("PNG", "BMP"):  # lossless: pixels round-trip exactly
        assert np.array_equal(np.asarray(img), np.asarray(Image.open(path).convert("RGB")))
    assert open_image(path, mode="L").mode == "L"


def test_missing_file(tmp_path):
    assert _error(tmp_path / "nope.jpg").reason == "no such file"


def test_folder_is_not_an_image(tmp_path):
    assert "folder" in _error(tmp_path).reason


def test_not_an_image(tmp_path):
    err = _error(write_not_image(tmp_path / "caption.png"))
    assert "not a recognised image" in err.reason and "PNG" in err.reason


def test_formats_that_run_external_programs_are_refused(tmp_path):
    # Pillow identifies this as EPS, whose decoder runs Ghostscript: not in the allowed list
    path = tmp_path / "page.eps"
    path.write_text("%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n")
    assert Image.open(path).format == "EPS"
    assert "not a recognised image" in _error(path).reason


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated_image(tmp_path, fmt):
    path = write_truncated(tmp_path / f"cut.{fmt.lower()}", fmt=fmt)
    Image.open(path)  # the header alone is fine: only a full decode finds the damage
    assert "truncated" in _error(path).reason


def test_corrupt_image_data(tmp_path):
    assert "corrupt" in _error(write_corrupt_png(tmp_path / "bad.png")).reason


def test_decompression_bomb_refused_from_header(tmp_path):
    path = write_png_claiming(tmp_path / "bomb.png", 20_000, 20_000)
    assert path.stat().st_size < 200
    t = time.perf_counter()
    err = _error(path)
    assert time.perf_counter() - t < 1.0  # refused without allocating 400 MB
    assert "oversized" in err.reason and "400000000" in err.reason
    # our own limit off: Pillow's guard (2 x MAX_IMAGE_PIXELS) still refuses
    assert "oversized" in _error(path, max_pixels=None).reason


def test_max_pixels_is_checked_before_decoding(tmp_path):
    # 10,000 x 10,000 is above our default budget but below Pillow's hard limit, and it has
    # no pixel data: only a check made before decoding gives the "oversized" reason.
    path = write_png_claiming(tmp_path / "big.png", 10_000, 10_000)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # Pillow's DecompressionBombWarning must not escape
        err = _error(path)
    assert "10000x10000" in err.reason and f"{DEFAULT_MAX_PIXELS:,}" in err.reason
    ok = write_ok(tmp_path / "small.png", size=(40, 30))
    assert "40x30" in _error(ok, max_pixels=1000).reason
    assert open_image(ok, max_pixels=1200).size == (40, 30)
    assert read_image_size(path) == (10_000, 10_000)


def test_transparency_is_composited_on_white(tmp_path):
    rgba = np.zeros((4, 4, 4), dtype=np.uint8)  # (H, W, RGBA)
    rgba[..., 0] = 255  # red, fully transparent ...
    rgba[0, 0, 3] = 255  # ... except one opaque pixel
    rgba[0, 1, 3] = 128  # and one half-transparent
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    out = np.asarray(open_image(tmp_path / "a.png"))
    assert tuple(out[0, 0]) == (255, 0, 0)
    assert tuple(out[1, 1]) == (255, 255, 255)
    assert out[0, 1, 0] == 255 and 120 < out[0, 1, 1] < 135  # half red over white

    la = Image.fromarray(np.stack([np.zeros((4, 4), np.uint8), np.zeros((4, 4), np.uint8)], -1), "LA")
    la.save(tmp_path / "la.png")
    assert np.all(np.asarray(open_image(tmp_path / "la.png")) == 255)

    pal = Image.new("P", (4, 4), 0)
    pal.putpalette([0, 0, 0] * 256)
    pal.save(tmp_path / "p.gif", transparency=0)
    assert np.all(np.asarray(open_image(tmp_path / "p.gif")) == 255)
    assert open_image(tmp_path / "a.png", mode="RGBA").getpixel((1, 1))[3] == 0  # alpha kept on request


def test_sixteen_bit_grey_is_scaled_not_clipped(tmp_path):
    arr = (np.arange(16, dtype=np.uint16).reshape(4, 4) * 4369)  # 0 .. 65535
    Image.fromarray(arr).save(tmp_path / "g16.png")
    out = np.asarray(open_image(tmp_path / "g16.png"))[..., 0].ravel()
    assert out[0] == 0 and out[-1] == 255
    assert np.all(np.diff(out.astype(int)) > 0)  # still increasing: nothing clipped to 255


def test_error_pickles_with_path_and_reason(tmp_path):
    import pickle

    err = ImageLoadError(tmp_path / "x.png", "no such file")
    back = pickle.loads(pickle.dumps(err))
    assert (back.path, back.reason, str(back)) == (err.path, err.reason, str(err))


def test_threads_share_the_loader(tmp_path):
    paths = [write_ok(tmp_path / f"{k}.png", seed=k) for k in range(8)]
    paths.append(write_png_claiming(tmp_path / "big.png", 10_000, 10_000))
    results: list = []

    def work():
        for p in paths:
            try:
                results.append(open_image(p).size)
            except ImageLoadError as exc:
                results.append(exc.reason[:9])

    threads = [threading.Thread(target=work) for _ in range(4)]
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert results.count("oversized") == 4 and results.count((24, 20)) == 32
