"""Property-based tests of the input readers, the evaluation engine and the index: whatever the
input, the result is right (it matches an independent reference) or an :class:`XmodalError`,
never another exception type and never a silent wrong answer.

- tables: CSV / TSV / JSON Lines text generated from random rows (random columns, quotes,
  delimiters, unicode incl. U+2028 / NUL / BOM, empty and whitespace cells, missing columns,
  ragged rows, non-string JSON values, garbage lines) against a reference of the documented
  rules (docs/data.md);
- precomp: random shapes, dtypes, NaN / inf, caption counts, one-row-per-caption layouts;
- ``evaluate_embeddings``: random shapes, dtypes, NaN / inf, huge (power-of-two) scales up to
  and past float32 overflow, ground truth of every form with out-of-range entries, against a
  brute-force float64 reference (small integer values make every score exact, ties included);
- ``Index``: random vectors (finite, NaN, overflowing), ids with duplicates, metadata, both
  metrics, exact and flat backends, commit and reopen, against brute force; damaged
  ``ids.jsonl`` / ``metadata.jsonl`` lines;
- translations files and the CLI's text-to-image map file.

Each test is bounded (``max_examples`` 50-100, no deadline); the file runs in well under a
minute on two busy cores. ``XMODAL_FUZZ_SCALE=20`` multiplies the examples for a longer hunt.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import os
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from xmodal.data import load_dataset
from xmodal.data.translations import read_translations
from xmodal.errors import XmodalError
from xmodal.eval.protocols import evaluate_embeddings
from xmodal.index import Index

faiss = pytest.importorskip("faiss")


def bounded(n: int) -> settings:
    """``n`` examples (times ``XMODAL_FUZZ_SCALE``, e.g. 20 for a longer local hunt), no deadline."""
    scale = float(os.environ.get("XMODAL_FUZZ_SCALE", "1"))
    return settings(max_examples=max(1, round(n * scale)), deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.filter_too_much])


F32_MAX = float(np.finfo(np.float32).max)

# ---------------------------------------------------------------------------------------------
# (a) tables: CSV / TSV / JSONL


#: Characters that stress CSV quoting, line handling and unicode.
TRICKY = st.sampled_from(list(",\t\"'\n\r \\;|{}[]:") + ["\x00", "\x85", "\u2028", "\u2029", "\ufeff",
                                                         "\x0b", "\x0c", "é", "漢", "🙂", "\u200b"])
CELL = st.text(st.one_of(TRICKY, st.characters(blacklist_categories=("Cs",))), max_size=8) | st.just("NaN")
JSON_VALUE = st.one_of(
    st.none(), st.booleans(), st.integers(-10 ** 20, 10 ** 20), st.floats(allow_nan=True, allow_infinity=True),
    CELL, st.lists(st.integers(0, 3), max_size=2), st.dictionaries(st.just("k"), st.integers(0, 3), max_size=1))
KNOWN = ["image", "caption", "image_id", "caption_id", "split", "lang", "fields.title", "other"]
SPLITS = ["train", "test", "all", " train", "x"]


def rarely(draw, good, bad, one_in: int = 12):
    """Draw from ``bad`` about once in ``one_in`` draws, else from ``good``: most examples stay
    valid (so the reference comparison runs), each kind of damage still turns up."""
    # a middle value: Hypothesis favours the ends of a range (and shrinks towards 0)
    return draw(bad) if draw(st.integers(0, one_in - 1)) == one_in // 2 else draw(good)


#: A usable caption: anything around at least one visible character.
TEXT = st.builds(lambda a, c, b: a + c + b, CELL, st.sampled_from(list("ab,\"'é漢🙂")), CELL)
BAD_TEXT = st.sampled_from(["", " ", "\t", "\u2028"]) | st.none()


@st.composite
def table_input(draw):
    kind = draw(st.sampled_from(["csv", "tsv", "jsonl"]))
    required = [c for c in ("image", "caption") if rarely(draw, st.just(True), st.just(False), 20)]
    optional = draw(st.lists(st.sampled_from(KNOWN[2:]), unique=True, max_size=4))
    columns = draw(st.permutations(required + optional))
    n = rarely(draw, st.integers(1, 6), st.just(0), 20)
    paths = ["a.jpg", "b.jpg", "c d.jpg", "é/\"q\".jpg", "x,y\n.jpg"]
    rows = []
    for r in range(n):
        image = rarely(draw, st.sampled_from(paths), TEXT | BAD_TEXT)
        # mostly one id per path (images shared across rows), now and then an id reused for another path
        values = {"image": st.just(image), "caption": rarely(draw, st.just(TEXT), st.just(BAD_TEXT)),
                  "image_id": rarely(draw, st.just(st.just(f"id:{image}")), st.just(st.sampled_from(["p1", ""])
                                                                                  | st.none() | CELL)),
                  "caption_id": rarely(draw, st.just(st.just(f"c{r}")), st.just(st.sampled_from(["c0", ""])
                                                                                 | st.none() | CELL)),
                  "split": rarely(draw, st.just(st.sampled_from(SPLITS[:2])), st.just(st.sampled_from(SPLITS)
                                                                                       | st.none() | CELL)),
                  "lang": rarely(draw, st.just(st.sampled_from(["en", "de"])), st.just(BAD_TEXT))}
        row = {}
        for c in columns:
            if kind == "jsonl":  # now and then a value of any JSON type, or no key at all
                row[c] = rarely(draw, values.get(c, CELL | st.none()), JSON_VALUE, 20)
                if rarely(draw, st.just(False), st.just(True), 30):
                    del row[c]
            else:
                row[c] = draw(values.get(c, CELL | st.none()))
        rows.append(row)
    return kind, columns, rows, rarely(draw, st.sampled_from(SPLITS[:3]), st.sampled_from(SPLITS[3:])), draw(st.data())


def write_delimited(columns, rows, delimiter, draw) -> tuple[str, list[list[str]], list[str]]:
    """CSV/TSV text plus what a correct parser must see: the header and the data rows."""
    buf = io.StringIO(newline="")
    quoting = draw(st.sampled_from([csv.QUOTE_MINIMAL, csv.QUOTE_ALL]))
    # QUOTE_MINIMAL quotes only the line terminator's characters: with "\n" a bare "\r" in a
    # cell would be written unquoted, which every CSV reader takes as a line break
    ends = ["\r\n"] if quoting == csv.QUOTE_MINIMAL else ["\n", "\r\n"]
    w = csv.writer(buf, delimiter=delimiter, quoting=quoting, lineterminator=draw(st.sampled_from(ends)))
    pad = draw(st.sampled_from(["", " "]))
    header = [pad + c + pad for c in columns]
    w.writerow(header)
    parsed = []
    for row in rows:
        cells = ["" if row.get(c) is None else str(row[c]) for c in columns]
        if cells and draw(st.integers(0, 29)) == 15:  # a ragged row (middle value: see rarely)
            cells = cells[:-1]
        w.writerow(cells)
        parsed.append(cells)
    if parsed and parsed[-1] and draw(st.integers(0, 5)) == 3:
        # broken quoting in a copy of the last row (right field count): a stray quote after a
        # quoted cell, or a quoted cell never closed; a lenient parser would accept the file
        cells = ['"' + c.replace('"', '""') + '"' for c in parsed[-1][:-1]]
        buf.write(delimiter.join(cells + [draw(st.sampled_from(['"x"y', '"never closed']))]) + "\n")
        parsed.append(None)  # a strict parser refuses the file
    return buf.getvalue(), parsed, [h.strip() for h in header]


def reference_table(header: list[str], records: list[dict], split: str, name: str) -> dict | None:
    """What the table reader must return (docs/data.md), or None when the input is invalid."""
    if "image" not in header or "caption" not in header or len(set(header)) != len(header) or not records:
        return None
    if "split" in header and split != "all":
        rows = [r for r, rec in enumerate(records) if rec.get("split") is not None and str(rec["split"]) == split]
        if not rows:
            return None
    else:
        rows = list(range(len(records)))

    class Bad(Exception):
        pass

    def text(v, required):
        if v is None or (isinstance(v, float) and math.isnan(v)):
            if required:
                raise Bad
            return None
        if isinstance(v, bool) or not isinstance(v, (str, int)):
            raise Bad
        v = str(v)
        if required and not v.strip():
            raise Bad
        return v

    out = {"image_ids": [], "paths": [], "captions": [], "text_ids": [], "t2i": [], "langs": [], "title": []}
    try:
        for r in rows:
            rec = records[r]
            img = text(rec.get("image"), True)
            iid = text(rec.get("image_id"), False) if "image_id" in header else None
            key = iid if iid not in (None, "") else img
            if key in out["image_ids"]:
                if out["paths"][out["image_ids"].index(key)] != img:
                    raise Bad
            else:
                out["image_ids"].append(key)
                out["paths"].append(img)
            out["t2i"].append(out["image_ids"].index(key))
            out["captions"].append(text(rec.get("caption"), True))
            tid = text(rec.get("caption_id"), True) if "caption_id" in header else str(r)
            if tid in out["text_ids"]:
                raise Bad
            out["text_ids"].append(tid)
            if "lang" in header:
                out["langs"].append(text(rec.get("lang"), True))
            if "fields.title" in header:
                out["title"].append(text(rec.get("fields.title"), False) or "")
    except Bad:
        return None
    return out


def check_table(path: Path, split: str, ref: dict | None, header: list[str]) -> None:
    try:
        ds = load_dataset("table", path, split)
    except XmodalError as e:
        assert path.name in str(e), str(e)
        assert ref is None, f"valid input refused: {e}"
        event("refused")
        return
    event("dataset")
    assert ref is not None, "invalid input accepted"
    assert ds.captions == ref["captions"]
    assert ds.text_ids == ref["text_ids"]
    assert ds.image_ids == ref["image_ids"] and ds.image_paths == ref["paths"]
    np.testing.assert_array_equal(ds.gt.first_image(), ref["t2i"])
    assert ds.gt.is_one_to_one_per_text()
    assert ds.langs == (ref["langs"] if "lang" in header else None)
    assert ds.fields == ({"title": ref["title"]} if "fields.title" in header else None)


@bounded(100)
@given(table_input())
def test_fuzz_table_reader(case):
    kind, columns, rows, split, data = case
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"t.{kind}"
        if kind == "jsonl":
            ascii_ = data.draw(st.booleans())
            lines = [json.dumps(r, ensure_ascii=ascii_) for r in rows]
            garbage = data.draw(st.lists(st.tuples(st.integers(0, len(lines)), st.text(
                st.characters(blacklist_categories=("Cs",), blacklist_characters="\r\n"), max_size=12)
                | st.sampled_from(["[" * 3000, '{"a": ' + "9" * 5000 + "}", "\ufeff{}", "{}"])), min_size=1,
                max_size=2),
                                label="garbage lines") if data.draw(st.integers(0, 4)) == 2 else []
            for pos, g in sorted(garbage, reverse=True):
                lines.insert(pos, g)
            path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
            records, ok = [], True
            for i, line in enumerate(lines):
                line = line[1:] if i == 0 and line.startswith("\ufeff") else line  # utf-8-sig
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except (ValueError, RecursionError):
                    ok = False
                    break
                if not isinstance(obj, dict):
                    ok = False
                    break
                records.append(obj)
            header = list(dict.fromkeys(k for rec in records for k in rec))
            ref = reference_table(header, records, split, path.name) if ok else None
        else:
            text, parsed, header = write_delimited(columns, rows, "," if kind == "csv" else "\t", data.draw)
            path.write_text(text, encoding="utf-8", newline="")
            # a one-cell row holding only whitespace reads as a blank line, which is skipped
            parsed = [p for p in parsed if p is None or not (len(p) == 1 and not p[0].strip())]
            if any(p is None or len(p) != len(header) for p in parsed):
                ref = None
            else:
                records = [{h: (v if v != "" else None) for h, v in zip(header, p)} for p in parsed]
                ref = reference_table(header, records, split, path.name)
        check_table(path, split, ref, header)


@bounded(60)
@given(st.text(st.one_of(TRICKY, st.characters(blacklist_categories=("Cs",))), max_size=80),
       st.sampled_from(["csv", "tsv", "jsonl"]))
def test_fuzz_table_reader_raw_text(text, kind):
    """Arbitrary text after a valid header: a dataset or an XmodalError naming the file."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"t.{kind}"
        head = {"csv": "image,caption\n", "tsv": "image\tcaption\n", "jsonl": '{"image": "a", "caption": "b"}\n'}[kind]
        path.write_text(head + text, encoding="utf-8", newline="")
        try:
            ds = load_dataset("table", path, "all")
        except XmodalError as e:
            assert path.name in str(e)
            return
        assert ds.num_texts >= 1 and all(c.strip() for c in ds.captions)


# ---------------------------------------------------------------------------------------------
# (b) precomp


@st.composite
def precomp_input(draw):
    n = rarely(draw, st.integers(1, 5), st.just(0), 20)
    dim = rarely(draw, st.integers(1, 3), st.just(0), 20)
    shape = (n, *draw(st.sampled_from([(), (1,), (2,), (3,)])), dim)
    dtype = rarely(draw, st.sampled_from(["float32", "float16", "float64", "int32", "uint8"]),
                   st.sampled_from(["bool", "complex64"]), 15)
    rng = np.random.default_rng(draw(st.integers(0, 2 ** 16)))
    feats = rng.integers(-3, 4, shape).astype(np.float64)
    k = draw(st.integers(1, 3))
    repeated = n > 1 and k > 1 and draw(st.booleans())
    if repeated:  # one row per caption (VSE++), images repeated k times
        feats = np.repeat(feats, k, axis=0)
    if feats.size and rarely(draw, st.just(False), st.just(True), 6):
        feats.flat[draw(st.integers(0, feats.size - 1))] = draw(st.sampled_from([np.nan, np.inf, -np.inf]))
    num_caps = rarely(draw, st.just(n * k), st.integers(0, 12), 6)
    caps_per_image = rarely(draw, st.none(), st.integers(1, 4) | st.just(k), 5)
    blank = rarely(draw, st.just(False), st.just(True), 15)
    with np.errstate(invalid="ignore"):
        return feats.astype(dtype) if dtype != "bool" else feats > 0, num_caps, caps_per_image, blank


@bounded(80)
@given(precomp_input())
def test_fuzz_precomp_reader(case):
    feats, num_caps, caps_per_image, blank = case
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        np.save(folder / "test_ims.npy", feats)
        captions = [f"caption {i} é" for i in range(num_caps)]
        lines = captions[:1] + [""] + captions[1:] if blank and num_caps > 1 else captions
        (folder / "test_caps.txt").write_text("".join(c + "\n" for c in lines), encoding="utf-8")
        options = {"caps_per_image": caps_per_image} if caps_per_image is not None else {}
        with np.errstate(invalid="ignore"):
            finite = feats.dtype.kind in "iu" or (feats.dtype.kind == "f" and bool(np.isfinite(feats).all()))
        try:
            ds = load_dataset("precomp", folder, "test", **options)
        except XmodalError as e:
            assert "test_" in str(e) or str(folder) in str(e), str(e)
            rows = feats.shape[0]
            # these inputs are valid, so refusing them would be a bug
            assert not (finite and feats.dtype.kind in "fiu" and 0 not in feats.shape[1:] and rows and num_caps
                        and not (blank and num_caps > 1) and caps_per_image is None and num_caps % rows == 0
                        and rows != num_caps), str(e)
            event("refused")
            return
        event("dataset")
        assert finite and feats.dtype.kind in "fiu" and not (blank and num_caps > 1)
        k = ds.meta["caps_per_image"]
        assert ds.captions == captions and ds.num_images * k == num_caps
        np.testing.assert_array_equal(ds.gt.first_image(), np.arange(num_caps) // k)
        stride = k if ds.meta["rows_per_caption"] else 1
        np.testing.assert_array_equal(np.asarray(ds.image_features), feats[::stride])
        if caps_per_image is not None:
            assert k == caps_per_image


# ---------------------------------------------------------------------------------------------
# (c) evaluate_embeddings


@st.composite
def eval_input(draw):
    n, m = rarely(draw, st.integers(1, 6), st.just(0), 20), rarely(draw, st.integers(1, 9), st.just(0), 20)
    d = rarely(draw, st.integers(1, 5), st.just(0), 20)
    d_txt = rarely(draw, st.just(d), st.integers(0, 5), 15)
    # small integers times a power of two: every score is exact; 2**60 and up near or past float32's range
    scale = 2.0 ** rarely(draw, st.sampled_from([0, 0, 20]), st.sampled_from([60, 62, 63, 64, 70, 600]), 4)
    rng = np.random.default_rng(draw(st.integers(0, 2 ** 16)))
    img = rng.integers(-2, 3, (n, d)).astype(np.float64) * scale
    txt = rng.integers(-2, 3, (m, d_txt)).astype(np.float64) * scale
    for x in (img, txt):
        if x.size and rarely(draw, st.just(False), st.just(True), 12):
            x.flat[draw(st.integers(0, x.size - 1))] = draw(st.sampled_from([np.nan, np.inf, -np.inf]))
    dtype = rarely(draw, st.sampled_from(["float32", "float64", "float16"]), st.sampled_from(["int64", "bool"]), 15)
    form = draw(st.sampled_from(["array", "list", "lists", "tensor"]))
    hi = n + rarely(draw, st.just(0), st.just(1), 15)  # an image index past the end
    lo = rarely(draw, st.just(0), st.just(-1), 15)  # a negative image index
    length = m + rarely(draw, st.just(0), st.sampled_from([-1, 1]), 15)  # one entry too few / many
    empty_entry = rarely(draw, st.just(1), st.just(0), 15)  # a text with no image (lists form)
    if form == "lists":
        gt = [draw(st.lists(st.integers(lo, max(hi - 1, 0)), min_size=empty_entry, max_size=3))
              for _ in range(max(length, 0))]
    else:
        gt = [draw(st.integers(lo, max(hi - 1, 0))) for _ in range(max(length, 0))]
    return img, txt, dtype, form, gt, draw(st.integers(1, 8)), draw(st.sampled_from(["fp32", "fp32", "bf16"]))


def reference_metrics(img: np.ndarray, txt: np.ndarray, gt: list[list[int]]) -> dict[str, float] | str:
    """Brute-force float64 metrics (exact for these inputs), or why the input must be refused."""
    if img.size == 0 or txt.size == 0 or img.shape[1] != txt.shape[1]:
        return "shape"
    s = img @ txt.T  # (N, M), exact: small integers times powers of two
    pos = np.zeros(s.shape, bool)
    for t, images in enumerate(gt):
        pos[images, t] = True
    ranks = {}
    for name, scores, p in (("i2t", s, pos), ("t2i", s.T, pos.T)):
        r = []
        for q in range(scores.shape[0]):
            if p[q].any():
                best = scores[q][p[q]].max()
                r.append(int(((scores[q] > best) & ~p[q]).sum()))
        if not r:
            return "no positive"
        ranks[name] = np.array(r)
    out = {}
    for name, r in ranks.items():
        out.update({f"{name}_r1": 100.0 * (r < 1).mean(), f"{name}_r5": 100.0 * (r < 5).mean(),
                    f"{name}_r10": 100.0 * (r < 10).mean(), f"{name}_medr": float(np.floor(np.median(r)) + 1),
                    f"{name}_meanr": float(r.mean() + 1)})
    out["rsum"] = sum(out[f"{p}_r{k}"] for p in ("i2t", "t2i") for k in (1, 5, 10))
    return out


@bounded(100)
@given(eval_input())
def test_fuzz_evaluate_embeddings(case):
    img64, txt64, dtype, form, gt, block_size, compute = case
    with np.errstate(all="ignore"):
        img, txt = (x.astype(dtype) if dtype != "bool" else x > 0 for x in (img64, txt64))
        stored = [x.astype(np.float64) for x in (img, txt)]  # what the engine is given, widened
    if form == "tensor":
        img, txt = torch.from_numpy(img), torch.from_numpy(txt)
    mapping = {"array": lambda: np.asarray(gt, np.int64), "list": lambda: list(gt), "tensor": lambda: torch.tensor(gt),
               "lists": lambda: gt}[form]()
    gt_lists = [g if isinstance(g, list) else [g] for g in gt]
    m, n = len(txt64), len(img64)
    expect_error = (dtype in ("int64", "bool") or len(gt) != m or any(not g for g in gt_lists)
                    or any(not 0 <= i < n for g in gt_lists for i in g)
                    or not all(np.isfinite(x).all() for x in stored)
                    or any(np.abs(x).max(initial=0) > F32_MAX for x in stored))
    ref = None if expect_error else reference_metrics(*stored, gt_lists)
    if isinstance(ref, str):
        expect_error = True
    may_overflow = False
    if not expect_error:
        prod = np.abs(stored[0]) @ np.abs(stored[1]).T  # bounds every partial sum of every score
        if np.abs(stored[0] @ stored[1].T).max() > F32_MAX:
            expect_error = True  # a score itself overflows float32: must be refused
        may_overflow = prod.max() > F32_MAX / 2  # a partial sum may overflow: refusing is fine too
    try:
        got = evaluate_embeddings(img, txt, mapping, block_size=block_size, dtype=compute)
    except XmodalError as e:
        assert "\n" not in str(e)
        assert expect_error or may_overflow, f"valid input refused: {e}"
        event(f"refused: {str(e).split(':')[-2 if ':' in str(e) else 0][-30:]}")
        return
    event("metrics" + (" (scores near float32 overflow)" if may_overflow else ""))
    assert not expect_error, f"invalid input accepted: {got}"
    assert set(got) == set(ref)
    for key, value in ref.items():
        assert got[key] == pytest.approx(value, rel=1e-12, abs=1e-9), key


# ---------------------------------------------------------------------------------------------
# (d) Index


def resign(folder: Path, name: str) -> None:
    m = json.loads((folder / "manifest.json").read_text())
    data = (folder / name).read_bytes()
    m["files"][name] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (folder / "manifest.json").write_text(json.dumps(m))


def brute(q: np.ndarray, x: np.ndarray, metric: str) -> np.ndarray:
    s = q @ x.T
    if metric == "l2":
        s = -((q ** 2).sum(1)[:, None] + (x ** 2).sum(1)[None] - 2 * s)
    return s


@st.composite
def index_input(draw):
    d = draw(st.integers(1, 4))
    scale = 2.0 ** rarely(draw, st.sampled_from([0, 0, 10]), st.sampled_from([30, 60, 62, 70]), 4)
    rng = np.random.default_rng(draw(st.integers(0, 2 ** 16)))
    letters = st.sampled_from(list("abcdefghijklmnopqrstuvwxyz") + ["é", "\u2028", "a\nb", ""])
    adds = []
    for _ in range(draw(st.integers(1, 3))):
        n = draw(st.integers(0, 5))
        x = rng.integers(-2, 3, (n, d)).astype(np.float64) * scale
        if x.size and rarely(draw, st.just(False), st.just(True), 8):
            x.flat[draw(st.integers(0, x.size - 1))] = draw(st.sampled_from([np.nan, np.inf]))
        ids = draw(st.lists(letters, min_size=n, max_size=n))  # 30 letters: duplicates now and then
        meta = [draw(st.dictionaries(st.text(max_size=3), JSON_VALUE.filter(lambda v: not isinstance(v, float)
                                                                            or math.isfinite(v)), max_size=2))
                for _ in range(n)]
        adds.append((x.astype(draw(st.sampled_from(["float32", "float64"]))), ids, meta))
    q = rng.integers(-2, 3, (draw(st.integers(1, 3)), d)).astype(np.float32) * np.float32(scale)
    if rarely(draw, st.just(False), st.just(True), 10):
        q[0, 0] = np.nan
    return (d, draw(st.sampled_from(["ip", "l2"])), draw(st.sampled_from(["exact", "flat"])),
            rarely(draw, st.just("float32"), st.just("float16"), 4), adds, q, draw(st.integers(1, 8)))


def check_search(ix: Index, q: np.ndarray, k: int, stored: np.ndarray, metric: str) -> None:
    """Results equal brute force (exact for these values), or a refusal that has a reason."""
    n = len(stored)
    with np.errstate(all="ignore"):
        q_ok = bool(np.isfinite(q).all())
        q64 = q.astype(np.float64)
        ref = brute(q64, stored, metric) if n else np.zeros((len(q), 0))
        # bound on every intermediate of q.x (and of 2 q.x - |x|^2 - |q|^2, or |q - x|^2, for l2)
        bound = np.abs(q64) @ np.abs(stored).T if n else np.zeros((len(q), 0))
        if metric == "l2" and n:
            bound = 2 * bound + 2 * ((q64 ** 2).sum(1)[:, None] + (stored ** 2).sum(1)[None])
    may_overflow = bool((bound > F32_MAX / 2).any())
    try:
        scores, rows = ix.search(q, k)
    except XmodalError as e:
        assert not q_ok or may_overflow, f"valid search refused: {e}"
        event("search refused")
        return
    event("search results")
    assert q_ok, "a NaN query was accepted"
    top = min(k, n)
    assert scores.shape == rows.shape == (len(q), k)
    assert (rows[:, top:] == -1).all() and np.isneginf(scores[:, top:]).all()
    assert np.isfinite(scores[:, :top]).all() and (rows[:, :top] >= 0).all()
    expected = -np.sort(-ref, axis=1)[:, :top]  # an overflowing score here cannot be matched
    np.testing.assert_array_equal(scores[:, :top].astype(np.float64), expected)
    for i in range(len(q)):  # ties may come back in any order, but each score must be the row's own
        np.testing.assert_array_equal(ref[i, rows[i, :top]], expected[i])


@bounded(50)
@given(index_input())
def test_fuzz_index_add_search(case):
    d, metric, backend, dtype, adds, q, k = case
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "ix"
        ix = Index.create(path, d, metric=metric, backend=backend, dtype=dtype)
        stored, ids_in, meta_in = np.zeros((0, d)), [], []
        for x, ids, meta in adds:
            with np.errstate(all="ignore"):
                cast = x.astype(dtype)
            bad = (not np.isfinite(cast).all() or len(set(ids)) != len(ids) or set(ids) & set(ids_in))
            try:
                ix.add(x, ids, meta)
            except XmodalError as e:
                assert bad, f"valid add refused: {e}"
                continue
            assert not bad, "NaN / inf vector or duplicate id accepted"
            stored = np.concatenate([stored, cast.astype(np.float64)])
            ids_in += ids
            meta_in += meta
        assert len(ix) == len(stored) and ix.ids_of(list(range(len(ix)))) == ids_in
        check_search(ix, q, k, stored, metric)
        ix.commit()
        ix = Index.open(path)
        assert ix.ids_of(list(range(len(ix)))) == ids_in and ix.metadata(list(range(len(ix)))) == meta_in
        check_search(ix, q, k, stored, metric)


@bounded(60)
@given(st.binary(max_size=40), st.sampled_from(["ids.jsonl", "metadata.jsonl"]), st.integers(0, 2),
       st.sampled_from(["auto", "size"]))
def test_fuzz_index_damaged_lines(line, name, at, verify):
    """A replaced line in ids.jsonl / metadata.jsonl (manifest re-signed): right values or a DataError naming it."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "ix"
        with Index.create(path, 2) as ix:
            ix.add(np.eye(3, 2, dtype=np.float32) + 0.5, ["a", "b", "c"], [{"n": 0}, {"n": 1}, {"n": 2}])
        lines = (path / name).read_bytes().split(b"\n")
        lines[at] = line
        (path / name).write_bytes(b"\n".join(lines))
        resign(path, name)
        try:
            ix = Index.open(path, verify=verify)
            ids = ix.ids_of([0, 1, 2])
            metas = ix.metadata([0, 1, 2])
        except XmodalError as e:
            assert name in str(e), str(e)
            return
        assert len(set(ids)) == 3 and all(isinstance(m, dict) for m in metas)
        if name == "ids.jsonl":
            assert ids[at] == json.loads(line)
        else:
            assert metas[at] == json.loads(line)


# ---------------------------------------------------------------------------------------------
# other readers: translations, the CLI's text-to-image map


@bounded(60)
@given(st.text(st.one_of(TRICKY, st.characters(blacklist_categories=("Cs",))), max_size=60),
       st.sampled_from([".csv", ".tsv", ".jsonl"]))
def test_fuzz_translations(text, suffix):
    head = {".csv": "id,lang,text\n", ".tsv": "id\tlang\ttext\n", ".jsonl": ""}[suffix]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"t{suffix}"
        path.write_text(head + text, encoding="utf-8", newline="")
        try:
            rows = read_translations(path)
        except XmodalError as e:
            assert path.name in str(e)
            return
        assert rows and all(r.id and r.lang and r.text for r in rows)


@bounded(60)
@given(st.one_of(st.text(max_size=30), st.recursive(JSON_VALUE, lambda c: st.lists(c, max_size=4), max_leaves=8)
                 .map(json.dumps), st.integers(1, 3).map(lambda n: "[" * (n * 40000))))
def test_fuzz_cli_text_to_image_map(text):
    """The CLI's ``--text-to-image`` JSON file: a mapping the engine accepts or refuses, or a DataError."""
    from xmodal.cli.evaluate_embeddings import load_text_to_image

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "map.json"
        path.write_text(text, encoding="utf-8")
        try:
            mapping = load_text_to_image(path)
        except XmodalError as e:
            assert "map.json" in str(e) and "\n" not in str(e)
            return
        assert isinstance(mapping, list)
        img = np.eye(3, dtype=np.float32)
        txt = np.eye(3, dtype=np.float32)[np.arange(max(len(mapping), 1)) % 3]
        try:
            got = evaluate_embeddings(img, txt, mapping)
        except XmodalError as e:
            assert "\n" not in str(e)
            return
        assert 0 <= got["rsum"] <= 600
