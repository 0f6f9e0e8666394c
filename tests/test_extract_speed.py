"""Fast extraction: backends equal to eager features, worker processes, the content-keyed cache, benchmark."""
from __future__ import annotations

import importlib.util
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from test_extract import BAD, FakePixelTower, SPEC, good_dataset, make_dataset, mixed_dataset
from xmodal.data import features as F
from xmodal.data.extract_backends import AUTO_ONNX_MIN_IMAGES, BACKENDS, onnxruntime_available, resolve_backend
from xmodal.data.features import FeatureSet, cache_key, cached_features, extract_features, images_digest
from xmodal.data.images import ImageLoadError
from xmodal.errors import ConfigError, DataError

ROOT = Path(__file__).resolve().parents[1]
needs_ort = pytest.mark.skipif(not onnxruntime_available(), reason="onnxruntime/onnx not installed (the onnx extra)")


@pytest.fixture(autouse=True)
def one_thread(monkeypatch, tmp_path):
    """One torch thread: on a shared, loaded 2-core machine two OpenMP threads run 10-50x slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    monkeypatch.setenv("XMODAL_CACHE", str(tmp_path / "xcache"))  # ONNX exports and digests stay here
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def lite96():
    from xmodal.models.base import IMAGE_TOWERS
    import xmodal.models.image  # noqa: F401

    return IMAGE_TOWERS.create("efficientnet_lite0", image_size=96, frozen=True).eval()


def emoji_few(k: int = 6):
    from xmodal.data import emoji, load_dataset

    ds = load_dataset("emoji", emoji.default_path(), "test")
    return ds.select_images(np.linspace(0, ds.num_images - 1, k).astype(int))


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.reshape(len(a), -1).astype(np.float64), b.reshape(len(b), -1).astype(np.float64)
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


# ----------------------------------------------------------------------------- backends
@pytest.mark.parametrize("backend", ["torch", "jit", pytest.param("onnxruntime", marks=needs_ort)])
def test_backend_features_match_eager_on_emoji(tmp_path, lite96, backend):
    """Every fast backend gives today's eager features (cosine >= 0.999 per image, pooled and each
    grid cell), deterministically: a second run writes the same bytes."""
    ds = emoji_few()
    opts = dict(tower_spec={"name": "efficientnet_lite0", "image_size": 96}, batch_size=4, dtype="float32",
                progress=False)
    ref = extract_features(ds, lite96, tmp_path / "eager", backend="eager", **opts)
    fast = extract_features(ds, lite96, tmp_path / backend, backend=backend, **opts)
    assert fast.manifest["inputs"]["backend"] == backend
    assert cosines(np.asarray(fast.pooled), np.asarray(ref.pooled)).min() >= 0.999
    cells = np.asarray(fast.grid).reshape(-1, fast.grid.shape[-1])
    assert cosines(cells, np.asarray(ref.grid).reshape(cells.shape)).min() >= 0.999
    assert not np.array_equal(np.asarray(fast.pooled), np.asarray(ref.pooled)) or backend == "eager"
    again = extract_features(ds, lite96, tmp_path / f"{backend}2", backend=backend, **opts)
    assert again.manifest["files"]["grid.npy"]["sha256"] == fast.manifest["files"]["grid.npy"]["sha256"]


def test_inference_graph_batch_independent_and_folded(lite96):
    graph = lite96.inference_graph()
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in graph.modules())
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in lite96.modules())  # the tower is untouched
    x = torch.randint(0, 256, (3, 3, 96, 96), dtype=torch.uint8)
    with torch.inference_mode():
        tokens, pooled = graph(x)
        out = lite96(x)
        assert tokens.shape == out.tokens.shape and pooled.shape == out.pooled.shape
        assert cosines(pooled.numpy(), out.pooled.numpy()).min() >= 0.9999
        assert torch.equal(graph(x[:1])[1], pooled[:1])


def test_backend_resolution(lite96):
    fake = FakePixelTower()
    assert resolve_backend("auto", fake) == "eager"  # no graph: the tower's own forward
    assert resolve_backend("auto", lite96) == ("onnxruntime" if onnxruntime_available() else "torch")
    assert resolve_backend("auto", lite96, num_images=AUTO_ONNX_MIN_IMAGES - 1) == "torch"  # export not repaid
    assert resolve_backend("auto", lite96, "cuda") == "torch"
    for name in ("jit", "onnxruntime"):
        with pytest.raises(ConfigError, match="does not provide"):
            resolve_backend(name, fake)
    with pytest.raises(ConfigError, match="one of auto, eager, torch"):
        resolve_backend("tensorrt", lite96)
    with pytest.raises(ConfigError, match="CPU only"):
        resolve_backend("onnxruntime", lite96, "cuda")
    assert set(BACKENDS) == {"auto", "eager", "torch", "jit", "onnxruntime"}


def test_backend_is_an_input_and_old_folders_read_as_eager(tmp_path, lite96):
    ds = emoji_few(3)
    spec = {"name": "efficientnet_lite0", "image_size": 96}
    fs = extract_features(ds, lite96, tmp_path / "f", tower_spec=spec, backend="eager", progress=False, grid=False)
    with pytest.raises(DataError, match="backend: was 'eager', now 'torch'"):
        extract_features(ds, lite96, tmp_path / "f", tower_spec=spec, backend="torch", progress=False, grid=False)
    manifest = json.loads((fs.path / "manifest.json").read_text())
    del manifest["inputs"]["backend"]  # a folder written before backends existed
    (fs.path / "manifest.json").write_text(json.dumps(manifest))
    assert extract_features(ds, lite96, tmp_path / "f", tower_spec=spec, backend="eager", progress=False,
                            grid=False).num_images == 3


# ----------------------------------------------------------------------------- worker processes
def test_worker_processes_give_identical_bytes_and_the_same_skips(tmp_path):
    ds = mixed_dataset(tmp_path)
    runs = {w: extract_features(ds, FakePixelTower(), tmp_path / f"w{w}", tower_spec=SPEC, batch_size=2,
                                num_workers=w, progress=False) for w in (0, 2)}
    for name in ("pooled.npy", "grid.npy", "valid.npy"):
        assert runs[0].manifest["files"][name]["sha256"] == runs[2].manifest["files"][name]["sha256"]
    assert runs[0].skipped == runs[2].skipped and len(runs[2].skipped) == len(BAD)
    assert {Path(s["path"]).name for s in runs[2].skipped} == set(BAD)
    with pytest.raises(ImageLoadError, match="cut.png"):
        extract_features(ds, FakePixelTower(), tmp_path / "fail", tower_spec=SPEC, batch_size=2, num_workers=2,
                         on_error="fail", progress=False)


def test_decoding_runs_in_forked_processes(tmp_path):
    ds = good_dataset(tmp_path, n=4)
    source = F._ImageSource(ds, None)  # noqa: SLF001 - the pool extraction uses
    pool, processes = F._decode_pool(source, FakePixelTower().preprocess, 1)  # noqa: SLF001
    try:
        assert processes
        pixels, errors = pool.submit(F._decode_in_worker, np.arange(2)).result()  # noqa: SLF001
    finally:
        pool.shutdown()
    assert errors == [None, None] and pixels[0].dtype == np.uint8 and pixels[0].shape == (3, 16, 16)


# ----------------------------------------------------------------------------- content-keyed cache
def copy_of(tmp_path: Path, ds, name: str):
    """The same image files under another folder, dataset name and ids (a translated copy of a table)."""
    root = tmp_path / name
    shutil.copytree(ds.root, root)
    copy = make_dataset(root, list(ds.image_paths), name=name, split="train")
    copy.image_ids[:] = [f"{name}-{i}" for i in copy.image_ids]
    return copy


def test_same_images_share_one_cache_entry(tmp_path):
    ds = mixed_dataset(tmp_path)
    other = copy_of(tmp_path, ds, "multilingual")
    assert cache_key(ds, SPEC, cache_root=tmp_path / "c") == cache_key(other, SPEC, cache_root=tmp_path / "c")
    first = cached_features(ds, FakePixelTower(), SPEC, cache_root=tmp_path / "c", progress=False)
    tower = FakePixelTower()
    shared = cached_features(other, tower, SPEC, cache_root=tmp_path / "c", progress=False)
    assert tower.calls == 0 and shared.path == first.path  # not extracted again
    assert shared.ids == other.image_ids  # labelled for the dataset that asked
    assert all(str(tmp_path / "multilingual") in s["path"] and s["id"].startswith("multilingual-")
               for s in shared.skipped)
    F.apply_valid(other, shared)  # ids line up
    assert FeatureSet.open(first.path, verify=True).ids == ds.image_ids  # the folder itself stays consistent

    (other.root / other.image_paths[0]).write_bytes((ds.root / ds.image_paths[2]).read_bytes())
    assert cache_key(other, SPEC, cache_root=tmp_path / "c") != cache_key(ds, SPEC, cache_root=tmp_path / "c")
    assert cache_key(ds, SPEC, backend="torch") != cache_key(ds, SPEC)


def test_file_digests_are_memoised_by_stat(tmp_path, monkeypatch):
    ds = good_dataset(tmp_path, n=4)
    first = images_digest(ds, tmp_path / "c")
    monkeypatch.setattr(F, "file_sha256", lambda *a, **k: pytest.fail("image bytes read again"))
    assert images_digest(ds, tmp_path / "c") == first  # from the memo: no image read
    monkeypatch.undo()
    path = ds.image_path(1)
    path.write_bytes(path.read_bytes())  # same bytes, new mtime: re-hashed, same digest
    assert images_digest(ds, tmp_path / "c") == first
    assert len(list((tmp_path / "c" / ".digests").glob("*.json"))) == 2


def test_emoji_languages_share_pixels_digest():
    from xmodal.data import emoji, load_dataset

    en = load_dataset("emoji", emoji.default_path(), "val", lang="en")
    multi = load_dataset("emoji", emoji.default_path(), "val", lang="all")
    assert images_digest(en).startswith("pixels-") and images_digest(en) == images_digest(multi)


# ----------------------------------------------------------------------------- CLI and benchmark
def test_cli_backend_flag(tmp_path, capsys):
    from xmodal.cli import main

    ds = good_dataset(tmp_path, n=3)
    csv = tmp_path / "pairs.csv"
    csv.write_text("image,caption\n" + "".join(f"imgs/{p},c{k}\n" for k, p in enumerate(ds.image_paths)))
    argv = ["extract", "--format", "table", "--path", str(csv), "--split", "all", "--image-size", "64",
            "--out", str(tmp_path / "out"), "--batch-size", "2", "--backend", "torch", "--no-progress", "--no-grid"]
    assert main(argv) == 0
    assert "backend torch" in capsys.readouterr().out
    assert main(argv[:-4] + ["--backend", "eager", "--no-progress", "--no-grid"]) == 2  # other inputs: refused
    assert "backend" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(argv[:-4] + ["--backend", "tensorrt"])


def test_benchmark_dry_run(capsys, monkeypatch, tmp_path):
    path = ROOT / "benchmarks" / "extract_speed.py"
    spec = importlib.util.spec_from_file_location("extract_speed_bench", path)
    bench = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, bench)
    spec.loader.exec_module(bench)
    res = bench.main(["--dry-run"])
    out = capsys.readouterr().out
    assert "x eager loop" in out and "of matmul" in out and "decode" in out
    assert set(res["ratios"]) == {"torch/0", "eager/0", "torch/1"} and all(r > 0 for r in res["ratios"].values())
    assert res["flops"] > 0 and res["gflops"] > 0


@needs_ort
def test_damaged_onnx_cache_file_is_a_clear_error_and_removed(tmp_path, lite96):
    from xmodal.data.extract_backends import Engine, graph_digest
    from xmodal.errors import XmodalError
    from xmodal.utils import cache_dir

    x = torch.randint(0, 256, (2, 3, 96, 96), dtype=torch.uint8)
    graph = lite96.inference_graph()
    path = cache_dir() / "onnx" / f"{graph_digest(graph, x)[:24]}.onnx"
    path.parent.mkdir(parents=True)
    path.write_bytes(b"not an onnx model")
    with pytest.raises(XmodalError, match=r"\.onnx: ONNX Runtime cannot load"):
        Engine(lite96, "onnxruntime", torch.device("cpu"))(x, True)
    assert not path.exists()  # the next run exports again
