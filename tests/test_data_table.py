import json

import numpy as np
import pytest
from data_fixtures import table_rows, write_table

from xmodal.data import load_dataset
from xmodal.data.table import splits
from xmodal.errors import ConfigError, DataError


@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".jsonl", ".parquet"])
def test_formats_agree(tmp_path, suffix):
    path = write_table(tmp_path / f"pairs{suffix}")
    ds = load_dataset("table", path, "train")
    assert ds.name == "pairs" and ds.image_ids == ["imgs/a.jpg", "imgs/b.jpg"]
    assert ds.captions == ["a red bus", "un autobús rojo", "two dogs"]
    assert ds.langs == ["en", "es", "en"] and ds.text_ids == ["0", "1", "2"]
    np.testing.assert_array_equal(ds.gt.first_image(), [0, 0, 1])
    assert ds.image_path(1) == tmp_path / "imgs/b.jpg"
    test = load_dataset("table", path, "test")
    assert test.image_ids == ["imgs/c.jpg", "imgs/d.jpg"] and test.text_ids == ["3", "4", "5"]
    np.testing.assert_array_equal(test.gt.first_image(), [0, 1, 0])
    assert test.filter_lang("en").num_texts == 3
    assert splits(path) == ["test", "train"]


def test_image_id_column_fields_caption_id_and_root(tmp_path):
    rows = [
        {"image_id": "p1", "image": "/abs/one.jpg", "caption": "first", "caption_id": "c1", "fields.title": "T1"},
        {"image_id": "p2", "image": "two.jpg", "caption": "second", "caption_id": "c2", "fields.title": ""},
        {"image_id": "p1", "image": "/abs/one.jpg", "caption": "third", "caption_id": "c3", "fields.title": "T3"},
    ]
    path = write_table(tmp_path / "t.jsonl", rows)
    root = tmp_path / "pics"
    root.mkdir()
    ds = load_dataset("table", tmp_path, "anything", image_root=root)  # folder with one table, no split column
    assert ds.image_ids == ["p1", "p2"] and ds.text_ids == ["c1", "c2", "c3"]
    assert ds.fields == {"title": ["T1", "", "T3"]} and ds.langs is None
    assert str(ds.image_path(0)) == "/abs/one.jpg" and ds.image_path(1) == root / "two.jpg"
    np.testing.assert_array_equal(ds.gt.first_image(), [0, 1, 0])
    assert splits(path) == ["all"]


def test_split_all(tmp_path):
    path = write_table(tmp_path / "t.csv")
    assert load_dataset("table", path, "all").num_texts == 6


def test_errors(tmp_path):
    path = write_table(tmp_path / "t.csv")
    with pytest.raises(DataError, match=r"no rows with split 'val'; splits present: test, train"):
        load_dataset("table", path, "val")
    lines = path.read_text().splitlines()
    path.write_text("\n".join([lines[0], lines[1], "imgs/x.jpg,,train,en", *lines[2:]]) + "\n")
    with pytest.raises(DataError, match=r"t.csv:3 \[caption\]: value is missing"):
        load_dataset("table", path, "train")
    path.write_text("\n".join([lines[0], lines[1], "imgs/x.jpg,a caption,train", *lines[2:]]) + "\n")
    with pytest.raises(DataError, match=r"t.csv:3: expected 4 fields \(as in the header\), got 3"):
        load_dataset("table", path, "train")
    path.write_text("picture,caption\na.jpg,x\n")
    with pytest.raises(DataError, match=r"t.csv: missing column\(s\) image; columns present: picture, caption"):
        load_dataset("table", path, "all")
    rows = table_rows()
    rows[2]["image_id"] = "same"
    rows[0]["image_id"] = "same"
    write_table(path, rows)
    with pytest.raises(DataError, match=r"t.csv:4 \[image\]: image id 'same' has path 'imgs/b.jpg' here but "
                                        r"'imgs/a.jpg' at .*t.csv:2"):
        load_dataset("table", path, "train")
    jl = tmp_path / "j.jsonl"
    jl.write_text(json.dumps({"image": "a.jpg", "caption": "ok"}) + "\n\n" + '{"image": "b.jpg", "caption": 3.5}\n')
    with pytest.raises(DataError, match=r"j.jsonl:3 \[caption\]: expected text, got float"):
        load_dataset("table", jl, "all")
    jl.write_text('{"image": "a.jpg", "caption": "ok"}\n[1, 2]\n')
    with pytest.raises(DataError, match=r"j.jsonl:2: expected a JSON object, got list"):
        load_dataset("table", jl, "all")
    jl.write_text('{"image": "a.jpg", "caption": "ok"}\n{"image": \n')
    with pytest.raises(DataError, match=r"j.jsonl:2: invalid JSON"):
        load_dataset("table", jl, "all")
    pq = write_table(tmp_path / "p.parquet", [{"image": "a.jpg", "caption": "x", "caption_id": "1"},
                                              {"image": "b.jpg", "caption": "y", "caption_id": "1"}])
    with pytest.raises(DataError, match=r"p.parquet \[row 2, caption_id\]: duplicate caption id '1'"):
        load_dataset("table", pq, "all")
    with pytest.raises(DataError, match=r"expected exactly one table file .* found j.jsonl, p.parquet, t.csv"):
        load_dataset("table", tmp_path, "all")
    (tmp_path / "x.xlsx").write_text("")
    with pytest.raises(DataError, match=r"unsupported table type '.xlsx'"):
        load_dataset("table", tmp_path / "x.xlsx", "all")
    with pytest.raises(ConfigError, match=r"unknown option\(s\) root; valid options: image_root"):
        load_dataset("table", pq, "all", root="x")
