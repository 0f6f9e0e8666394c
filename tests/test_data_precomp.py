import numpy as np
import pytest
from data_fixtures import write_precomp

from xmodal.data import load_dataset
from xmodal.data.precomp import splits
from xmodal.errors import ConfigError, DataError


def test_regions_five_captions_per_image(tmp_path):
    ref = write_precomp(tmp_path, "testall", num_images=4, feature_shape=(3, 8))
    ds = load_dataset("precomp", tmp_path, "testall")
    assert ds.num_images == 4 and ds.num_texts == 20
    assert isinstance(ds.image_features, np.memmap)  # memory-mapped, not loaded
    np.testing.assert_array_equal(np.asarray(ds.image_features), ref["features"])
    assert ds.captions == ref["captions"]
    np.testing.assert_array_equal(ds.gt.first_image(), np.arange(20) // 5)
    assert ds.gt.is_one_to_one_per_text()
    assert ds.image_ids == ["0", "1", "2", "3"] and ds.text_ids[6] == "1#1"
    assert ds.meta["caps_per_image"] == 5 and not ds.meta["rows_per_caption"]


def test_pooled_features_and_other_k(tmp_path):
    write_precomp(tmp_path, "train", num_images=3, caps_per_image=2, feature_shape=(6,))
    ds = load_dataset("precomp", tmp_path, "train")
    assert ds.image_features.shape == (3, 6)
    np.testing.assert_array_equal(ds.gt.first_image(), [0, 0, 1, 1, 2, 2])


def test_vsepp_one_row_per_caption_is_strided_view(tmp_path):
    ref = write_precomp(tmp_path, "test", num_images=4, rows_per_caption=True)
    ds = load_dataset("precomp", tmp_path, "test")
    assert ds.num_images == 4 and ds.meta["rows_per_caption"]
    feats = ds.image_features
    row_bytes = 3 * 8 * 4
    assert isinstance(feats, np.memmap) and not feats.flags.owndata  # a view of the map, no copy
    assert feats.strides[0] == 5 * row_bytes
    np.testing.assert_array_equal(np.asarray(feats), ref["features"])
    np.testing.assert_array_equal(ds.gt.first_image(), np.arange(20) // 5)


def test_one_caption_per_image_when_rows_do_not_repeat(tmp_path):
    write_precomp(tmp_path, "test", num_images=6, caps_per_image=1)
    ds = load_dataset("precomp", tmp_path, "test")
    assert ds.num_images == 6 and ds.meta["caps_per_image"] == 1


def test_ids_per_image_and_per_caption(tmp_path):
    ref = write_precomp(tmp_path / "a", "test", ids="image")
    assert load_dataset("precomp", tmp_path / "a", "test").image_ids == ref["image_ids"]
    ref = write_precomp(tmp_path / "b", "test", ids="caption")
    ds = load_dataset("precomp", tmp_path / "b", "test")
    assert ds.image_ids == ref["image_ids"] and ds.text_ids[0] == f"{ref['image_ids'][0]}#0"


def test_val_maps_to_dev_and_splits(tmp_path):
    write_precomp(tmp_path, "dev")
    write_precomp(tmp_path, "testall")
    assert splits(tmp_path) == ["dev", "testall"]
    ds = load_dataset("precomp", tmp_path, "val")
    assert ds.split == "val" and ds.meta["file_split"] == "dev"


def test_caps_per_image_option(tmp_path):
    write_precomp(tmp_path, "test", num_images=4, rows_per_caption=True)
    ds = load_dataset("precomp", tmp_path, "test", caps_per_image=5)
    assert ds.num_images == 4
    with pytest.raises(DataError, match="caps_per_image=3"):
        load_dataset("precomp", tmp_path, "test", caps_per_image=3)
    with pytest.raises(ConfigError, match=r"caps_per_image must be an integer >= 1, got 'five'"):
        load_dataset("precomp", tmp_path, "test", caps_per_image="five")


def test_captions_not_a_multiple(tmp_path):
    write_precomp(tmp_path, "test", num_images=4)
    caps = tmp_path / "test_caps.txt"
    caps.write_text(caps.read_text() + "one more caption\n")
    with pytest.raises(DataError, match=r"test_caps.txt: 21 captions is not a multiple of the 4 images"):
        load_dataset("precomp", tmp_path, "test")


def test_blank_and_non_utf8_caption_lines(tmp_path):
    write_precomp(tmp_path, "test", num_images=2)
    caps = tmp_path / "test_caps.txt"
    lines = caps.read_text().splitlines()
    lines[3] = "   "
    caps.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"test_caps.txt:4: empty caption"):
        load_dataset("precomp", tmp_path, "test")
    lines[3] = "fine"
    caps.write_bytes(("\n".join(lines) + "\n").encode().replace(b"fine", b"f\xffne"))
    with pytest.raises(DataError, match=r"test_caps.txt:4: not UTF-8"):
        load_dataset("precomp", tmp_path, "test")


def test_pickled_or_bad_feature_files(tmp_path):
    write_precomp(tmp_path, "test", num_images=2)
    np.save(tmp_path / "test_ims.npy", np.array([{"a": 1}, {"b": 2}], dtype=object), allow_pickle=True)
    with pytest.raises(DataError, match=r"test_ims.npy: not a plain .npy array"):
        load_dataset("precomp", tmp_path, "test")
    np.save(tmp_path / "test_ims.npy", np.zeros((2, 3, 4, 5), np.float32))
    with pytest.raises(DataError, match=r"expected numeric features of shape"):
        load_dataset("precomp", tmp_path, "test")
    (tmp_path / "test_ims.npy").write_bytes(b"not numpy")
    with pytest.raises(DataError, match=r"test_ims.npy"):
        load_dataset("precomp", tmp_path, "test")


def test_ids_inconsistent_or_wrong_count(tmp_path):
    ref = write_precomp(tmp_path, "test", num_images=2, ids="caption")
    ids = tmp_path / "test_ids.txt"
    lines = ids.read_text().splitlines()
    lines[7] = "999"
    ids.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"test_ids.txt:8: image id '999' differs from '1007'"):
        load_dataset("precomp", tmp_path, "test")
    ids.write_text("\n".join(ref["image_ids"] * 3) + "\n")
    with pytest.raises(DataError, match=r"6 ids, expected one per image \(2\) or per caption \(10\)"):
        load_dataset("precomp", tmp_path, "test")


def test_broken_repeat_layout_detected(tmp_path):
    write_precomp(tmp_path, "test", num_images=4, rows_per_caption=True)
    arr = np.load(tmp_path / "test_ims.npy")
    arr[17] += 1.0  # last image's rows no longer identical
    np.save(tmp_path / "test_ims.npy", arr)
    with pytest.raises(DataError, match=r"rows 15..19 should be one image repeated 5 times"):
        load_dataset("precomp", tmp_path, "test")


def test_missing_split_and_unknown_option(tmp_path):
    write_precomp(tmp_path, "dev")
    with pytest.raises(DataError, match=r"no split 'train'.*splits present: dev"):
        load_dataset("precomp", tmp_path, "train")
    with pytest.raises(ConfigError, match=r"unknown option\(s\) image_root"):
        load_dataset("precomp", tmp_path, "dev", image_root="x")
    with pytest.raises(DataError, match=r"expects a folder"):
        load_dataset("precomp", tmp_path / "dev_caps.txt", "dev")
