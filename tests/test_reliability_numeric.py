"""Bad numeric and text input gives one clear :class:`XmodalError` naming the file, line, row or side.

One test per case of the reliability issue (index, evaluation, readers); the property-based
versions are in ``tests/test_fuzz_inputs.py``.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from data_fixtures import write_precomp

from xmodal.cli import main
from xmodal.data import load_dataset
from xmodal.data import precomp
from xmodal.data.translations import TranslationRow, read_translations, write_translations
from xmodal.errors import DataError, XmodalError
from xmodal.eval.metrics import as_ground_truth, ranks_from_embeddings
from xmodal.eval.pairs import two_stage_ranks
from xmodal.eval.protocols import evaluate_embeddings
from xmodal.index import Index


def resign(folder: Path, name: str) -> None:
    """Record ``name``'s new size and sha256 in the manifest (so only content checks can tell)."""
    m = json.loads((folder / "manifest.json").read_text())
    data = (folder / name).read_bytes()
    m["files"][name] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (folder / "manifest.json").write_text(json.dumps(m))


def unit(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


# ---------------------------------------------------------------------------------------------
# index


def small_index(path: Path, n: int = 5, d: int = 4, **kw) -> Index:
    with Index.create(path, d, **kw) as ix:
        ix.add(unit(np.random.default_rng(0), n, d), [f"id{i}" for i in range(n)],
               [{"path": f"{i}.jpg"} for i in range(n)])
    return ix


def test_index_add_refuses_nan_duplicates_and_names_the_row(tmp_path):
    ix = Index.create(tmp_path / "i", 4)
    x = unit(np.random.default_rng(0), 3, 4)
    x[2, 1] = np.nan
    with pytest.raises(DataError, match=r"vector 2 \(id 'c'\) has NaN or infinite values"):
        ix.add(x, ["a", "b", "c"])
    ix.add(x[:2], ["a", "b"])
    with pytest.raises(DataError, match=r"duplicate id 'b' \(row 1\)"):
        ix.add(x[:1], ["b"])
    with pytest.raises(DataError, match=r"duplicate id 'z'"):
        ix.add(x[:2], ["z", "z"])


def test_index_add_too_large_for_float32_says_float32(tmp_path):
    ix = Index.create(tmp_path / "i", 4)
    with pytest.raises(DataError, match=r"vector 0 \(id 'a'\).*too large for float32 storage"):
        ix.add(np.full((1, 4), 1e300), ["a"])


@pytest.mark.parametrize("backend", ["exact", "flat"])
@pytest.mark.parametrize("metric", ["ip", "l2"])
def test_index_search_refuses_overflowing_scores(tmp_path, backend, metric):
    with Index.create(tmp_path / "i", 4, backend=backend, metric=metric) as ix:
        ix.add(np.full((3, 4), 1e20, np.float32), ["a", "b", "c"])
    ix = Index.open(tmp_path / "i")
    with pytest.raises(XmodalError, match=r"query 0 (scores row \d \(id '[abc]'\).*not finite|has no finite "
                                          r"score for \d of its top \d rows).*score overflows float32"):
        ix.search(np.full((1, 4), 1e20 if metric == "ip" else -1e20, np.float32), 2)
    if metric == "ip":  # a query whose scores stay in range still works
        scores, rows = ix.search(np.full((1, 4), 1e-30, np.float32), 3)
        assert np.isfinite(scores).all() and sorted(rows[0]) == [0, 1, 2]


def test_index_search_refuses_nonfinite_vector_on_disk(tmp_path):
    path = tmp_path / "i"
    small_index(path)
    x = np.load(path / "vectors.npy")
    x[3, 0] = np.nan
    np.save(path / "vectors.npy", x)
    resign(path, "vectors.npy")
    ix = Index.open(path)
    with pytest.raises(DataError, match=r"vectors\.npy: row 3 \(id 'id3'\) has NaN or infinite values"):
        ix.search(unit(np.random.default_rng(1), 2, 4), 2)


def test_index_refuses_nonfinite_query(tmp_path):
    ix = small_index(tmp_path / "i")
    q = unit(np.random.default_rng(1), 2, 4)
    q[1, 2] = -np.inf
    with pytest.raises(XmodalError, match="query 1 has NaN or infinite values"):
        ix.search(q, 2)


def test_index_open_refuses_duplicate_ids_on_disk(tmp_path):
    path = tmp_path / "i"
    small_index(path)
    (path / "ids.jsonl").write_text('"id0"\n"id1"\n"id2"\n"id1"\n"id4"\n')
    resign(path, "ids.jsonl")
    with pytest.raises(DataError, match=r"ids\.jsonl:4: duplicate id 'id1' \(also on line 2\)"):
        Index.open(path)


@pytest.mark.parametrize("line, message", [
    ("{not json", r"metadata\.jsonl:3: invalid JSON: Expecting property name .*\(column 2\)"),
    ("[1, 2]", r"metadata\.jsonl:3: expected a JSON object, got list"),
    ('"text"', r"metadata\.jsonl:3: expected a JSON object, got str"),
])
def test_index_metadata_line_not_an_object_names_file_and_line(tmp_path, line, message):
    path = tmp_path / "i"
    small_index(path)
    lines = (path / "metadata.jsonl").read_text().splitlines()
    lines[2] = line
    (path / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    resign(path, "metadata.jsonl")
    ix = Index.open(path)  # rows are parsed when read (xmodal serve reads them all at start-up)
    assert ix.metadata(1) == {"path": "1.jpg"}
    with pytest.raises(DataError, match=message):
        ix.metadata(2)
    with pytest.raises(DataError, match=message):
        ix.metadata(np.arange(5))


def test_index_metadata_not_utf8_names_line(tmp_path):
    path = tmp_path / "i"
    small_index(path)
    data = (path / "metadata.jsonl").read_bytes().split(b"\n")
    data[1] = b'{"path": "\xff"}'
    (path / "metadata.jsonl").write_bytes(b"\n".join(data))
    resign(path, "metadata.jsonl")
    with pytest.raises(DataError, match=r"metadata\.jsonl:2: not UTF-8"):
        Index.open(path).metadata(1)


# ---------------------------------------------------------------------------------------------
# evaluation


def test_evaluate_refuses_nonfinite_embeddings_naming_side_and_row():
    img = np.ones((4, 3), np.float32)
    txt = np.ones((8, 3), np.float32)
    txt[5, 1] = np.inf
    with pytest.raises(DataError, match=r"text embeddings: row 5 contains NaN or inf"):
        evaluate_embeddings(img, txt, np.arange(8) // 2)
    img[2, 0] = np.nan
    with pytest.raises(DataError, match=r"image embeddings: row 2 contains NaN or inf"):
        evaluate_embeddings(img, np.ones((8, 3), np.float32), np.arange(8) // 2)


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_evaluate_refuses_overflowing_scores(dtype):
    rng = np.random.default_rng(0)
    img = (rng.standard_normal((50, 16)) * 1e20).astype(np.float32)
    txt = (rng.standard_normal((250, 16)) * 1e20).astype(np.float32)
    with pytest.raises(DataError, match=r"image embeddings row \d+ . text embeddings row \d+.*not finite"):
        evaluate_embeddings(img, txt, np.repeat(np.arange(50), 5), dtype=dtype)
    with pytest.raises(DataError, match=r"not finite"):
        ranks_from_embeddings(img, txt, np.repeat(np.arange(50), 5))


def test_evaluate_large_but_finite_scores_are_exact():
    """Values up to ~1e18 whose products stay in float32 range: no error, same ranks as unit scale."""
    rng = np.random.default_rng(0)
    img = rng.integers(-3, 4, (20, 8)).astype(np.float32)
    txt = rng.integers(-3, 4, (60, 8)).astype(np.float32)
    gt = np.repeat(np.arange(20), 3)
    ref = evaluate_embeddings(img, txt, gt)
    assert evaluate_embeddings(img * 2.0 ** 60, txt * 2.0 ** 60, gt) == ref


def test_evaluate_subset_overflow_names_original_rows():
    """coco1k evaluates folds of 1,000 images: the error names rows of the inputs, not of the fold."""
    img = np.ones((5000, 2), np.float32)
    txt = np.ones((5000, 2), np.float32)
    img[4321] = txt[4321] = 3e19
    with pytest.raises(DataError, match=r"image embeddings row 4321 . text embeddings row 4321"):
        evaluate_embeddings(img, txt, np.arange(5000), protocol="coco1k")


def test_ground_truth_index_too_large_for_int64():
    with pytest.raises(DataError, match=r"entry 0 is image 10{30}, outside 0\.\.2"):
        as_ground_truth([10 ** 30, 1], 3, 2)


def test_cli_evaluate_embeddings_overflow_is_one_line_exit_2(tmp_path, capsys):
    rng = np.random.default_rng(0)
    np.save(tmp_path / "i.npy", (rng.standard_normal((10, 4)) * 1e20).astype(np.float32))
    np.save(tmp_path / "t.npy", (rng.standard_normal((20, 4)) * 1e20).astype(np.float32))
    np.save(tmp_path / "m.npy", np.arange(20) // 2)
    rc = main(["evaluate-embeddings", str(tmp_path / "i.npy"), str(tmp_path / "t.npy"), "-m", str(tmp_path / "m.npy"),
               "--json"])
    out, err = capsys.readouterr()
    assert rc == 2 and out == ""
    assert len(err.strip().splitlines()) == 1
    assert "i.npy (image embeddings) row" in err and "t.npy (text embeddings) row" in err and "not finite" in err


def test_two_stage_refuses_overflowing_first_stage_scores():
    from xmodal.data.base import GroundTruth

    img = np.full((4, 3), 1e20, np.float32)
    txt = np.full((8, 3), 1e20, np.float32)
    gt = GroundTruth.from_map(np.arange(8) // 2, 4)
    with pytest.raises(DataError, match=r"first-stage image embeddings row \d . first-stage text embeddings row \d.*not finite"):
        two_stage_ranks(img, txt, lambda i, t: np.zeros(len(i)), gt, 2)


def test_two_stage_refuses_overflowing_fusion():
    from xmodal.data.base import GroundTruth

    img = np.full((4, 3), 1e18, np.float32)
    txt = np.full((8, 3), 1e18, np.float32)
    gt = GroundTruth.from_map(np.arange(8) // 2, 4)
    with pytest.raises(DataError, match=r"fused scores.*not finite"):
        two_stage_ranks(img, txt, lambda i, t: np.full(len(i), 1e300), gt, 2, fusion=1e300)


# ---------------------------------------------------------------------------------------------
# readers


@pytest.mark.parametrize("shape", [(3, 8), (6,)])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_precomp_nonfinite_features_name_file_and_row(tmp_path, shape, bad):
    write_precomp(tmp_path, "test", num_images=4, feature_shape=shape)
    feats = np.load(tmp_path / "test_ims.npy")
    feats[2].flat[-1] = bad
    np.save(tmp_path / "test_ims.npy", feats)
    with pytest.raises(DataError, match=r"test_ims\.npy: row 2 has NaN or infinite values"):
        load_dataset("precomp", tmp_path, "test")


def test_precomp_all_nan_and_float16(tmp_path):
    write_precomp(tmp_path, "test", num_images=3, feature_shape=(4,))
    np.save(tmp_path / "test_ims.npy", np.full((3, 4), np.nan, np.float16))
    with pytest.raises(DataError, match=r"test_ims\.npy: row 0 has NaN"):
        load_dataset("precomp", tmp_path, "test")
    big = np.full((3, 4), 60000, np.float16)  # finite, though its row sums overflow float16
    np.save(tmp_path / "test_ims.npy", big)
    assert load_dataset("precomp", tmp_path, "test").num_images == 3


def test_precomp_scan_is_chunked_and_names_rows_past_the_first_chunk(tmp_path, monkeypatch):
    write_precomp(tmp_path, "test", num_images=40, caps_per_image=1, feature_shape=(2, 3))
    feats = np.load(tmp_path / "test_ims.npy")
    feats[37, 1, 2] = np.inf
    np.save(tmp_path / "test_ims.npy", feats)
    seen = []
    real = np.isfinite

    def spy(x, *a, **k):
        seen.append(np.shape(x))
        return real(x, *a, **k)

    monkeypatch.setattr(precomp, "SCAN_BYTES", 5 * 6 * 4)  # 5 rows a chunk
    monkeypatch.setattr(precomp.np, "isfinite", spy)
    with pytest.raises(DataError, match=r"row 37 has NaN or infinite"):
        load_dataset("precomp", tmp_path, "test")
    assert seen and max(s[0] for s in seen if len(s)) <= 5  # never the whole array at once


def test_precomp_one_row_per_caption_names_the_file_row(tmp_path):
    write_precomp(tmp_path, "test", num_images=4, rows_per_caption=True, feature_shape=(3,))
    feats = np.load(tmp_path / "test_ims.npy")
    feats[10:15, 1] = np.nan  # image 2 = rows 10..14
    np.save(tmp_path / "test_ims.npy", feats)
    with pytest.raises(DataError, match=r"test_ims\.npy: row 10 has NaN"):
        load_dataset("precomp", tmp_path, "test")


def test_precomp_empty_feature_dimension(tmp_path):
    write_precomp(tmp_path, "test", num_images=2, caps_per_image=1, feature_shape=(3,))
    np.save(tmp_path / "test_ims.npy", np.zeros((2, 0), np.float32))
    with pytest.raises(DataError, match=r"test_ims\.npy: .*empty"):
        load_dataset("precomp", tmp_path, "test")


@pytest.mark.parametrize("text, message", [
    ('{"image": "a.jpg", "caption": 1' + "0" * 5000 + "}\n", r"t\.jsonl:1: invalid JSON: a number has more than 4300 digits"),
    ("[" * 100000 + "\n", r"t\.jsonl:1: invalid JSON: nested too deeply"),
])
def test_jsonl_table_pathological_json_names_line(tmp_path, text, message):
    (tmp_path / "t.jsonl").write_text(text)
    with pytest.raises(DataError, match=message):
        load_dataset("table", tmp_path / "t.jsonl", "all")


@pytest.mark.parametrize("text, line", [
    ('image,caption\na.jpg,ok\nb.jpg,"unterminated\nmore\n', 3),
    ('image,caption\na.jpg,"x"y\n', 2),
])
def test_csv_table_malformed_quotes_name_line(tmp_path, text, line):
    (tmp_path / "t.csv").write_text(text)
    with pytest.raises(DataError, match=rf"t\.csv:{line}: malformed CSV"):
        load_dataset("table", tmp_path / "t.csv", "all")


def test_translations_jsonl_with_unicode_line_separators_round_trips(tmp_path):
    rows = [TranslationRow("1", "de", "a\u2028b\x85c"), TranslationRow("2", "fr", "d\x0ce")]
    path = write_translations(rows, tmp_path / "t.jsonl")
    assert read_translations(path) == rows


def test_translations_csv_malformed_quotes_name_line(tmp_path):
    (tmp_path / "t.csv").write_text('id,lang,text\n1,de,"x"y\n')
    with pytest.raises(DataError, match=r"t\.csv:2: malformed CSV"):
        read_translations(tmp_path / "t.csv")


def test_translations_pathological_json_names_line(tmp_path):
    (tmp_path / "t.jsonl").write_text('{"id": "1", "lang": "de", "text": "x"}\n' + "[" * 100000 + "\n")
    with pytest.raises(DataError, match=r"t\.jsonl:2: not a JSON object"):
        read_translations(tmp_path / "t.jsonl")


def test_torch_inputs_keep_working():
    img = torch.eye(4)
    txt = torch.eye(4)
    assert evaluate_embeddings(img, txt, np.arange(4))["rsum"] == 600.0


@pytest.mark.parametrize("text, message", [("[" * 100000, "nested too deeply"), ("[1" + "0" * 5000 + "]", "more than 4300 digits")])
def test_cli_text_to_image_map_pathological_json(tmp_path, capsys, text, message):
    np.save(tmp_path / "i.npy", np.eye(2, dtype=np.float32))
    (tmp_path / "m.json").write_text(text)
    rc = main(["evaluate-embeddings", str(tmp_path / "i.npy"), str(tmp_path / "i.npy"), "-m", str(tmp_path / "m.json")])
    err = capsys.readouterr().err
    assert rc == 2 and "m.json: invalid JSON" in err and message in err and len(err.strip().splitlines()) == 1
