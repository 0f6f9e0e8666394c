import json

import numpy as np
import pytest
from data_fixtures import write_karpathy

from xmodal.data import load_dataset
from xmodal.data.karpathy import splits
from xmodal.errors import ConfigError, DataError


def test_coco_test_split(tmp_path):
    path = write_karpathy(tmp_path, "coco")
    ds = load_dataset("karpathy", path, "test")
    assert ds.name == "coco" and ds.num_images == 2 and ds.num_texts == 10
    assert ds.image_ids == ["500003", "500004"]
    assert ds.image_paths == ["val2014/COCO_val2014_000000500003.jpg", "val2014/COCO_val2014_000000500004.jpg"]
    assert ds.image_path(0) == tmp_path / "val2014/COCO_val2014_000000500003.jpg"
    assert ds.captions[0] == "A test picture 3 sentence 0."
    data = json.loads(path.read_text())
    assert ds.text_ids == [str(s["sentid"]) for im in data["images"][3:] for s in im["sentences"]]
    np.testing.assert_array_equal(ds.gt.first_image(), [0] * 5 + [1] * 5)


def test_restval_in_train_and_folder_path(tmp_path):
    write_karpathy(tmp_path, "coco")
    ds = load_dataset("karpathy", tmp_path, "train")  # folder with one dataset_*.json
    assert ds.image_ids == ["500000", "500001"]  # train + restval
    assert ds.num_texts == 11  # image 0 has a sixth sentence
    ds = load_dataset("karpathy", tmp_path, "train", restval_in_train=False)
    assert ds.image_ids == ["500000"]
    assert load_dataset("karpathy", tmp_path, "train", restval_in_train="no").image_ids == ["500000"]
    with pytest.raises(ConfigError, match=r"option restval_in_train must be true or false, got 'maybe'"):
        load_dataset("karpathy", tmp_path, "train", restval_in_train="maybe")
    assert load_dataset("karpathy", tmp_path, "restval").image_ids == ["500001"]


def test_max_captions_per_image(tmp_path):
    write_karpathy(tmp_path, "coco")
    ds = load_dataset("karpathy", tmp_path, "train", max_captions_per_image="5")
    assert ds.num_texts == 10
    with pytest.raises(ConfigError, match=r"max_captions_per_image must be an integer >= 1, got 0"):
        load_dataset("karpathy", tmp_path, "train", max_captions_per_image=0)
    np.testing.assert_array_equal(ds.gt.counts(), np.ones(10))


def test_flickr_ids_paths_and_image_root(tmp_path):
    write_karpathy(tmp_path, "flickr30k", splits=("train", "val", "test"))
    images = tmp_path / "flickr30k-images"
    images.mkdir()
    ds = load_dataset("karpathy", tmp_path, "dev", image_root=images)
    assert ds.image_ids == ["1000092796"] and ds.image_paths == ["1000092796.jpg"]
    assert ds.image_path(0) == images / "1000092796.jpg"
    assert splits(tmp_path) == ["test", "train", "val"]


def test_errors(tmp_path):
    path = write_karpathy(tmp_path, "coco")
    with pytest.raises(DataError, match=r"no images in split 'dev2'; splits present: restval, test, train, val"):
        load_dataset("karpathy", path, "dev2")
    data = json.loads(path.read_text())
    del data["images"][3]["sentences"][2]["raw"]
    path.write_text(json.dumps(data))
    with pytest.raises(DataError, match=r"\[images\[3\]\.sentences\[2\]\.raw\]: missing"):
        load_dataset("karpathy", path, "test")
    data["images"][3]["sentences"][2]["raw"] = "  "
    path.write_text(json.dumps(data))
    with pytest.raises(DataError, match=r"\[images\[3\]\.sentences\[2\]\.raw\]: empty sentence"):
        load_dataset("karpathy", path, "test")
    data["images"][3]["sentences"][2]["raw"] = "ok"
    data["images"][4]["cocoid"] = data["images"][3]["cocoid"]
    path.write_text(json.dumps(data))
    with pytest.raises(DataError, match=r"image id '500003' also used by images\[3\]"):
        load_dataset("karpathy", path, "test")
    path.write_text('{"images": [\n{"split": "test",}]}')
    with pytest.raises(DataError, match=r"dataset_coco.json:2: invalid JSON"):
        load_dataset("karpathy", path, "test")
    path.write_text('{"annotations": []}')
    with pytest.raises(DataError, match=r"expected a JSON object with an 'images' list"):
        load_dataset("karpathy", path, "test")
    write_karpathy(tmp_path, "flickr8k")
    with pytest.raises(DataError, match=r"found dataset_coco.json, dataset_flickr8k.json"):
        load_dataset("karpathy", tmp_path, "test")
