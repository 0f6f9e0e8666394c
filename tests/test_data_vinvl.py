import pickle

import numpy as np
import pytest
from data_fixtures import vinvl_row, write_vinvl

from xmodal.data import load_dataset
from xmodal.data.vinvl import TsvRegionFeatures, splits
from xmodal.errors import DataError

D, B = 16, 6


def _padded(arr: np.ndarray, r: int, lo: int, hi: int) -> np.ndarray:
    out = np.zeros((r, hi - lo), np.float32)
    n = min(len(arr), r)
    out[:n] = arr[:n, lo:hi]
    return out


@pytest.mark.parametrize("lineidx,imageid2idx,json_column", [
    (True, True, False), (True, False, False), (False, False, False), (False, False, True)])
def test_features_lazy_and_exact(tmp_path, lineidx, imageid2idx, json_column):
    ref = write_vinvl(tmp_path, lineidx=lineidx, imageid2idx=imageid2idx, json_column=json_column)
    ds = load_dataset("vinvl", tmp_path, "test", max_regions=4, feature_dim=D)
    feats = ds.image_features
    assert isinstance(feats, TsvRegionFeatures)
    assert feats.shape == (4, 4, D) and len(feats) == 4 and ds.image_boxes.shape == (4, 4, B)
    assert ds.image_ids == ref["keys"]
    for i, key in enumerate(ref["keys"]):
        arr = ref["arrays"][key]
        np.testing.assert_array_equal(feats[i], _padded(arr, 4, 0, D))  # key 522418 (5 boxes) is truncated
        np.testing.assert_array_equal(ds.image_boxes[i], _padded(arr, 4, D, D + B))
        np.testing.assert_array_equal(feats.regions(i), arr[:, :D])  # unpadded, untruncated
    batch = feats[np.array([2, 0])]
    assert batch.shape == (2, 4, D) and batch.dtype == np.float32
    np.testing.assert_array_equal(batch[1], feats[0])
    np.testing.assert_array_equal(feats[1:3], np.stack([feats[1], feats[2]]))
    np.testing.assert_array_equal(feats[-1], feats[3])
    np.testing.assert_array_equal(feats[0, :2], feats[0][:2])
    np.testing.assert_array_equal(np.asarray(feats)[2], feats[2])


def test_captions_and_ground_truth(tmp_path):
    ref = write_vinvl(tmp_path, caps_per_image=3)
    ds = load_dataset("vinvl", tmp_path, "test", feature_dim=D)
    assert ds.num_texts == 12
    assert ds.captions[:3] == ref["captions"]["391895"]
    assert ds.text_ids[4] == "522418#1"
    np.testing.assert_array_equal(ds.gt.first_image(), np.arange(12) // 3)


@pytest.mark.parametrize("fmt", ["coco", "list", "tsv"])
def test_caption_file_variants(tmp_path, fmt):
    ref = write_vinvl(tmp_path, captions=fmt)
    ds = load_dataset("vinvl", tmp_path, "test", feature_dim=D)
    assert ds.captions == [c for k in ref["keys"] for c in ref["captions"][k]]
    if fmt == "coco":
        assert ds.text_ids[:2] == ["3918950", "3918951"]
    else:
        assert ds.text_ids[:2] == ["391895#0", "391895#1"]


def test_img_keys_select_and_order_images(tmp_path):
    write_vinvl(tmp_path, img_keys=("184613", "391895"))
    ds = load_dataset("vinvl", tmp_path, "test", feature_dim=D)
    assert ds.image_ids == ["184613", "391895"] and ds.num_texts == 4
    write_vinvl(tmp_path / "b")
    (tmp_path / "b" / "test_img_keys_1k.tsv").write_text("522418\n")
    ds = load_dataset("vinvl", tmp_path / "b", "test", img_keys="test_img_keys_1k.tsv", feature_dim=D)
    assert ds.image_ids == ["522418"]


def test_tsv_path_and_features_option_and_splits(tmp_path):
    write_vinvl(tmp_path / "feat")
    ds = load_dataset("vinvl", tmp_path / "feat" / "features.tsv", "test", feature_dim=D)
    assert ds.num_images == 4
    data = tmp_path / "coco_ir"
    write_vinvl(data)
    (data / "features.tsv").rename(data / "feats.tsv")
    (data / "features.lineidx").rename(data / "feats.lineidx")
    ds = load_dataset("vinvl", data, "test", features="feats.tsv", feature_dim=D)
    assert ds.meta["features"].endswith("feats.tsv")
    (data / "minival_captions.pt").write_bytes(b"")
    assert splits(data) == ["minival", "test"]


def test_select_images_and_pickle(tmp_path):
    ref = write_vinvl(tmp_path)
    ds = load_dataset("vinvl", tmp_path, "test", feature_dim=D)
    sub = ds.image_features.subset([3, 1])
    assert isinstance(sub, TsvRegionFeatures) and sub.keys == ["318219", "522418"]
    np.testing.assert_array_equal(sub[0], ds.image_features[3])
    picked = ds.select_images([2])
    assert picked.image_ids == ["184613"] and picked.num_texts == 2
    np.testing.assert_array_equal(picked.image_features[0], ds.image_features[2])
    clone = pickle.loads(pickle.dumps(ds.image_features))
    np.testing.assert_array_equal(clone[2], _padded(ref["arrays"]["184613"], 50, 0, D))


def test_pickle_captions_refused(tmp_path):
    write_vinvl(tmp_path, captions="none")
    (tmp_path / "test_captions.pt").write_bytes(pickle.dumps({1: ["x"]}))
    with pytest.raises(DataError, match=r"test_captions.pt: .*pickles and are not loaded"):
        load_dataset("vinvl", tmp_path, "test")


def test_malformed_rows(tmp_path):
    write_vinvl(tmp_path, lineidx=False, imageid2idx=False)
    tsv = tmp_path / "features.tsv"
    lines = tsv.read_text().splitlines()
    good = lines[2]
    lines[2] = good.rsplit("\t", 1)[0] + "\t###notbase64###"
    tsv.write_text("\n".join(lines) + "\n")
    ds = load_dataset("vinvl", tmp_path, "test", feature_dim=D)  # rows decode lazily
    with pytest.raises(DataError, match=r"features.tsv:3: features of key '522418' are not valid base64"):
        ds.image_features[1]
    lines[2] = good.split("\t")[0] + "\t7\t" + good.split("\t")[2]
    tsv.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"features.tsv:3: key '522418': 110 values do not split into 7 boxes"):
        load_dataset("vinvl", tmp_path, "test", feature_dim=D).image_features[1]
    lines[2] = vinvl_row("522418", np.zeros((2, D + 3), np.float32))
    tsv.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"features.tsv:3: key '522418' has 19 values per box, other rows have 22"):
        load_dataset("vinvl", tmp_path, "test", feature_dim=D).image_features[1]
    lines[2] = "522418"
    tsv.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"features.tsv:3: expected 'key<TAB>num_boxes<TAB>base64'"):
        load_dataset("vinvl", tmp_path, "test", feature_dim=D).image_features[1]
    lines[2] = lines[1]
    tsv.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"features.tsv:3: image key '391895' repeats line 2"):
        load_dataset("vinvl", tmp_path, "test")
    lines[2] = good
    tsv.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"fewer than feature_dim=2048"):
        load_dataset("vinvl", tmp_path, "test")


def test_stale_index_and_missing_keys(tmp_path):
    write_vinvl(tmp_path)
    (tmp_path / "imageid2idx.json").write_text('{"391895": 2, "522418": 1, "184613": 3, "318219": 4}')
    ds = load_dataset("vinvl", tmp_path, "test", feature_dim=D)
    with pytest.raises(DataError, match=r"features.tsv:3: expected image key '391895', found '522418'"):
        ds.image_features[0]
    (tmp_path / "imageid2idx.json").write_text('{"391895": 9}')
    with pytest.raises(DataError, match=r"imageid2idx.json \[391895\]: row 9 is not a line"):
        load_dataset("vinvl", tmp_path, "test", feature_dim=D)
    (tmp_path / "imageid2idx.json").unlink()
    (tmp_path / "features.lineidx").write_text("0\nabc\n")
    with pytest.raises(DataError, match=r"features.lineidx:2: expected a byte offset"):
        load_dataset("vinvl", tmp_path, "test", feature_dim=D)
    (tmp_path / "features.lineidx").unlink()
    (tmp_path / "test_img_keys.tsv").write_text("391895\n391895\n")
    with pytest.raises(DataError, match=r"test_img_keys.tsv:2: image key '391895' is listed twice"):
        load_dataset("vinvl", tmp_path, "test", feature_dim=D)
    (tmp_path / "test_img_keys.tsv").write_text("391895\n777\n")
    with pytest.raises(DataError, match=r"test_img_keys.tsv:2: image key '777' has no captions"):
        load_dataset("vinvl", tmp_path, "test", feature_dim=D)
    (tmp_path / "test_img_keys.tsv").unlink()
    (tmp_path / "test_captions.json").write_text('{"391895": ["a"], "555": ["b"]}')
    with pytest.raises(DataError, match=r"test_captions.json \[555\]: image key '555' is not in"):
        load_dataset("vinvl", tmp_path, "test", feature_dim=D)
    (tmp_path / "test_captions.json").write_text('{"391895": ["a", ""]}')
    with pytest.raises(DataError, match=r"\[391895\[1\]\]: expected a non-empty caption"):
        load_dataset("vinvl", tmp_path, "test", feature_dim=D)
    with pytest.raises(DataError, match=r"no captions for split 'train'.*splits present: test"):
        load_dataset("vinvl", tmp_path, "train")


def test_image_without_boxes_is_all_padding(tmp_path):
    write_vinvl(tmp_path, extra_rows=0, lineidx=False, imageid2idx=False)
    tsv = tmp_path / "features.tsv"
    lines = tsv.read_text().splitlines()
    lines[0] = vinvl_row("391895", np.zeros((0, D + B), np.float32))  # the first image has no boxes
    tsv.write_text("\n".join(lines) + "\n")
    ds = load_dataset("vinvl", tmp_path, "test", feature_dim=D, max_regions=3)
    assert ds.image_boxes.shape == (4, 3, B)  # width taken from the next image with boxes
    assert not ds.image_features[0].any() and ds.image_features.regions(0).shape == (0, D)
    assert ds.image_features[1].any()
