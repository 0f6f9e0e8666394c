"""The embedded emoji dataset: packed asset, reader and build script."""
from __future__ import annotations

import hashlib
import importlib.util
import io
import os
import shutil
import tarfile
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from xmodal.data import emoji
from xmodal.data.base import CrossModalDataset, list_formats, load_dataset
from xmodal.errors import DataError

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "build_emoji_dataset.py"
#: Where the npm tarballs (or unpacked packages) live for the rebuild test.
NPM_DIR = Path(os.environ.get("XMODAL_EMOJI_NPM_DIR", "/tmp/npmdl"))

LANGS = ["bn", "da", "de", "en", "en-gb", "es", "es-mx", "et", "fi", "fr", "hi", "hu", "it", "ja",
         "ko", "lt", "ms", "nb", "nl", "pl", "pt", "ru", "sv", "th", "uk", "vi", "zh", "zh-hant"]
SPLIT_SIZES = {"train": 1411, "val": 250, "test": 250}
#: sha256 of the sorted unified code points of each split, joined by newlines. The split is
#: part of the dataset's definition: these must never change.
SPLIT_SHA256 = {
    "test": "cfb958192e44f80aa2da66ba9e18e8113319afbd2ef4b2d1e55ee394777f3758",
    "val": "d56ba66fbeaa8c7c345b21b3b8611d91795fd9cfd4831a684fb1a40fc22a88bd",
    "train": "690d8458e085d88ed5d28197fe0c2c771d87190805e7da575bfba1e8a73f4fdc",
}


def _script():
    spec = importlib.util.spec_from_file_location("build_emoji_dataset", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def pack() -> emoji.EmojiPack:
    return emoji.open_pack()


@pytest.fixture(scope="module")
def test_ds() -> CrossModalDataset:
    return emoji.read("emoji", "test")


# the packed asset ----------------------------------------------------------------------
def test_asset_is_small_and_licensed():
    root = emoji.default_path()
    total = sum(p.stat().st_size for p in root.rglob("*") if p.is_file())
    assert total < 10e6, f"emoji assets grew to {total / 1e6:.1f} MB"
    licenses = {p.name for p in (root / "LICENSES").iterdir()}
    assert {"Apache-2.0.txt", "CC-BY-4.0.txt", "emoji-datasource-google.LICENSE",
            "emoji-datasource-twitter.LICENSE", "emojibase-data.LICENSE"} <= licenses
    attribution = (root / "ATTRIBUTION.md").read_text(encoding="utf-8")
    for needle in ("Twitter, Inc and other contributors", "CC-BY-4.0", "Noto Emoji", "Apache License",
                   "Cal Henderson", "Miles Johnson"):
        assert needle in attribution
    assert "Attribution 4.0 International" in (root / "LICENSES" / "CC-BY-4.0.txt").read_text(encoding="utf-8")


def test_languages(pack):
    assert pack.languages == LANGS
    assert len(pack.languages) == 28
    ds = emoji.read("emoji", "test", lang="all")
    assert sorted(set(ds.langs)) == LANGS
    assert ds.num_texts == 28 * SPLIT_SIZES["test"]
    ja = ds.filter_lang("ja")
    assert ja.num_texts == SPLIT_SIZES["test"] and ja.meta["languages"] == LANGS


# splits --------------------------------------------------------------------------------
@pytest.mark.parametrize("split", ["train", "val", "test"])
def test_split_counts(split):
    ds = emoji.read("emoji", split)
    n = SPLIT_SIZES[split]
    assert ds.num_images == 2 * n and ds.num_texts == n and ds.gt.nnz == 2 * n
    assert len(ds.meta["pixels"]) == 2 * n
    assert ds.langs == ["en"] * n


def test_splits_disjoint_and_fixed(pack):
    seen: dict[str, set[str]] = {}
    for split in ("train", "val", "test"):
        ds = emoji.read("emoji", split, styles=("google",))
        concepts = {i.split("/", 1)[1] for i in ds.image_ids}
        assert len(concepts) == SPLIT_SIZES[split]
        digest = hashlib.sha256("\n".join(sorted(concepts)).encode()).hexdigest()
        assert digest == SPLIT_SHA256[split], f"the {split} split changed"
        seen[split] = concepts
    assert not (seen["train"] & seen["val"] or seen["train"] & seen["test"] or seen["val"] & seen["test"])
    assert len(seen["train"] | seen["val"] | seen["test"]) == pack.num_concepts == sum(SPLIT_SIZES.values())
    # the stored split is exactly what the build script's hash rule gives
    assert _script().assign_splits(pack.unified, 250, 250) == pack.meta["concepts"]["split"]


# images --------------------------------------------------------------------------------
def test_images_decode_rgb_on_white(test_ds):
    pixels = test_ds.meta["pixels"]
    im = pixels[0]
    assert isinstance(im, Image.Image) and im.mode == "RGB" and im.size == (64, 64)
    arr = pixels.load_pixels()
    assert arr.shape == (test_ds.num_images, 64, 64, 3) and arr.dtype == np.uint8
    np.testing.assert_array_equal(np.asarray(pixels[7]), arr[7])
    np.testing.assert_array_equal(pixels.load_pixels([3, 1]), arr[[3, 1]])
    corners = arr[:, [0, 0, -1, -1], [0, -1, 0, -1]]  # (N, 4, 3)
    white = (corners == 255).all(axis=(1, 2))
    assert white.mean() > 0.9, "most emoji sit on a white background"
    assert arr.reshape(len(arr), -1).min(axis=1).max() < 255, "no image is blank"
    # the two styles of one concept are different drawings
    assert not np.array_equal(arr[0], arr[1])


def test_known_emoji_pixels():
    for style in ("google", "twitter"):
        im = emoji.open_uri(f"emoji://{style}/1f600")  # grinning face: round, yellow, on white
        a = np.asarray(im)
        assert a.shape == (64, 64, 3)
        assert (a[[0, 0, -1, -1], [0, -1, 0, -1]] == 255).all()
        r, g, b = a[32, 12].astype(int)
        assert r > 200 and g > 150 and b < 100, f"{style} grinning face centre-left is not yellow: {(r, g, b)}"


def test_load_image_survives_select_images(test_ds):
    keep = [5, 2, 9]
    view = test_ds.select_images(keep)
    for k, i in enumerate(keep):
        np.testing.assert_array_equal(np.asarray(emoji.load_image(view, k)),
                                      np.asarray(test_ds.meta["pixels"][i]))
    np.testing.assert_array_equal(test_ds.meta["pixels"].load_ids(view.image_ids),
                                  test_ds.meta["pixels"].load_pixels(keep))
    sub = test_ds.meta["pixels"].select(keep)
    assert len(sub) == 3 and sub.image_ids == view.image_ids
    np.testing.assert_array_equal(sub.load_pixels(), test_ds.meta["pixels"].load_pixels(keep))


# captions and ground truth -------------------------------------------------------------
def test_ground_truth_two_images_of_own_concept(test_ds):
    assert np.all(test_ds.gt.counts() == 2)
    for t, tid in enumerate(test_ds.text_ids):
        unified, lang, kind = tid.split("/")
        assert (lang, kind) == ("en", "label")
        assert [test_ds.image_ids[i] for i in test_ds.gt.images_of(t)] == [f"google/{unified}", f"twitter/{unified}"]
        assert test_ds.image_paths[test_ds.gt.images_of(t)[0]] == f"emoji://google/{unified.lower()}"


def test_label_captions_match_metadata(pack, test_ds):
    labels = pack.meta["text"]["en"]["label"]
    index = {u: k for k, u in enumerate(pack.unified)}
    for tid, cap in zip(test_ds.text_ids, test_ds.captions):
        assert cap == labels[index[tid.split("/")[0]]]
    assert "grinning face" in pack.meta["text"]["en"]["label"]


def _naive_gt(pack, split, lang, mode):
    """caption -> set of concepts in the split it describes, computed the obvious way."""
    out = defaultdict(set)
    for c, (u, sp) in enumerate(zip(pack.unified, pack.meta["concepts"]["split"])):
        if sp != split:
            continue
        label, tags = pack.meta["text"][lang]["label"][c], pack.meta["text"][lang]["tags"][c]
        out[label].add(u)
        if mode == "label+tags" and tags:
            out[", ".join(tags)].add(u)
        if mode == "all":
            for t in tags:
                out[t].add(u)
    return out


@pytest.mark.parametrize("mode", ["label+tags", "all"])
def test_tag_captions_ground_truth(pack, mode):
    ds = emoji.read("emoji", "val", lang="de", captions=mode)
    naive = _naive_gt(pack, "val", "de", mode)
    assert sorted(ds.captions) == sorted(naive), "one text per distinct caption"
    for t, cap in enumerate(ds.captions):
        got = {ds.image_ids[i] for i in ds.gt.images_of(t)}
        assert got == {f"{s}/{u}" for u in naive[cap] for s in ("google", "twitter")}
    assert len(set(ds.text_ids)) == ds.num_texts
    if mode == "all":
        assert ds.gt.counts().max() > 2, "a shared tag points at several concepts"


def test_styles_option():
    ds = emoji.read("emoji", "test", styles=("twitter",))
    assert ds.num_images == SPLIT_SIZES["test"] and np.all(ds.gt.counts() == 1)
    assert all(i.startswith("twitter/") for i in ds.image_ids)
    both = emoji.read("emoji", "test", styles="google,twitter")
    np.testing.assert_array_equal(ds.meta["pixels"].load_pixels(), both.meta["pixels"].load_pixels()[1::2])


def test_registered_and_path_forms(pack):
    assert "emoji" in list_formats()
    a = load_dataset("emoji", emoji.default_path(), "val", lang="fr")
    b = emoji.read(emoji.default_path() / "metadata.json.gz", "val", lang="fr")
    assert a.text_ids == b.text_ids and a.captions == b.captions and a.langs == ["fr"] * 250
    c = emoji.read("emoji", "val", lang="fr,en")
    assert c.num_texts == 500 and set(c.langs) == {"fr", "en"}


# errors --------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, needles", [
    ({"split": "dev"}, ["'dev'", "train, val, test"]),
    ({"lang": "xx"}, ["'xx'", "en-gb", "zh-hant", "all"]),
    ({"lang": "en,xx"}, ["'xx'"]),
    ({"captions": "tags"}, ["'tags'", "label, label+tags, all"]),
    ({"styles": ("apple",)}, ["'apple'", "google, twitter"]),
])
def test_bad_options(kwargs, needles):
    kwargs = {"split": "test", **kwargs}
    with pytest.raises(DataError) as err:
        emoji.read("emoji", **kwargs)
    for needle in needles:
        assert needle in str(err.value)


def test_bad_files(tmp_path):
    with pytest.raises(DataError, match="no emoji metadata"):
        emoji.read(tmp_path, "test")
    with pytest.raises(DataError, match="not an emoji image uri"):
        emoji.open_uri("file:///etc/passwd")
    with pytest.raises(DataError, match="no emoji"):
        emoji.open_uri("emoji://google/ffffff")
    # a corrupt image file is caught by its checksum, not decoded
    root = emoji.default_path()
    shutil.copy(root / "metadata.json.gz", tmp_path / "metadata.json.gz")
    (tmp_path / "images.npy.xz").write_bytes(b"\xfd7zXZ\x00 truncated")
    ds = emoji.read(tmp_path, "test")
    with pytest.raises(DataError, match="checksum"):
        ds.meta["pixels"].load_pixels([0])


def test_build_rejects_tampered_tarball(tmp_path):
    mod = _script()
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        data = b'{"name": "emojibase-data", "version": "17.0.0"}'
        info = tarfile.TarInfo("package/package.json")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    tgz = tmp_path / "emojibase-data-17.0.0.tgz"
    tgz.write_bytes(buf.getvalue())
    with pytest.raises(mod.BuildError, match="integrity mismatch"):
        mod._from_tarball("emojibase-data", tgz)


# rebuild -------------------------------------------------------------------------------
def _have_npm_packages() -> bool:
    return all((NPM_DIR / f"{n}-{v}.tgz").exists() or (NPM_DIR / f"{n}-{v}").is_dir()
               for n, v in (("emoji-datasource-google", "16.0.0"), ("emoji-datasource-twitter", "16.0.0"),
                            ("emojibase-data", "17.0.0")))


@pytest.mark.skipif(not _have_npm_packages(),
                    reason=f"npm packages not in {NPM_DIR} (set XMODAL_EMOJI_NPM_DIR; the test never "
                           "downloads: fetch them once with scripts/build_emoji_dataset.py --npm-dir DIR)")
def test_rebuild_is_deterministic_and_matches_asset(tmp_path, pack):
    mod = _script()
    outs = [tmp_path / "a", tmp_path / "b"]
    for out in outs:
        assert mod.main(["--npm-dir", str(NPM_DIR), "--out", str(out), "--limit", "20",
                         "--test", "4", "--val", "4"]) == 0
    files = sorted(p.relative_to(outs[0]) for p in outs[0].rglob("*") if p.is_file())
    assert {"images.npy.xz", "metadata.json.gz", "ATTRIBUTION.md"} <= {f.name for f in files}
    for rel in files:
        assert (outs[0] / rel).read_bytes() == (outs[1] / rel).read_bytes(), f"{rel} differs between builds"
    # the tiny build agrees with the packaged asset, concept by concept
    tiny = emoji.open_pack(outs[0])
    assert tiny.num_concepts == 20 and tiny.meta["split_sizes"] == {"train": 12, "val": 4, "test": 4}
    index = {u: k for k, u in enumerate(pack.unified)}
    for k, u in enumerate(tiny.unified):
        c = index[u]
        for lang in LANGS:
            assert tiny.meta["text"][lang]["label"][k] == pack.meta["text"][lang]["label"][c]
            assert tiny.meta["text"][lang]["tags"][k] == pack.meta["text"][lang]["tags"][c]
        for style in ("google", "twitter"):
            np.testing.assert_array_equal(tiny.images()[tiny.row(style, u)], pack.images()[pack.row(style, u)])
    ds = emoji.read(outs[0], "train")
    assert ds.num_images == 24 and ds.num_texts == 12
