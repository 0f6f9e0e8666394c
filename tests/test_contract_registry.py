"""Registry-driven contract tests: every registered dataset format, evaluation protocol and
index backend must pass the same checks, and each needs an entry here to be covered.

Registering a new format (``xmodal.data.base.DATASETS``), protocol (``PROTOCOLS``) or index
backend (``BACKENDS``) without adding its fixture / spec below fails the coverage tests and the
parametrised contract for the new name. Test names contain "contract" (``pytest -k contract``).
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
from data_fixtures import (write_foodiml_catalogue, write_foodiml_parquet, foodiml_rows, write_karpathy,
                           write_precomp, write_recipe1m, write_table, write_vinvl)
from image_fixtures import write_ok

from xmodal.data import emoji
from xmodal.data.base import DATASETS, CrossModalDataset, GroundTruth, list_formats, load_dataset
from xmodal.data.recipe1m import image_relpath
from xmodal.errors import DataError, XmodalError
from xmodal.eval.metrics import METRIC_KEYS
from xmodal.eval.protocols import (PROTOCOLS, evaluate_embeddings, evaluate_protocol, list_protocols,
                                   protocol_subsets)
from xmodal.index import Index, list_backends


# =============================================================================================
# 1. dataset formats
# =============================================================================================
@dataclass
class FormatFixture:
    """A small dataset on disk in one format's real layout."""

    path: Path
    #: split -> (num_images, num_texts) the fixture holds
    counts: dict[str, tuple[int, int]]
    options: dict[str, Any] = field(default_factory=dict)


def _images(root: Path, rel_paths, seed: int = 0) -> None:
    for k, rel in enumerate(dict.fromkeys(rel_paths)):
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        write_ok(p, seed=seed + k, size=(12, 10))


def _precomp(tmp: Path) -> FormatFixture:
    write_precomp(tmp, "test", num_images=4, caps_per_image=5)
    # VSE++ layout: one feature row per caption, and image ids given per caption
    write_precomp(tmp, "dev", num_images=3, caps_per_image=2, feature_shape=(6,), rows_per_caption=True,
                  ids="caption", seed=1)
    return FormatFixture(tmp, {"test": (4, 20), "dev": (3, 6)})


def _karpathy_coco(tmp: Path) -> FormatFixture:
    import json

    path = write_karpathy(tmp, "coco")
    rel = [f"{im['filepath']}/{im['filename']}" for im in json.loads(path.read_text())["images"]]
    _images(tmp, rel)
    # train includes restval (as VSE++); image 0 (train) has one extra sentence
    return FormatFixture(tmp, {"train": (2, 11), "restval": (1, 5), "val": (1, 5), "test": (2, 10)})


def _karpathy_flickr(tmp: Path) -> FormatFixture:
    import json

    path = write_karpathy(tmp, "flickr30k", splits=("train", "val", "test"), extra_caption_on=None)
    _images(tmp, [im["filename"] for im in json.loads(path.read_text())["images"]])
    return FormatFixture(path, {"train": (1, 5), "val": (1, 5), "test": (2, 10)})


def _vinvl(tmp: Path) -> FormatFixture:
    write_vinvl(tmp, "test", caps_per_image=2)
    # same feature file again (same keys and seed), with a train caption file and an image key list
    write_vinvl(tmp, "train", caps_per_image=3, img_keys=("184613", "391895"), captions="coco")
    return FormatFixture(tmp, {"test": (4, 8), "train": (2, 6)}, {"feature_dim": 16, "max_regions": 4})


def _foodiml_csv(tmp: Path) -> FormatFixture:
    csv, _ = write_foodiml_catalogue(tmp)  # writes the image files it names
    return FormatFixture(csv, {"train": (30, 30), "val": (15, 15), "test": (21, 21)})


def _foodiml_parquet(tmp: Path) -> FormatFixture:
    rows = foodiml_rows()
    samples = write_foodiml_parquet(tmp, rows)
    _images(tmp, [r["s3_path"] for r in rows])  # image root of a 'samples' folder is its parent
    return FormatFixture(samples, {"test": (8, 8), "train": (1, 1), "val": (1, 1)})


def _recipe1m(tmp: Path) -> FormatFixture:
    ref = write_recipe1m(tmp)
    part = {r["id"]: r["partition"] for r in ref["layer1"]}
    _images(tmp, [image_relpath(part[rid], i) for rid, imgs in ref["images"].items() for i in imgs])
    # test: Gazpacho has no image and is dropped; Mac and Cheese has two images
    return FormatFixture(tmp, {"test": (4, 3), "train": (1, 1), "val": (1, 1)})


def _table(suffix: str) -> Callable[[Path], FormatFixture]:
    def build(tmp: Path) -> FormatFixture:
        path = write_table(tmp / f"pairs{suffix}")
        _images(tmp, ["imgs/a.jpg", "imgs/b.jpg", "imgs/c.jpg", "imgs/d.jpg"])
        return FormatFixture(path, {"train": (2, 3), "test": (2, 3)})
    return build


def _webdataset(tmp: Path) -> FormatFixture:  # shards as xmodal export writes them, one folder per split
    from xmodal.data.webdataset import write_shards

    table = _table(".csv")(tmp)
    for split in table.counts:
        write_shards(load_dataset("table", table.path, split), tmp / "wds" / split, shard_size=1, progress=False)
    return FormatFixture(tmp / "wds", dict(table.counts))


def _emoji(tmp: Path) -> FormatFixture:  # the packaged dataset is the real format
    return FormatFixture(emoji.default_path(), {"train": (2822, 1411), "val": (500, 250), "test": (500, 250)})


#: (format, variant) -> builder. Add an entry for every new dataset format.
FORMAT_FIXTURES: dict[tuple[str, str], Callable[[Path], FormatFixture]] = {
    ("precomp", "scan"): _precomp,
    ("karpathy", "coco"): _karpathy_coco,
    ("karpathy", "flickr30k"): _karpathy_flickr,
    ("vinvl", "tsv"): _vinvl,
    ("foodiml", "csv"): _foodiml_csv,
    ("foodiml", "parquet"): _foodiml_parquet,
    ("recipe1m", "layers"): _recipe1m,
    ("table", "csv"): _table(".csv"),
    ("table", "jsonl"): _table(".jsonl"),
    ("table", "parquet"): _table(".parquet"),
    ("emoji", "packaged"): _emoji,
    ("webdataset", "shards"): _webdataset,
}
COVERED_FORMATS = sorted({fmt for fmt, _ in FORMAT_FIXTURES})


def _format_cases() -> list:
    cases = [pytest.param(fmt, var, id=f"{fmt}-{var}") for fmt, var in FORMAT_FIXTURES]
    cases += [pytest.param(fmt, None, id=f"{fmt}-MISSING") for fmt in list_formats() if fmt not in COVERED_FORMATS]
    return cases


def _reader_splits(fmt: str, path: Path) -> list[str] | None:
    """The split names the format's reader module reports for ``path`` (None if it has no ``splits``)."""
    mod = sys.modules[DATASETS.get(fmt).__module__]
    fn = getattr(mod, "splits", None)
    if callable(fn):
        return sorted(fn(path))
    known = getattr(mod, "SPLITS", None)
    return sorted(known) if known is not None else None


def check_dataset(ds: CrossModalDataset, split: str, counts: tuple[int, int]) -> None:
    """The invariants every reader's output must satisfy."""
    where = f"{ds.name}/{split}"
    assert isinstance(ds, CrossModalDataset)
    assert ds.split == split
    assert (ds.num_images, ds.num_texts) == counts, where
    # ids: strings, unique
    for what, ids in (("image_ids", ds.image_ids), ("text_ids", ds.text_ids)):
        assert all(isinstance(i, str) and i for i in ids), f"{where}: {what} must be non-empty strings"
        assert len(set(ids)) == len(ids), f"{where}: {what} are not unique"
    # captions: non-empty strings, one per text
    assert len(ds.captions) == ds.num_texts
    assert all(isinstance(c, str) and c.strip() for c in ds.captions), f"{where}: empty or non-string caption"
    if ds.langs is not None:
        assert len(ds.langs) == ds.num_texts and all(isinstance(x, str) and x for x in ds.langs)
    for name, vals in (ds.fields or {}).items():
        assert len(vals) == ds.num_texts and all(isinstance(v, str) for v in vals), name
    # ground truth: shape, every text has >= 1 image, indices in range, no repeats, transpose agrees
    gt = ds.gt
    assert isinstance(gt, GroundTruth)
    assert (gt.num_texts, gt.num_images) == (ds.num_texts, ds.num_images)
    assert np.all(gt.counts() >= 1), f"{where}: text {int(np.argmin(gt.counts()))} has no image"
    assert gt.nnz == 0 or (gt.indices.min() >= 0 and gt.indices.max() < ds.num_images)
    forward = np.zeros((ds.num_texts, ds.num_images), dtype=bool)
    for t in range(ds.num_texts):
        imgs = gt.images_of(t)
        assert len(np.unique(imgs)) == len(imgs), f"{where}: text {t} lists an image twice"
        forward[t, imgs] = True
    tr = gt.transpose()
    assert (tr.num_texts, tr.num_images) == (ds.num_images, ds.num_texts)
    backward = np.zeros_like(forward)
    for i in range(ds.num_images):
        backward[tr.images_of(i), i] = True
    np.testing.assert_array_equal(forward, backward, err_msg=f"{where}: gt.transpose() disagrees with images_of")
    np.testing.assert_array_equal(forward, gt.dense())
    assert tr.nnz == gt.nnz
    # images: files that exist, virtual URIs backed by a pixel source, or feature rows
    assert ds.image_paths is not None or ds.image_features is not None, \
        f"{where}: images have neither paths nor features"
    if ds.image_paths is not None:
        assert len(ds.image_paths) == ds.num_images
        uris = [p for p in ds.image_paths if "://" in str(p)]
        if uris:
            pixels = ds.meta.get("pixels")
            assert pixels is not None and len(pixels) == ds.num_images, f"{where}: URI images need meta['pixels']"
            assert np.asarray(pixels[ds.num_images - 1]).ndim == 3
        for i, p in enumerate(ds.image_paths):
            if "://" not in str(p):
                assert ds.image_path(i).is_file(), \
                    f"{where}: image {ds.image_ids[i]!r} at {ds.image_path(i)} is missing"
    if ds.image_features is not None:
        feats = ds.image_features
        assert feats.shape[0] == ds.num_images, f"{where}: {feats.shape[0]} feature rows for {ds.num_images} images"
        last = np.asarray(feats[ds.num_images - 1])
        assert last.shape == tuple(feats.shape[1:]) and np.isfinite(last).all()
    if ds.image_boxes is not None:
        assert ds.image_boxes.shape[0] == ds.num_images


@pytest.mark.parametrize("fmt, variant", _format_cases())
def test_dataset_format_contract(fmt, variant, tmp_path):
    if variant is None:
        pytest.fail(f"dataset format {fmt!r} is registered but has no contract fixture: "
                    "add a fixture for the new format to FORMAT_FIXTURES in tests/test_contract_registry.py")
    fx = FORMAT_FIXTURES[(fmt, variant)](tmp_path)
    have = _reader_splits(fmt, fx.path)
    if have is not None:
        assert sorted(fx.counts) == have, f"{fmt}: the fixture's splits differ from what the reader reports"
    for split, counts in fx.counts.items():
        ds = load_dataset(fmt, fx.path, split=split, **fx.options)
        check_dataset(ds, split, counts)
        # the reader called directly (as the registry does) gives the same dataset
        again = DATASETS.create(fmt, fx.path, split, **fx.options)
        assert again.image_ids == ds.image_ids and again.text_ids == ds.text_ids
        assert again.captions == ds.captions
        np.testing.assert_array_equal(again.gt.indptr, ds.gt.indptr)
        np.testing.assert_array_equal(again.gt.indices, ds.gt.indices)
    # a split the fixture does not have is an error, not an empty dataset
    with pytest.raises(XmodalError):
        load_dataset(fmt, fx.path, split="no-such-split", **fx.options)


@pytest.mark.parametrize("fmt", list_formats())
def test_dataset_missing_path_contract(fmt, tmp_path):
    fixtures = [k for k in FORMAT_FIXTURES if k[0] == fmt]
    if not fixtures:
        pytest.fail(f"dataset format {fmt!r} has no contract fixture: add a fixture for the new format")
    fx = FORMAT_FIXTURES[fixtures[0]](tmp_path / "data")
    split = next(iter(fx.counts))
    missing = tmp_path / "nowhere" / "missing-data"
    with pytest.raises(XmodalError) as err:
        load_dataset(fmt, missing, split=split, **fx.options)
    assert str(missing) in str(err.value)
    # the reader itself (used by code that bypasses load_dataset) names the path too
    with pytest.raises(XmodalError) as err:
        DATASETS.get(fmt)(missing, split, **fx.options)
    assert str(missing) in str(err.value), f"{fmt} reader: {err.value}"


def test_dataset_formats_coverage_contract():
    assert COVERED_FORMATS == list_formats(), (
        "add a fixture for the new format to FORMAT_FIXTURES (registered: "
        f"{list_formats()}, covered: {COVERED_FORMATS})")


# =============================================================================================
# 2. evaluation protocols
# =============================================================================================
def _int_embeddings(rng: np.random.Generator, gt: GroundTruth, d: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """Small integer coordinates, so every dot product is exact in float32 and float64 (ties
    included). Each text is its first image plus noise, so ranks spread over 0..10+ and the
    recalls are neither all 0 nor all 100."""
    img = rng.integers(-2, 3, size=(gt.num_images, d)).astype(np.float32)
    txt = rng.integers(-2, 3, size=(gt.num_texts, d)).astype(np.float32)
    first = gt.first_image()
    has = first >= 0
    txt[has] = img[first[has]] + rng.integers(-1, 2, size=(int(has.sum()), d))
    return img, txt


def _gt(lists: list[list[int]], num_images: int) -> GroundTruth:
    return GroundTruth.from_map(lists, num_images, allow_empty=True)


def _gt_one_each(rng, num_images: int, *, skip_every: int = 0, extra: int = 0, extra_images: int = 3,
                 empty: int = 0) -> GroundTruth:
    """One caption per image (shuffled), images ``k * skip_every`` left without one, ``extra``
    captions with several random images, ``empty`` captions with none; in shuffled order."""
    lists = [[int(i)] for i in range(num_images) if not (skip_every and i % skip_every == 0)]
    lists += [sorted(set(rng.integers(0, num_images, rng.integers(2, extra_images + 1)).tolist()))
              for _ in range(extra)]
    lists += [[] for _ in range(empty)]
    order = rng.permutation(len(lists))
    return _gt([lists[k] for k in order], num_images)


def _gt_coco(rng) -> GroundTruth:
    gt = _gt_one_each(rng, 5200, skip_every=97, extra=300)
    lists = [gt.images_of(t).tolist() for t in range(gt.num_texts)]
    lists += [[999, 1000], [4999, 5000], [10, 4010]]  # texts spanning two folds / the 5k boundary
    return _gt(lists, 5200)


def _texts_touching(gt: GroundTruth, images: np.ndarray) -> np.ndarray:
    mask = np.zeros(gt.num_images, dtype=bool)
    mask[images] = True
    return np.array([t for t in range(gt.num_texts) if mask[gt.images_of(t)].any()], dtype=np.int64)


def _ref_full(gt, seed):
    return [(np.arange(gt.num_images), np.arange(gt.num_texts))]


def _ref_coco5k(gt, seed):
    ims = np.arange(5000)
    return [(ims, _texts_touching(gt, ims))]


def _ref_coco1k(gt, seed):
    out = []
    for f in range(5):
        ims = np.arange(1000 * f, 1000 * (f + 1))
        out.append((ims, _texts_touching(gt, ims)))
    return out


def _check_recipe(size: int):
    def check(gt: GroundTruth, subsets, seed) -> None:
        eligible = set(np.flatnonzero(gt.counts() > 0).tolist())
        assert len(subsets) == 10
        for s in subsets:
            texts, images = np.asarray(s.texts), np.asarray(s.images)
            assert len(texts) == size and len(np.unique(texts)) == size
            assert np.all(np.diff(texts) > 0), "texts in original order"
            assert set(texts.tolist()) <= eligible, "only texts with an image are drawn"
            union = np.unique(np.concatenate([gt.images_of(t) for t in texts]))
            np.testing.assert_array_equal(images, union)  # exactly their positive images
        assert len({np.asarray(s.texts).tobytes() for s in subsets}) == 10, "subsets should differ"
        again = protocol_subsets(f"recipe{size // 1000}k", gt, seed=seed)
        assert all(np.array_equal(a.texts, b.texts) for a, b in zip(subsets, again)), "not reproducible"
        other = protocol_subsets(f"recipe{size // 1000}k", gt, seed=seed + 1)
        assert not np.array_equal(other[0].texts, subsets[0].texts), "seed is ignored"
    return check


@dataclass
class ProtocolSpec:
    make_gt: Callable[[np.random.Generator], GroundTruth]
    #: independent reference subsets (images, texts), or None to validate with ``check`` instead
    reference: Callable[[GroundTruth, int], list[tuple[np.ndarray, np.ndarray]]] | None = None
    check: Callable[[GroundTruth, list, int], None] | None = None
    #: ground truths the protocol must refuse with a DataError
    too_small: list[Callable[[np.random.Generator], GroundTruth]] = field(default_factory=list)


#: protocol -> spec. Add an entry for every new protocol.
PROTOCOL_SPECS: dict[str, ProtocolSpec] = {
    "full": ProtocolSpec(lambda rng: _gt_one_each(rng, 60, skip_every=7, extra=40, empty=3), _ref_full),
    "coco5k": ProtocolSpec(_gt_coco, _ref_coco5k, too_small=[lambda rng: _gt_one_each(rng, 4999)]),
    "coco1k": ProtocolSpec(_gt_coco, _ref_coco1k, too_small=[lambda rng: _gt_one_each(rng, 4999)]),
    "f30k1k": ProtocolSpec(lambda rng: _gt_one_each(rng, 1000, skip_every=50, extra=150), _ref_full,
                           too_small=[lambda rng: _gt_one_each(rng, 999), lambda rng: _gt_one_each(rng, 1001)]),
    "recipe1k": ProtocolSpec(lambda rng: _gt_one_each(rng, 300, extra=850, empty=40),
                             check=_check_recipe(1000),
                             too_small=[lambda rng: _gt_one_each(rng, 300, extra=699, empty=50)]),
    "recipe10k": ProtocolSpec(lambda rng: _gt_one_each(rng, 400, extra=9700, empty=30),
                              check=_check_recipe(10000),
                              too_small=[lambda rng: _gt_one_each(rng, 400, extra=9599, empty=50)]),
}


def _brute_metrics(img: np.ndarray, txt: np.ndarray, pos: np.ndarray) -> dict[str, float]:
    """Full score matrix; rank = non-positives scoring strictly above the best positive (ties
    favour the positive); queries without a positive are skipped."""
    # small integer coordinates: every partial sum is an integer far below 2**24, so float32
    # products are exact and the reference sees the same ties as the engine
    assert np.array_equal(img, np.round(img)) and np.array_equal(txt, np.round(txt))
    s = img.astype(np.float32) @ txt.astype(np.float32).T  # (N, M)
    out: dict[str, float] = {}
    for prefix, scores, p in (("i2t", s, pos.T), ("t2i", s.T, pos)):  # p: (queries, candidates)
        has = p.any(1)
        best = np.where(p, scores, np.float32(-np.inf)).max(1)
        ranks = ((scores > best[:, None]) & ~p).sum(1)[has]
        out[f"{prefix}_r1"] = 100.0 * np.mean(ranks < 1)
        out[f"{prefix}_r5"] = 100.0 * np.mean(ranks < 5)
        out[f"{prefix}_r10"] = 100.0 * np.mean(ranks < 10)
        out[f"{prefix}_medr"] = float(np.floor(np.median(ranks)) + 1)
        out[f"{prefix}_meanr"] = float(np.mean(ranks) + 1)
    out["rsum"] = sum(out[f"{p}_r{k}"] for p in ("i2t", "t2i") for k in (1, 5, 10))
    return out


def _as_index(sel, n: int) -> np.ndarray:
    return np.arange(n) if sel is None else np.asarray(sel, dtype=np.int64)


def _protocol_cases() -> list:
    names = sorted(set(list_protocols()) | set(PROTOCOL_SPECS))
    return [pytest.param(n, id=n) for n in names]


@pytest.mark.parametrize("name", _protocol_cases())
def test_protocol_contract(name):
    if name not in PROTOCOL_SPECS:
        pytest.fail(f"protocol {name!r} is registered but has no contract spec: add one to PROTOCOL_SPECS")
    spec = PROTOCOL_SPECS[name]
    rng = np.random.default_rng(sum(map(ord, name)))
    gt = spec.make_gt(rng)
    seed = 3
    subsets = protocol_subsets(name, gt, seed=seed)
    assert subsets and len({s.name for s in subsets}) == len(subsets), "subset names must be unique"
    if spec.reference is not None:
        ref = spec.reference(gt, seed)
        assert len(subsets) == len(ref)
        for s, (ims, txts) in zip(subsets, ref):
            np.testing.assert_array_equal(_as_index(s.images, gt.num_images), ims, err_msg=f"{name} {s.name} images")
            np.testing.assert_array_equal(_as_index(s.texts, gt.num_texts), txts, err_msg=f"{name} {s.name} texts")
    if spec.check is not None:
        spec.check(gt, subsets, seed)
    for s in subsets:  # every subset selects valid, distinct, ordered rows
        for sel, n in ((s.images, gt.num_images), (s.texts, gt.num_texts)):
            idx = _as_index(sel, n)
            assert len(idx) and idx.min() >= 0 and idx.max() < n and np.all(np.diff(idx) > 0)

    img, txt = _int_embeddings(rng, gt)
    dense = gt.dense()  # (M, N)
    expected_per = []
    for s in subsets:
        ims, txts = _as_index(s.images, gt.num_images), _as_index(s.texts, gt.num_texts)
        expected_per.append(_brute_metrics(img[ims], txt[txts], dense[np.ix_(txts, ims)]))
    expected = {k: float(np.mean([e[k] for e in expected_per])) for k in METRIC_KEYS}
    assert 0 < expected["t2i_r1"] < 100 and 0 < expected["i2t_r10"] < 100, "degenerate test data"

    got = evaluate_embeddings(img, txt, gt, protocol=name, seed=seed)
    assert list(got) == list(METRIC_KEYS)
    for k in METRIC_KEYS:
        assert got[k] == pytest.approx(expected[k], abs=1e-9), f"{name}: {k}"
    result = evaluate_protocol(img, txt, gt, name, seed=seed)
    assert len(result.per_subset) == len(subsets)
    for s, per, exp in zip(subsets, result.per_subset, expected_per):
        for k in METRIC_KEYS:
            assert per[k] == pytest.approx(exp[k], abs=1e-9), f"{name} {s.name}: {k}"

    for make in spec.too_small:
        small = make(rng)
        with pytest.raises(DataError, match=name):
            protocol_subsets(name, small, seed=seed)


def test_protocols_coverage_contract():
    assert sorted(PROTOCOL_SPECS) == list_protocols() == PROTOCOLS.names(), (
        f"add a contract spec for the new protocol (registered: {list_protocols()}, "
        f"covered: {sorted(PROTOCOL_SPECS)})")


# =============================================================================================
# 3. index backends
# =============================================================================================
@dataclass
class BackendSpec:
    backend_args: dict[str, Any]
    exact: bool
    needs_faiss: bool = False


#: backend -> spec: arguments that make approximate backends near-exact on a small set.
BACKEND_SPECS: dict[str, BackendSpec] = {
    "exact": BackendSpec({"block_size": 64, "query_block": 16}, exact=True),  # several blocks to merge
    "flat": BackendSpec({}, exact=True, needs_faiss=True),
    "ivf": BackendSpec({"nlist": 8, "nprobe": 8, "niter": 5}, exact=False, needs_faiss=True),
    "hnsw": BackendSpec({"M": 16, "ef_construction": 80, "ef_search": 80}, exact=False, needs_faiss=True),
    # PQ codes with an exact re-score of k * refine candidates from vectors.npy
    "ivfpq": BackendSpec({"nlist": 4, "m": 4, "nbits": 6, "opq": False, "nprobe": 4, "refine": 10},
                         exact=False, needs_faiss=True),
}
DIM = 16
K = 10


def _unit(rng, n: int) -> np.ndarray:
    x = rng.standard_normal((n, DIM)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _items(start: int, n: int) -> tuple[list[str], list[dict]]:
    ids = [f"img-{r:04d}" + ("-é" if r % 7 == 0 else "") for r in range(start, start + n)]
    meta = [{"path": f"photos/{r}.jpg", "row": r, "caption": f"picture ñ {r}", "tags": ["a", r % 3]}
            for r in range(start, start + n)]
    return ids, meta


def _check_search(index: Index, spec: BackendSpec, x: np.ndarray, q: np.ndarray, what: str) -> None:
    scores, rows = index.search(q, k=K)
    assert scores.shape == rows.shape == (len(q), K) and rows.dtype == np.int64
    full = q.astype(np.float64) @ x.astype(np.float64).T  # (Q, N)
    ref = np.argsort(-full, axis=1, kind="stable")[:, :K]
    assert np.all((rows >= 0) & (rows < len(x))), f"{what}: padding or out-of-range row"
    true = np.take_along_axis(full, rows, 1)
    np.testing.assert_allclose(scores, true, atol=1e-4, err_msg=f"{what}: scores are not the rows' scores")
    assert np.all(np.diff(scores, axis=1) <= 1e-6), f"{what}: scores not descending"
    if spec.exact:
        ref_scores = np.take_along_axis(full, ref, 1)
        differ = rows != ref
        # identical ids, except where the reference itself has a (near) tie
        assert np.all(np.abs(true[differ] - ref_scores[differ]) < 1e-5), f"{what}: ids differ from brute force"
    else:
        recall = np.mean([len(set(a) & set(b)) / K for a, b in zip(rows.tolist(), ref.tolist())])
        assert recall >= 0.9, f"{what}: recall@{K} {recall:.3f} < 0.9"


def _check_contents(index: Index, x: np.ndarray, ids: list[str], meta: list[dict]) -> None:
    assert len(index) == len(x) == len(ids)
    rows = np.arange(len(x))
    assert index.ids_of(rows) == ids
    assert index.metadata(rows) == meta
    assert index.rows_of([ids[0], ids[-1]]) == [0, len(x) - 1]
    for r in (0, len(x) // 2, len(x) - 1):
        np.testing.assert_array_equal(index.vector(r), x[r])


def _backend_cases() -> list:
    names = sorted(set(list_backends()) | set(BACKEND_SPECS))
    return [pytest.param(n, id=n) for n in names]


@pytest.mark.parametrize("name", _backend_cases())
def test_index_backend_contract(name, tmp_path):
    if name not in BACKEND_SPECS:
        pytest.fail(f"index backend {name!r} is registered but has no contract spec: add one to BACKEND_SPECS")
    spec = BACKEND_SPECS[name]
    if spec.needs_faiss:
        pytest.importorskip("faiss")
    rng = np.random.default_rng(sum(map(ord, name)))
    x1, x2 = _unit(rng, 400), _unit(rng, 150)
    ids1, meta1 = _items(0, len(x1))
    ids2, meta2 = _items(len(x1), len(x2))
    q = np.concatenate([_unit(rng, 40), x1[:5] + 0.01 * _unit(rng, 5)])
    path = tmp_path / "gallery.idx"

    index = Index.create(path, dim=DIM, backend=name, modality="image", backend_args=spec.backend_args)
    assert index.add(x1, ids1, meta1) == range(0, len(x1))
    assert len(index) == len(x1)
    _check_search(index, spec, x1, q, f"{name} before commit")
    index.commit()
    index.close()

    index = Index.open(path)
    try:
        assert (index.backend, index.dim, index.modality, index.metric) == (name, DIM, "image", "ip")
        assert {k: index.backend_args[k] for k in spec.backend_args} == spec.backend_args
        _check_contents(index, x1, ids1, meta1)
        _check_search(index, spec, x1, q, f"{name} reopened")
        # add more to the reopened index: searchable at once, kept after commit + reopen
        assert index.add(x2, ids2, meta2) == range(len(x1), len(x1) + len(x2))
        x = np.concatenate([x1, x2])
        assert len(index) == len(x)
        _check_search(index, spec, x, q, f"{name} after add")
        index.commit()
    finally:
        index.close()

    index = Index.open(path)
    try:
        assert index.backend == name
        _check_contents(index, x, ids1 + ids2, meta1 + meta2)
        _check_search(index, spec, x, np.concatenate([q, x2[:5]]), f"{name} reopened after add")
    finally:
        index.close()


def test_index_backends_coverage_contract():
    assert sorted(BACKEND_SPECS) == list_backends(), (
        f"add a contract spec for the new index backend (registered: {list_backends()}, "
        f"covered: {sorted(BACKEND_SPECS)})")
