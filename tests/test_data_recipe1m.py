import json
import logging

import pytest
from data_fixtures import write_recipe1m

from xmodal.data import load_dataset
from xmodal.data.recipe1m import image_relpath, splits
from xmodal.errors import DataError


def test_test_partition(tmp_path, caplog):
    write_recipe1m(tmp_path)
    with caplog.at_level(logging.INFO, logger="xmodal.data.recipe1m"):
        ds = load_dataset("recipe1m", tmp_path, "test")
    assert "dropped 1 recipes without images" in caplog.text  # Gazpacho
    assert ds.text_ids == ["000018c8a5", "000033e39b", "00003a70b1"]
    assert ds.captions == ["Worlds Best Mac and Cheese", "Dilly Macaroni Salad", "Crunchy Onion Potato Bake"]
    assert ds.fields["title"] == ds.captions
    assert ds.fields["ingredients"][0] == "6 ounces penne\n2 cups milk"
    assert ds.fields["instructions"][2] == "Mix.\nBake 30 min."
    assert ds.image_ids == ["3e233001e2.jpg", "7f749987f9.jpg", "5d3f8e0a7b.jpg", "ef3dc0de11.jpg"]
    assert ds.image_paths[3] == "test/e/f/3/d/ef3dc0de11.jpg"
    assert ds.image_path(3) == tmp_path / "test/e/f/3/d/ef3dc0de11.jpg"
    assert [ds.gt.images_of(t).tolist() for t in range(3)] == [[0, 1], [2], [3]]
    assert ds.meta["dropped_without_images"] == 1


def test_first_image_only_val_alias_and_image_root(tmp_path):
    write_recipe1m(tmp_path)
    ds = load_dataset("recipe1m", tmp_path / "layer1.json", "test", first_image_only=True)
    assert ds.num_images == 3 and ds.gt.is_one_to_one_per_text()
    images = tmp_path / "images"
    images.mkdir()
    ds = load_dataset("recipe1m", tmp_path, "dev", image_root=images)
    assert ds.image_path(0) == images / "val/0/f/1/e/0f1e2d3c4b.jpg"
    assert image_relpath("train", "a1b2c3d4e5.jpg") == "train/a/1/b/2/a1b2c3d4e5.jpg"
    assert splits(tmp_path) == ["test", "train", "val"]


def test_layer2_plus_and_shared_image(tmp_path):
    ref = write_recipe1m(tmp_path)
    layer2 = [{"id": "000033e39b", "images": [{"id": "3e233001e2.jpg"}]},  # same picture as recipe 0
              {"id": "000018c8a5", "images": [{"id": "3e233001e2.jpg"}]}]
    (tmp_path / "layer2+.json").write_text(json.dumps(layer2))
    ds = load_dataset("recipe1m", tmp_path, "test", layer2="layer2+.json")
    assert ds.image_ids == ["3e233001e2.jpg"] and ds.num_texts == 2
    assert ds.gt.transpose().images_of(0).tolist() == [0, 1]  # one image, both recipes
    assert len(ref["layer1"]) == 6


def test_errors(tmp_path):
    ref = write_recipe1m(tmp_path)
    with pytest.raises(DataError, match=r"no recipes with images in partition 'tes'; "
                                        r"partitions present: test, train, val"):
        load_dataset("recipe1m", tmp_path, "tes")
    layer1 = ref["layer1"]
    layer1[1]["ingredients"][0] = {"txt": "oops"}
    (tmp_path / "layer1.json").write_text(json.dumps(layer1))
    with pytest.raises(DataError, match=r"layer1.json \[\[1\]\.ingredients\[0\]\.text\]: expected a string"):
        load_dataset("recipe1m", tmp_path, "test")
    layer1[1]["ingredients"] = "1 cup macaroni"
    (tmp_path / "layer1.json").write_text(json.dumps(layer1))
    with pytest.raises(DataError, match=r"\[\[1\]\.ingredients\]: expected a list"):
        load_dataset("recipe1m", tmp_path, "test")
    del layer1[0]["partition"]
    (tmp_path / "layer1.json").write_text(json.dumps(layer1))
    with pytest.raises(DataError, match=r"\[\[0\]\.partition\]: expected 'train', 'val' or 'test'"):
        load_dataset("recipe1m", tmp_path, "test")
    (tmp_path / "layer2.json").write_text(json.dumps([{"id": "000018c8a5", "images": [{"id": 5}]}]))
    with pytest.raises(DataError, match=r"layer2.json \[\[0\]\.images\[0\]\.id\]: expected an image file name"):
        load_dataset("recipe1m", tmp_path, "test")
    (tmp_path / "layer2.json").write_text('{"id": 1}')
    with pytest.raises(DataError, match=r"layer2.json: expected a JSON list"):
        load_dataset("recipe1m", tmp_path, "test")
    (tmp_path / "layer2.json").unlink()
    with pytest.raises(DataError, match=r"layer2.json: not found"):
        load_dataset("recipe1m", tmp_path, "test")
