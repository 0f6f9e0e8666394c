"""Feature extraction: bad images reported, resumable writes, manifest integrity, cache, CLI."""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from image_fixtures import (write_corrupt_png, write_not_image, write_ok, write_png_claiming,
                            write_truncated)
from xmodal.data.base import DATASETS, CrossModalDataset, GroundTruth
from xmodal.data.images import ImageLoadError
from xmodal.errors import ConfigError, DataError, XmodalError
from xmodal.data.features import (FeatureSet, apply_valid, cache_key, cached_features, default_cache_root, extract_features)
from xmodal.models.base import IMAGE_TOWERS, ImageTower, TowerOutput

TESTS = Path(__file__).parent


class Interrupt(Exception):
    """Injected failure standing in for a crash or Ctrl-C mid-run."""


class FakePixelTower(ImageTower):
    """Tiny deterministic pixel tower: 4x4 average-pooled cells through a fixed linear map."""

    input_kind = "pixels"

    def __init__(self, image_size: int = 16, dim: int = 6, fail_after: int | None = None, scale: float = 1.0):
        super().__init__()
        self.image_size, self.output_dim = image_size, dim
        self.proj = nn.Linear(3, dim)
        with torch.no_grad():
            w = torch.arange(3 * dim, dtype=torch.float32).reshape(dim, 3)
            self.proj.weight.copy_(torch.sin(w))
            self.proj.bias.copy_(torch.cos(torch.arange(dim, dtype=torch.float32)))
        self.fail_after, self.scale, self.calls = fail_after, scale, 0

    def preprocess(self, img: Image.Image) -> torch.Tensor:
        img = img.convert("RGB").resize((self.image_size, self.image_size), Image.BILINEAR)
        return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).contiguous()  # (3, S, S) uint8

    def forward(self, x: torch.Tensor) -> TowerOutput:
        self.calls += 1
        if self.fail_after is not None and self.calls > self.fail_after:
            raise Interrupt(f"injected failure in batch {self.calls}")
        x = x.float() / 255.0  # (B, 3, S, S)
        cells = F.avg_pool2d(x, 4)  # (B, 3, S/4, S/4)
        tokens = self.proj(cells.flatten(2).transpose(1, 2)) * self.scale  # (B, T, D)
        return TowerOutput(tokens=tokens, pooled=tokens.mean(1), mask=None)


SPEC = {"name": "fake", "image_size": 16}


def make_dataset(root: Path, files: list[str], name: str = "toy", split: str = "test") -> CrossModalDataset:
    n = len(files)
    return CrossModalDataset(
        name=name, split=split, image_ids=[f"img{k}" for k in range(n)],
        text_ids=[f"t{k}" for k in range(n)], captions=[f"caption {k}" for k in range(n)],
        gt=GroundTruth.from_map(np.arange(n), n), image_paths=files, root=root,
    )


def good_dataset(tmp_path: Path, n: int = 10) -> CrossModalDataset:
    img = tmp_path / "imgs"
    img.mkdir(exist_ok=True)
    files = [write_ok(img / f"{k}.png", seed=k, size=(20 + k, 16)).name for k in range(n)]
    return make_dataset(img, files)


BAD = ["cut.png", "missing.jpg", "notes.png", "bomb.png", "scrambled.png"]


def mixed_dataset(tmp_path: Path) -> CrossModalDataset:
    """Good images with one of each kind of bad file between them."""
    img = tmp_path / "imgs"
    img.mkdir(exist_ok=True)
    write_truncated(img / "cut.png")
    write_not_image(img / "notes.png")
    write_png_claiming(img / "bomb.png", 20_000, 20_000)
    write_corrupt_png(img / "scrambled.png")
    files = []
    for k in range(6):
        files.append(write_ok(img / f"{k}.png", seed=k).name)
        if k < len(BAD):
            files.append(BAD[k])
    return make_dataset(img, files)


def reference(tower: FakePixelTower, ds: CrossModalDataset, dtype=np.float16):
    """Per-image tower outputs computed directly, for comparison."""
    tower.eval()
    with torch.no_grad():
        out = tower(torch.stack([tower.preprocess(Image.open(ds.image_path(k))) for k in range(ds.num_images)]))
    return out.pooled.numpy().astype(dtype), out.tokens.numpy().astype(dtype)


# ----------------------------------------------------------------------------- basics
def test_extract_writes_aligned_memmaps_and_manifest(tmp_path):
    ds = good_dataset(tmp_path, n=10)
    tower = FakePixelTower()
    fs = extract_features(ds, tower, tmp_path / "feat", tower_spec=SPEC, batch_size=4, progress=False)
    pooled, tokens = reference(FakePixelTower(), ds)
    assert fs.pooled.shape == (10, 6) and fs.grid.shape == (10, 16, 6) and fs.pooled.dtype == np.float16
    assert isinstance(fs.pooled, np.memmap) and not fs.pooled.flags.writeable
    np.testing.assert_allclose(fs.pooled.astype(np.float32), pooled.astype(np.float32), atol=2e-3)
    np.testing.assert_allclose(fs.grid.astype(np.float32), tokens.astype(np.float32), atol=2e-3)
    assert fs.valid.all() and fs.ids == ds.image_ids and fs.skipped == []
    assert tower.calls == 3 and tower.training  # 10 images in batches of 4; mode restored

    m = fs.manifest
    assert m["tower"] == SPEC and m["dataset"] == {"name": "toy", "split": "test"}
    assert m["num_images"] == 10 and m["dtype"] == "float16" and m["shapes"]["grid"] == [10, 16, 6]
    assert set(m["files"]) == {"pooled.npy", "grid.npy", "valid.npy", "ids.json"}
    assert all(len(f["sha256"]) == 64 for f in m["files"].values())
    assert m["xmodal_version"] and m["created"] and len(m["image_ids_sha256"]) == 64
    assert sorted(os.listdir(tmp_path / "feat")) == ["grid.npy", "ids.json", "manifest.json", "pooled.npy",
                                                      "valid.npy"]  # .partial is gone
    FeatureSet.open(tmp_path / "feat", verify=True)


def test_float32_and_no_grid(tmp_path):
    ds = good_dataset(tmp_path, n=5)
    fs = extract_features(ds, FakePixelTower(), tmp_path / "f", tower_spec=SPEC, grid=False,
                          dtype="float32", progress=False)
    pooled, _ = reference(FakePixelTower(), ds, np.float32)
    assert fs.grid is None and fs.pooled.dtype == np.float32 and "grid.npy" not in fs.manifest["files"]
    np.testing.assert_allclose(fs.pooled, pooled, rtol=1e-5, atol=1e-6)
    with pytest.raises(DataError, match="without grid"):
        apply_valid(ds, fs, use="grid")


def test_thread_pool_gives_identical_bytes(tmp_path):
    ds = good_dataset(tmp_path, n=11)
    a = extract_features(ds, FakePixelTower(), tmp_path / "a", tower_spec=SPEC, batch_size=3, progress=False)
    b = extract_features(ds, FakePixelTower(), tmp_path / "b", tower_spec=SPEC, batch_size=3,
                         num_workers=2, progress=False)
    for name in ("pooled.npy", "grid.npy", "valid.npy", "ids.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert a.manifest["files"] == b.manifest["files"]


# ----------------------------------------------------------------------------- bad images
def test_bad_images_are_skipped_and_reported(tmp_path, caplog):
    ds = mixed_dataset(tmp_path)
    with caplog.at_level(logging.WARNING, logger="xmodal.data.features"):
        fs = extract_features(ds, FakePixelTower(), tmp_path / "feat", tower_spec=SPEC, batch_size=4,
                              num_workers=1, progress=False)
    bad_idx = [k for k, p in enumerate(ds.image_paths) if p in BAD]
    assert list(np.flatnonzero(~fs.valid)) == bad_idx
    assert not fs.pooled[bad_idx].any() and not fs.grid[bad_idx].any()  # zero rows
    assert fs.pooled[fs.valid].any(axis=1).all()
    reasons = {Path(s["path"]).name: s["reason"] for s in fs.skipped}
    assert set(reasons) == set(BAD)
    assert "truncated" in reasons["cut.png"] and reasons["missing.jpg"] == "no such file"
    assert "not a recognised image" in reasons["notes.png"] and "oversized" in reasons["bomb.png"]
    assert "corrupt" in reasons["scrambled.png"]
    assert all(s["path"] == str(ds.image_path(s["index"])) and s["id"] == ds.image_ids[s["index"]]
               for s in fs.skipped)
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert all(name in logged for name in BAD)

    kept = apply_valid(ds, fs)
    assert kept.num_images == 6 and kept.num_texts == 6  # texts of skipped images dropped too
    assert kept.image_ids == [i for k, i in enumerate(ds.image_ids) if k not in bad_idx]
    np.testing.assert_array_equal(kept.image_features, fs.pooled[fs.valid])


def test_on_error_fail_names_the_path(tmp_path):
    ds = mixed_dataset(tmp_path)
    with pytest.raises(ImageLoadError) as info:
        extract_features(ds, FakePixelTower(), tmp_path / "feat", tower_spec=SPEC, on_error="fail",
                         batch_size=4, progress=False)
    assert info.value.path == str(ds.image_path(1)) and "truncated" in str(info.value)
    with pytest.raises(DataError, match="incomplete"):
        FeatureSet.open(tmp_path / "feat")


def test_all_images_bad_is_an_error(tmp_path):
    ds = make_dataset(tmp_path, ["a.png", "b.png"])
    with pytest.raises(DataError, match="none of the 2 images could be read"):
        extract_features(ds, FakePixelTower(), tmp_path / "feat", tower_spec=SPEC, progress=False)


def test_input_checks(tmp_path):
    ds = good_dataset(tmp_path, n=2)
    features_tower = FakePixelTower()
    features_tower.input_kind = "features"
    with pytest.raises(ConfigError, match="does not take pixels"):
        extract_features(ds, features_tower, tmp_path / "f", progress=False)
    with pytest.raises(ConfigError, match="on_error"):
        extract_features(ds, FakePixelTower(), tmp_path / "f", on_error="ignore")
    with pytest.raises(ConfigError, match="dtype"):
        extract_features(ds, FakePixelTower(), tmp_path / "f", dtype="bfloat16")
    no_files = CrossModalDataset("pre", "test", ["a"], ["t"], ["c"], GroundTruth.from_map(np.array([0]), 1),
                                 image_features=np.zeros((1, 4), np.float32))
    with pytest.raises(DataError, match="nothing to extract"):
        extract_features(no_files, FakePixelTower(), tmp_path / "f")


def test_float16_overflow_is_not_silent(tmp_path):
    ds = good_dataset(tmp_path, n=2)
    with pytest.raises(XmodalError, match="float32"):
        extract_features(ds, FakePixelTower(scale=1e6), tmp_path / "f", tower_spec=SPEC, progress=False)


# ----------------------------------------------------------------------------- emoji-style pixel source
class PixelAccessor:
    """Like the emoji dataset's ``meta["pixels"]``: lazy RGB 64x64 images, one of them unreadable."""

    def __init__(self, n: int, bad: int | None = None):
        self.n, self.bad, self.batch_calls = n, bad, 0

    def __len__(self) -> int:
        return self.n

    def _array(self, i: int) -> np.ndarray:
        if i == self.bad:
            raise DataError(f"emoji://vendor/{i:x}: glyph missing from the font")
        return np.random.default_rng(i).integers(0, 256, (64, 64, 3), dtype=np.uint8)

    def __getitem__(self, i: int) -> Image.Image:
        return Image.fromarray(self._array(i))

    def load_pixels(self, indices) -> np.ndarray:
        self.batch_calls += 1
        return np.stack([self._array(int(i)) for i in indices])  # (k, 64, 64, 3)


def emoji_dataset(n: int, bad: int | None = None) -> CrossModalDataset:
    ds = make_dataset(Path("/nonexistent"), [f"emoji://vendor/{k:x}" for k in range(n)], name="emoji")
    ds.meta["pixels"] = PixelAccessor(n, bad)
    return ds


def test_pixel_accessor_source(tmp_path):
    ds = emoji_dataset(7)
    fs = extract_features(ds, FakePixelTower(), tmp_path / "f", tower_spec=SPEC, batch_size=3, progress=False)
    assert fs.valid.all() and ds.meta["pixels"].batch_calls == 3  # whole batches through load_pixels
    tower = FakePixelTower().eval()
    x = torch.stack([tower.preprocess(ds.meta["pixels"][k]) for k in range(7)])
    np.testing.assert_allclose(fs.pooled.astype(np.float32), tower(x).pooled.detach().numpy(), atol=2e-3)

    bad = emoji_dataset(7, bad=4)
    fs = extract_features(bad, FakePixelTower(), tmp_path / "g", tower_spec=SPEC, batch_size=3, progress=False)
    assert list(np.flatnonzero(~fs.valid)) == [4]
    assert fs.skipped[0]["path"] == "emoji://vendor/4" and "glyph missing" in fs.skipped[0]["reason"]


# ----------------------------------------------------------------------------- resume
def test_resume_after_interruption_matches_uninterrupted_run(tmp_path):
    ds = mixed_dataset(tmp_path)  # 11 images, 5 bad, so skips must survive the resume too
    whole = extract_features(ds, FakePixelTower(), tmp_path / "whole", tower_spec=SPEC, batch_size=2,
                             progress=False)

    out = tmp_path / "resumed"
    with pytest.raises(Interrupt):
        extract_features(ds, FakePixelTower(fail_after=3), out, tower_spec=SPEC, batch_size=2, progress=False)
    progress = json.loads((out / ".partial" / "progress.json").read_text())
    assert 0 < progress["done"] < ds.num_images and progress["done"] % 2 == 0
    assert not (out / "manifest.json").exists()
    with pytest.raises(DataError, match="incomplete"):
        FeatureSet.open(out)

    # different inputs must not silently continue the partial run
    with pytest.raises(DataError, match="overwrite"):
        extract_features(ds, FakePixelTower(), out, tower_spec=SPEC, batch_size=2, dtype="float32",
                         progress=False)

    tower = FakePixelTower()
    resumed = extract_features(ds, tower, out, tower_spec=SPEC, batch_size=2, progress=False)
    done_images = progress["done"]
    remaining = range(done_images, ds.num_images)
    # only the batches after the checkpoint ran again (batches made only of bad images never reach the tower)
    assert tower.calls == len({k // 2 for k in remaining if ds.image_paths[k] not in BAD})
    for name in ("pooled.npy", "grid.npy", "valid.npy", "ids.json"):
        assert (out / name).read_bytes() == (tmp_path / "whole" / name).read_bytes(), name
    assert resumed.skipped == whole.skipped
    assert resumed.manifest["files"] == whole.manifest["files"]


def test_complete_folder_is_reused_or_refused(tmp_path):
    ds = good_dataset(tmp_path, n=4)
    out = tmp_path / "f"
    extract_features(ds, FakePixelTower(), out, tower_spec=SPEC, progress=False)
    tower = FakePixelTower()
    again = extract_features(ds, tower, out, tower_spec=SPEC, progress=False)
    assert tower.calls == 0 and again.num_images == 4
    with pytest.raises(DataError, match=r"tower.*--overwrite"):
        extract_features(ds, FakePixelTower(), out, tower_spec={**SPEC, "image_size": 8}, progress=False)
    redone = extract_features(ds, FakePixelTower(image_size=8), out, tower_spec={**SPEC, "image_size": 8},
                              overwrite=True, progress=False)
    assert redone.grid.shape == (4, 4, 6)


def test_crash_while_moving_files_into_place_recovers(tmp_path, monkeypatch):
    import xmodal.data.features as features

    ds = good_dataset(tmp_path, n=5)
    out = tmp_path / "f"
    real = features._fsync_dir

    def crash(path):  # first called after the data files moved, before the manifest
        raise Interrupt("power cut")

    monkeypatch.setattr(features, "_fsync_dir", crash)
    with pytest.raises(Interrupt):
        extract_features(ds, FakePixelTower(), out, tower_spec=SPEC, progress=False)
    assert (out / "pooled.npy").exists() and not (out / "manifest.json").exists()
    monkeypatch.setattr(features, "_fsync_dir", real)
    tower = FakePixelTower()
    fs = extract_features(ds, tower, out, tower_spec=SPEC, progress=False)
    assert tower.calls == 0
    FeatureSet.open(out, verify=True)
    assert fs.valid.all()


# ----------------------------------------------------------------------------- integrity
@pytest.fixture
def folder(tmp_path):
    ds = good_dataset(tmp_path, n=6)
    extract_features(ds, FakePixelTower(), tmp_path / "f", tower_spec=SPEC, progress=False)
    return tmp_path / "f"


def test_deleted_file_is_a_clear_error(folder):
    (folder / "grid.npy").unlink()
    with pytest.raises(DataError, match=r"grid\.npy: missing"):
        FeatureSet.open(folder)


def test_truncated_file_is_a_clear_error(folder):
    data = (folder / "pooled.npy").read_bytes()
    (folder / "pooled.npy").write_bytes(data[:-10])
    with pytest.raises(DataError, match=r"pooled\.npy: is \d+ bytes, manifest.json says"):
        FeatureSet.open(folder)


def test_changed_bytes_found_only_with_verify(folder):
    data = bytearray((folder / "pooled.npy").read_bytes())
    data[-1] ^= 0x55
    (folder / "pooled.npy").write_bytes(bytes(data))
    FeatureSet.open(folder)  # sizes and shapes still agree
    with pytest.raises(DataError, match="sha256"):
        FeatureSet.open(folder, verify=True)


def test_manifest_and_ids_checks(folder):
    ids = json.loads((folder / "ids.json").read_text())
    (folder / "ids.json").write_text(json.dumps(ids[::-1]))  # same length, other order
    with pytest.raises(DataError, match="ids.json"):
        FeatureSet.open(folder)
    (folder / "manifest.json").write_text("{ not json")
    with pytest.raises(DataError, match=r"manifest\.json:1: not valid JSON"):
        FeatureSet.open(folder)
    (folder / "manifest.json").unlink()
    with pytest.raises(DataError, match="not a feature folder"):
        FeatureSet.open(folder)
    with pytest.raises(DataError, match="no such feature folder"):
        FeatureSet.open(folder / "nope")


# ----------------------------------------------------------------------------- cache + apply_valid
def test_cached_features(tmp_path, monkeypatch):
    ds = good_dataset(tmp_path, n=5)
    first = cached_features(ds, FakePixelTower(), SPEC, cache_root=tmp_path / "cache", progress=False)
    assert first.path == tmp_path / "cache" / cache_key(ds, SPEC)
    tower = FakePixelTower()
    again = cached_features(ds, tower, SPEC, cache_root=tmp_path / "cache", progress=False)
    assert tower.calls == 0 and again.path == first.path
    other = cached_features(ds, FakePixelTower(image_size=8), {**SPEC, "image_size": 8},
                            cache_root=tmp_path / "cache", progress=False)
    assert other.path != first.path
    assert cache_key(ds.select_images([0, 1, 2]), SPEC) != cache_key(ds, SPEC)
    assert cache_key(ds, SPEC, dtype="float32") != cache_key(ds, SPEC)

    monkeypatch.setenv("XMODAL_CACHE", str(tmp_path / "env"))
    assert default_cache_root() == tmp_path / "env" / "features"
    fs = cached_features(ds, FakePixelTower(), SPEC, progress=False)
    assert fs.path.parent == tmp_path / "env" / "features"
    monkeypatch.delenv("XMODAL_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_root() == tmp_path / "xdg" / "xmodal" / "features"


def test_apply_valid_attaches_without_copy_and_checks_ids(tmp_path):
    ds = good_dataset(tmp_path, n=5)
    fs = extract_features(ds, FakePixelTower(), tmp_path / "f", tower_spec=SPEC, progress=False)
    pooled = apply_valid(ds, fs)
    assert pooled.image_features is fs.pooled and pooled.num_texts == 5
    assert apply_valid(ds, fs, use="grid").image_features is fs.grid
    with pytest.raises(DataError, match="do not belong"):
        apply_valid(ds.select_images([0, 1, 2]), fs)
    swapped = ds.select_images([1, 0, 2, 3, 4])
    with pytest.raises(DataError, match="image 0 is 'img1'"):
        apply_valid(swapped, fs)


# ----------------------------------------------------------------------------- CLI
def _register_cli_fakes() -> None:
    """A dataset format reading ``images.txt`` (one relative path per line) and a fake tower."""
    if "test-listing" not in DATASETS:
        @DATASETS.register("test-listing")
        def _read(path: Path, split: str) -> CrossModalDataset:
            return make_dataset(path, (path / "images.txt").read_text().split(), name="listing", split=split)
    if "test-fake-pixels" not in IMAGE_TOWERS:
        IMAGE_TOWERS.register("test-fake-pixels")(FakePixelTower)


def _listing(tmp_path: Path) -> Path:
    ds = mixed_dataset(tmp_path)
    (ds.root / "images.txt").write_text("\n".join(ds.image_paths) + "\n")
    return ds.root


def test_cli_extract_reports_skips(tmp_path, capsys):
    from xmodal.cli import main

    _register_cli_fakes()
    root = _listing(tmp_path)
    argv = ["extract", "--format", "test-listing", "--path", str(root), "--split", "test",
            "--tower", "test-fake-pixels", "--tower-arg", "dim=5", "--image-size", "8", "--out",
            str(tmp_path / "out"), "--batch-size", "3", "--workers", "1", "--no-progress"]
    assert main(argv) == 0
    out, err = capsys.readouterr()
    assert str(tmp_path / "out") in out and "skipped 5 unreadable image(s)" in out
    for name in BAD:
        assert str(root / name) in out
    assert "Traceback" not in out + err
    fs = FeatureSet.open(tmp_path / "out")
    assert fs.tower == {"name": "test-fake-pixels", "dim": 5, "image_size": 8}
    assert fs.pooled.shape == (11, 5) and fs.grid.shape == (11, 4, 5)

    assert main(argv[:-1] + ["--no-grid", "--no-progress"]) == 2  # other inputs: refused
    assert "--overwrite" in capsys.readouterr().err
    assert main(argv + ["--no-grid", "--overwrite"]) == 0
    assert FeatureSet.open(tmp_path / "out").grid is None

    assert main(argv[:9] + ["--tower-arg", "colour=red", "--out", str(tmp_path / "o2")]) == 2
    assert "takes no argument 'colour'" in capsys.readouterr().err


def test_cli_on_error_fail_in_a_subprocess(tmp_path):
    root = _listing(tmp_path)
    script = tmp_path / "run.py"
    script.write_text(textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(TESTS)!r})
        import test_extract
        test_extract._register_cli_fakes()
        from xmodal.cli import main
        sys.exit(main(sys.argv[1:]))
    """))
    base = [sys.executable, str(script), "extract", "--format", "test-listing", "--path", str(root),
            "--split", "test", "--tower", "test-fake-pixels", "--no-progress"]
    proc = subprocess.run(base + ["--out", str(tmp_path / "out"), "--on-error", "fail"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert f"xmodal extract: error: {root / 'cut.png'}: truncated image file" in proc.stderr

    proc = subprocess.run(base + ["--out", str(tmp_path / "out2"), "--max-pixels", "100"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "none of the 11 images could be read" in proc.stderr and "above the limit of 100" in proc.stderr


# ----------------------------------------------------------------------------- real backbone
def test_efficientnet_lite0_smoke(tmp_path):
    import xmodal.models.image  # noqa: F401  (registers the towers, when written)

    if "efficientnet_lite0" not in IMAGE_TOWERS:
        pytest.skip("efficientnet_lite0 tower not registered yet")
    tower = IMAGE_TOWERS.create("efficientnet_lite0", image_size=64, frozen=True)
    ds = good_dataset(tmp_path, n=3)
    fs = extract_features(ds, tower, tmp_path / "f", tower_spec={"name": "efficientnet_lite0", "image_size": 64},
                          batch_size=2, progress=False)
    assert fs.valid.all() and fs.pooled.shape[0] == 3 and fs.grid.ndim == 3
    assert np.isfinite(fs.pooled.astype(np.float32)).all() and fs.pooled.astype(np.float32).std() > 0
