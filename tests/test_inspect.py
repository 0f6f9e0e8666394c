"""``xmodal inspect``: the streamed reports (FooDI-ML CSV, table files) equal the reports built
from the readers' datasets, block boundaries included; duplicate-aware positives by
inclusion-exclusion equal the reader's ground truth on random data; the CLI prints a table,
JSON, and one-line errors; the benchmark's dry run runs."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from data_fixtures import write_foodiml_csv, write_karpathy, write_table
from image_fixtures import write_ok
from xmodal.cli import main
from xmodal.data import load_dataset
from xmodal.data import inspect as insp
from xmodal.data.inspect import dataset_stats, distribution, inspect_dataset

ROOT = Path(__file__).resolve().parents[1]


def _generic(fmt: str, path: Path, splits: list[str], **options) -> dict:
    return {s: dataset_stats(load_dataset(fmt, path, s, **options)) for s in splits}


def _same(streamed: dict, generic: dict) -> None:
    """Every measure the reader-based report has, the streamed one has with the same value."""
    assert sorted(streamed) == sorted(generic)
    for split, g in generic.items():
        for key, value in g.items():
            if key == "duplicates":
                assert {k: streamed[split][key][k] for k in value} == value, split
            else:
                assert streamed[split][key] == value, (split, key)


@pytest.fixture
def small_blocks(monkeypatch):
    """Blocks of a few rows, so every report is merged over many blocks."""
    monkeypatch.setattr(insp, "CSV_BLOCK_BYTES", 512)
    monkeypatch.setattr(insp, "BLOCK_ROWS", 2)


@pytest.mark.parametrize("with_hash, pandas_index", [(True, False), (False, False), (True, True)])
def test_foodiml_stream_equals_reader(tmp_path, small_blocks, with_hash, pandas_index):
    path = write_foodiml_csv(tmp_path / "f.csv", with_hash=with_hash, pandas_index=pandas_index)
    (tmp_path / "dataset" / "ES").mkdir(parents=True)
    write_ok(tmp_path / "dataset" / "ES" / "a.jpg")  # one file exists, the rest are missing
    report = inspect_dataset("foodiml", path, progress=False)
    assert report["streamed"] and report["rows"] == 10 and report["duplicate_rows_dropped"] == 1
    _same(report["splits"], _generic("foodiml", path, ["test", "train", "val"]))
    test = report["splits"]["test"]
    assert test["missing_files"] == 5 and test["image_files"] == 6 and test["countries"] == {"ES": 6, "IT": 1}
    assert test["positives_per_text"]["max"] == (3 if with_hash else 2)

    kept = inspect_dataset("foodiml", path, options={"drop_duplicates": False}, progress=False)
    assert kept["duplicate_rows_dropped"] == 0 and kept["splits"]["test"]["images"] == 8
    _same(kept["splits"], _generic("foodiml", path, ["test", "train", "val"], drop_duplicates=False))


def test_foodiml_positives_match_the_reader_on_random_rows(tmp_path, small_blocks):
    rng = np.random.default_rng(0)
    rows = []
    for _ in range(400):  # few names, files and hashes: many overlapping duplicate groups
        rows.append({"country_code": "ES", "city_code": "B", "store_name": "s", "HIER": "x",
                     "product_name": f"p{rng.integers(12)}", "collection_section": rng.choice(["A", "a", "B"]),
                     "product_description": rng.choice(["", "d1", "D1", "d2"]),
                     "subset": rng.choice(["train", "test"], p=[0.3, 0.7]),
                     "s3_path": f"img/{rng.integers(60)}.jpg", "hash": rng.choice(["", "h1", "h2", "h3", "h4"])})
    path = write_foodiml_csv(tmp_path / "r.csv", rows)
    report = inspect_dataset("foodiml", path, progress=False, check_files=False)
    for split in ("train", "test"):
        ds = load_dataset("foodiml", path, split)
        assert report["splits"][split]["positive_pairs"] == ds.gt.nnz
        assert report["splits"][split]["positives_per_text"] == distribution(ds.gt.counts())
    assert report["duplicate_rows_dropped"] == 400 - sum(len(load_dataset("foodiml", path, s).text_ids)
                                                        for s in ("train", "test"))


@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".jsonl", ".parquet"])
def test_table_stream_equals_reader(tmp_path, small_blocks, suffix):
    rows = [dict(r) for r in (
        {"image": "imgs/a.jpg", "caption": "a red bus", "split": "train", "lang": "en"},
        {"image": "imgs/a.jpg", "caption": "a red bus", "split": "train", "lang": "en"},   # same pair again
        {"image": "imgs/b.jpg", "caption": "a red bus", "split": "train", "lang": "es"},  # same caption
        {"image": "imgs/c.jpg", "caption": "a cat", "split": "test", "lang": "en"},
        {"image": "imgs/c.jpg", "caption": "a cat on a sofa", "split": "test", "lang": "fr"},
        {"image": "imgs/d.jpg", "caption": "a bird", "split": "test", "lang": "en"})]
    for k, r in enumerate(rows):
        r["caption_id"] = f"c{k}"
    path = write_table(tmp_path / f"pairs{suffix}", rows)
    (tmp_path / "imgs").mkdir()
    write_ok(tmp_path / "imgs" / "a.jpg")
    report = inspect_dataset("table", path, progress=False)
    _same(report["splits"], _generic("table", path, ["test", "train"]))
    train = report["splits"]["train"]
    assert train["duplicates"] == {"captions": 2, "image_files": 0, "pairs": 1}
    assert train["missing_files"] == 1 and train["languages"] == {"en": 2, "es": 1}
    assert train["captions_per_image"]["histogram"] == {"1": 1, "2": 1}


def test_table_without_split_column_and_image_ids(tmp_path, small_blocks):
    rows = [{"image": "x.jpg", "caption": "one", "image_id": "A"}, {"image": "x.jpg", "caption": "two", "image_id": "B"},
            {"image": "y.jpg", "caption": "three", "image_id": "A"}]
    path = write_table(tmp_path / "t.csv", rows[:2])
    report = inspect_dataset("table", path, progress=False, check_files=False)
    assert list(report["splits"]) == ["all"] and report["splits"]["all"]["duplicates"]["image_files"] == 1
    _same({"all": {k: v for k, v in report["splits"]["all"].items()}},
          {"all": {**dataset_stats(load_dataset("table", path, "all")), "missing_files": None}})
    assert report["splits"]["all"]["missing_files"] is None


def test_formats_read_with_their_reader(tmp_path):
    path = write_karpathy(tmp_path, "flickr30k", splits=("train", "val", "test"), extra_caption_on=None)
    report = inspect_dataset("karpathy", path, progress=False)
    assert not report["streamed"] and sorted(report["splits"]) == ["test", "train", "val"]
    test = report["splits"]["test"]
    assert (test["images"], test["texts"], test["missing_files"]) == (2, 10, 2)
    assert test["captions_per_image"]["histogram"] == {"5": 2}
    only = inspect_dataset("karpathy", path, splits=["val"], check_files=False)
    assert list(only["splits"]) == ["val"] and only["splits"]["val"]["missing_files"] is None
    emoji = inspect_dataset("emoji", "emoji", splits=["val"])["splits"]["val"]  # fixed SPLITS, pixels
    assert (emoji["images"], emoji["texts"], emoji["missing_files"]) == (500, 250, None)
    assert emoji["positives_per_text"]["histogram"] == {"2": 250}


def test_cli_table_json_and_errors(tmp_path, capsys):
    path = write_foodiml_csv(tmp_path / "f.csv")
    assert main(["inspect", "--format", "foodiml", "--path", str(path), "--no-progress"]) == 0
    out = capsys.readouterr().out
    for label in ("positives per text", "countries", "missing image files", "duplicate image hashes", "test"):
        assert label in out
    assert main(["inspect", "--format", "foodiml", "--path", str(path), "--json", "--split", "val"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert list(report["splits"]) == ["val"] and report["splits"]["val"]["images"] == 1

    bad = tmp_path / "bad.csv"
    bad.write_text("product_name,subset\nx,test\n")
    assert main(["inspect", "--format", "foodiml", "--path", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("xmodal inspect: error: ") and "missing column(s) collection_section, s3_path" in err
    assert "\n" not in err
    assert main(["inspect", "--format", "foodiml", "--path", str(path), "--split", "nope"]) == 2
    assert "no split 'nope'; splits present: test, train, val" in capsys.readouterr().err


def test_inspect_benchmark_dry_run(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("inspect_foodiml_bench", ROOT / "benchmarks" / "inspect_foodiml.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "r.json"
    assert bench.main(["--dry-run", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["rows"] == 3000 and res["same_report"] is True
    assert res["ratio_reader_over_stream"]["peak_rss_mb"] > 0
