import random

import numpy as np
import pytest
from data_fixtures import foodiml_caption, foodiml_rows, write_foodiml_csv, write_foodiml_parquet

from xmodal.data import load_dataset
from xmodal.data.foodiml import duplicate_aware_gt, splits
from xmodal.errors import DataError


def brute_force(captions, paths, hashes):
    """The original compute_valid_answers, O(N^2): same caption or same file, plus same hash."""
    n = len(captions)
    m = np.zeros((n, n), dtype=bool)
    for t in range(n):
        for i in range(n):
            m[t, i] = (captions[i] == captions[t] or paths[i] == paths[t]
                       or (hashes is not None and hashes[t] is not None and hashes[i] == hashes[t]))
    return m


def test_csv_captions_and_duplicate_aware_gt(tmp_path):
    rows = foodiml_rows()
    csv = write_foodiml_csv(tmp_path / "glovo-foodi-ml-dataset.csv", rows)
    ds = load_dataset("foodiml", csv, "test")
    kept = [0, 1, 2, 3, 4, 5, 9]  # row 6 repeats row 5 exactly and is dropped
    assert ds.image_ids == [str(r) for r in kept] == ds.text_ids
    assert ds.captions == [foodiml_caption(rows[r]) for r in kept]
    assert ds.captions[0] == "coca-cola drinks 33cl can"
    assert ds.captions[2] == "pepsi drinks "  # missing description, as the original preprocessing
    assert ds.fields["product_name"][0] == "Coca-Cola"
    assert ds.image_paths[0] == "dataset/ES/a.jpg" and ds.root == tmp_path
    assert ds.image_hashes == ["h1", "h2", "h1", "h3", "h3", "h4", "h7"]
    assert ds.meta["country_code"][-1] == "IT"
    expected = {0: {0, 1, 2}, 1: {0, 1}, 2: {0, 2}, 3: {3, 4}, 4: {3, 4}, 5: {5}, 6: {6}}
    assert {t: set(ds.gt.images_of(t).tolist()) for t in range(7)} == expected
    np.testing.assert_array_equal(ds.gt.dense(), brute_force(ds.captions, ds.image_paths, ds.image_hashes))


def test_keep_duplicates_and_dev_alias(tmp_path):
    csv = write_foodiml_csv(tmp_path / "f.csv", pandas_index=True)
    ds = load_dataset("foodiml", csv, "test", drop_duplicates=False)
    assert ds.num_texts == 8 and set(ds.gt.images_of(5).tolist()) == {5, 6}
    assert load_dataset("foodiml", tmp_path, "dev").image_ids == ["8"]  # folder with one CSV; dev -> val
    assert splits(csv) == ["test", "train", "val"]


def test_random_against_brute_force(tmp_path):
    rng = random.Random(0)
    rows = []
    for n in range(300):
        rows.append({"country_code": "ES", "city_code": "X", "store_name": "S", "HIER": "True", "subset": "test",
                     "product_name": rng.choice(["tea", "coffee", "milk", "bread", "jam"]),
                     "collection_section": rng.choice(["drinks", "bakery"]),
                     "product_description": rng.choice(["", "hot", "cold"]),
                     "s3_path": f"dataset/{rng.randrange(120)}.jpg",
                     "hash": rng.choice(["", f"h{rng.randrange(80)}"])})
    csv = write_foodiml_csv(tmp_path / "f.csv", rows)
    ds = load_dataset("foodiml", csv, "test", drop_duplicates=False)
    hashes = [r["hash"] or None for r in rows]
    np.testing.assert_array_equal(ds.gt.dense(), brute_force(ds.captions, ds.image_paths, hashes))
    assert ds.image_hashes is None  # some rows have no hash


def test_parquet_samples_folder(tmp_path):
    rows = foodiml_rows()
    write_foodiml_parquet(tmp_path, rows)
    ds = load_dataset("foodiml", tmp_path, "test")  # finds samples/split=test
    test_rows = [n for n, r in enumerate(rows) if r["subset"] == "test"]
    assert sorted(ds.image_ids, key=int) == [str(n) for n in test_rows]
    assert ds.root == tmp_path and ds.fields is None
    np.testing.assert_array_equal(ds.gt.dense(), brute_force(ds.captions, ds.image_paths, ds.image_hashes))
    assert splits(tmp_path / "samples") == ["test", "train", "val"]


def test_hash_files_matches_identical_images(tmp_path):
    rows = foodiml_rows()
    csv = write_foodiml_csv(tmp_path / "f.csv", rows, with_hash=False)
    for r in rows:
        p = tmp_path / r["s3_path"]
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"same picture" if p.name in ("a.jpg", "e.jpg") else p.name.encode())
    plain = load_dataset("foodiml", csv, "test")
    assert plain.image_hashes is None and 5 not in plain.gt.images_of(0)
    hashed = load_dataset("foodiml", csv, "test", hash_files=True)
    assert 5 in hashed.gt.images_of(0) and 0 in hashed.gt.images_of(5)  # a.jpg and e.jpg share bytes
    assert hashed.image_hashes[0] == hashed.image_hashes[5]


def test_duplicate_aware_gt_none_keys_never_match():
    gt = duplicate_aware_gt(["a", "b", "c"], np.arange(3), [["p1", "p2", "p3"], [None, None, "h"]], 3)
    np.testing.assert_array_equal(gt.dense(), np.eye(3, dtype=bool))


def test_errors(tmp_path):
    rows = foodiml_rows()
    csv = write_foodiml_csv(tmp_path / "f.csv", rows)
    with pytest.raises(DataError, match=r"no rows with subset 'testing'; subsets present: test, train, val"):
        load_dataset("foodiml", csv, "testing")
    text = csv.read_text().replace(",subset,", ",part,")
    csv.write_text(text)
    with pytest.raises(DataError, match=r"f.csv: missing column\(s\) subset"):
        load_dataset("foodiml", csv, "test")
    rows[3]["product_name"] = ""
    write_foodiml_csv(csv, rows)
    with pytest.raises(DataError, match=r"f.csv: data row 4 \[product_name\]: value is missing"):
        load_dataset("foodiml", csv, "test")
    csv.write_text(csv.read_text() + "ES,BCN,only,three\n")
    with pytest.raises(DataError, match=r"f.csv: malformed CSV"):
        load_dataset("foodiml", csv, "test")
    (tmp_path / "f.txt").write_text("x")
    with pytest.raises(DataError, match=r"f.txt: expected the FooDI-ML .csv"):
        load_dataset("foodiml", tmp_path / "f.txt", "test")
    rows = foodiml_rows()
    for r in rows:
        r["subset"] = "test"
    rows[1]["s3_path"] = ""
    write_foodiml_parquet(tmp_path / "pq", rows)
    with pytest.raises(DataError, match=r"samples: row \d+ of split 'test' \[s3_path\]: value is missing"):
        load_dataset("foodiml", tmp_path / "pq", "test")
