"""What a dataset holds: items per split, captions per image, languages, positives per text,
missing image files and duplicates (``xmodal inspect``).

Two paths give the same report. The FooDI-ML CSV and the ``table`` formats are **streamed**:
the file is read in blocks and each row is reduced to a few 64-bit keys (hashes of its
caption, image, file path, ...), so memory grows by tens of bytes per row, never by the text
itself: the 2.8-million-row FooDI-ML catalogue is inspected without building its dataset.
WebDataset shards are streamed too, one sample at a time (member headers from each shard's
index, then only the sample's ``.json``/``.txt``; image bytes are never read): each sample
leaves its ids, caption and file label as 64-bit keys and its positives as integer pairs.
Every other format is read split by split with its reader and described from the
:class:`CrossModalDataset` (its ground truth, languages and files).

Counts follow the readers exactly (tests check both paths against each other): FooDI-ML's
duplicate rows are dropped over the whole file as ``drop_duplicates`` does, and its positives
per text are those of the duplicate-aware ground truth (same caption, same file or same
content hash), computed by inclusion-exclusion over group sizes instead of building the
ground truth.
"""
from __future__ import annotations

import csv
import importlib
import os
from collections import Counter
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from ..errors import DataError
from ..progress import make_progress
from .base import DATASETS, CrossModalDataset, load_dataset
from .table import find_table_file, parse_json, require_columns

#: rows handed to the per-block reduction at a time (streamed formats)
BLOCK_ROWS = 65_536
#: bytes of CSV parsed per block (pyarrow's streaming reader)
CSV_BLOCK_BYTES = 1 << 20
_MIX = np.int64(-7046029254386353131)  # 0x9E3779B97F4A7C15 as int64: mixes two keys into one


# summaries --------------------------------------------------------------------------------
def distribution(counts: np.ndarray) -> dict:
    """``min/mean/median/max`` and a histogram (``"0".."9"``, ``"10+"``) of per-item counts."""
    counts = np.asarray(counts, dtype=np.int64)
    if not len(counts):
        return {"min": 0, "mean": 0.0, "median": 0.0, "max": 0, "histogram": {}}
    hist = np.bincount(np.minimum(counts, 10), minlength=11)
    return {"min": int(counts.min()), "mean": round(float(counts.mean()), 4), "median": float(np.median(counts)),
            "max": int(counts.max()),
            "histogram": {("10+" if k == 10 else str(k)): int(v) for k, v in enumerate(hist) if v}}


def group_sizes(keys: np.ndarray) -> np.ndarray:
    """For each element, how many elements share its key."""
    if not len(keys):
        return np.zeros(0, dtype=np.int64)
    _, inverse, counts = np.unique(keys, return_inverse=True, return_counts=True)
    return counts[inverse.reshape(-1)]


def mix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """One 64-bit key per pair of keys (wrapping arithmetic; collisions are negligible)."""
    with np.errstate(over="ignore"):
        return (a * _MIX) ^ b


def _duplicates(keys: np.ndarray) -> int:
    """Elements whose key an earlier element already had."""
    return int(len(keys) - len(np.unique(keys))) if len(keys) else 0


def _split_report(texts_per_image: np.ndarray, positives: np.ndarray, nnz: int, languages: dict | None,
                  missing: int | None, dups: dict) -> dict:
    """One split's report from per-image text counts and per-text positive counts."""
    return {"images": len(texts_per_image), "texts": len(positives), "positive_pairs": int(nnz),
            "captions_per_image": distribution(texts_per_image), "positives_per_text": distribution(positives),
            "images_without_text": int((texts_per_image == 0).sum()),
            "texts_without_image": int((positives == 0).sum()),
            "languages": languages, "missing_files": missing, "duplicates": dups}


def dataset_stats(ds: CrossModalDataset, check_files: bool = True) -> dict:
    """The report of one split read by its format's reader."""
    texts_per_image = np.bincount(ds.gt.indices, minlength=ds.num_images)
    positives = ds.gt.counts()
    missing = None
    paths = ds.image_paths
    has_files = paths is not None and ds.meta.get("pixels") is None and ds.image_features is None
    if check_files and has_files:
        files = {str(ds.image_path(i)) for i, p in enumerate(paths) if p is not None}
        missing = sum(not os.path.isfile(f) for f in files)
    dups = {"captions": _duplicates(np.fromiter((hash(c) for c in ds.captions), np.int64, ds.num_texts))}
    if paths is not None:
        dups["image_files"] = _duplicates(np.fromiter((hash(p) for p in paths), np.int64, len(paths)))
    if ds.image_hashes is not None:
        dups["image_hashes"] = _duplicates(np.fromiter((hash(h) for h in ds.image_hashes), np.int64,
                                                       len(ds.image_hashes)))
    languages = dict(Counter(ds.langs).most_common()) if ds.langs is not None else None
    return _split_report(texts_per_image, positives, ds.gt.nnz, languages, missing, dups)


def split_names(fmt: str, path: Path) -> list[str]:
    """The splits the format's ``splits(path)`` lists (or its fixed ``SPLITS``)."""
    module = importlib.import_module(DATASETS.get(fmt).__module__)
    lister = getattr(module, "splits", None)
    if callable(lister):
        return list(lister(path))
    if getattr(module, "SPLITS", None) is not None:
        return list(module.SPLITS)
    raise DataError(f"dataset format {fmt!r} cannot list its splits; pass the split names (--split)")


def inspect_dataset(fmt: str, path: str | Path, *, splits: list[str] | None = None, options: dict | None = None,
                    check_files: bool = True, progress: bool = True) -> dict:
    """The report of a dataset: ``{"format", "path", "streamed", "splits": {name: stats}, ...}``.

    ``splits``: the splits to describe (default: every split the format lists). The FooDI-ML
    CSV, ``table`` files and WebDataset shards are streamed (see the module docstring); other
    formats are read.
    """
    options = dict(options or {})
    streamed = _streaming_inspector(fmt, path, options, splits)
    if streamed is not None:
        report = streamed(check_files=check_files, progress=progress)
        if splits:
            unknown = [s for s in splits if s not in report["splits"]]
            if unknown:
                raise DataError(f"{path}: no split {unknown[0]!r}; splits present: {', '.join(report['splits'])}")
            report["splits"] = {s: report["splits"][s] for s in splits}
        return report
    names = splits or split_names(fmt, Path(path))
    out = {}
    for split in names:
        ds = load_dataset(fmt, path, split, **options)
        out[split] = dataset_stats(ds, check_files)
    return {"format": fmt, "path": str(path), "streamed": False, "splits": out}


def _streaming_inspector(fmt: str, where: str | Path, options: dict,
                         splits: list[str] | None) -> Callable[..., dict] | None:
    if fmt == "webdataset":
        return lambda **kw: webdataset_stats(where, splits=splits, options=options, **kw)
    path = Path(where)
    if fmt == "foodiml" and path.exists():
        csvs = [path] if path.is_file() else sorted(path.glob("*.csv"))
        source = csvs[0] if len(csvs) == 1 else None  # else the reader explains what it expected
        if source is not None and source.suffix.lower() == ".csv" and not (path.is_dir() and _has_partitions(path)):
            unknown = set(options) - {"image_root", "drop_duplicates"}
            if not unknown:
                return lambda **kw: foodiml_csv_stats(source, **options, **kw)
    if fmt == "table" and path.exists():
        unknown = set(options) - {"image_root"}
        if not unknown:
            file = find_table_file(path)
            return lambda **kw: table_stats(file, **options, **kw)
    return None


def _has_partitions(path: Path) -> bool:
    return any(p.is_dir() and p.name.startswith("split=") for d in (path, path / "samples") if d.is_dir()
               for p in d.iterdir())


# streaming --------------------------------------------------------------------------------
def _blocks_csv(path: Path, columns: list[str], delimiter: str = ",") -> Iterator[dict[str, list]]:
    """Blocks of string columns of a CSV/TSV (missing/empty = None), read with pyarrow's streaming reader."""
    import pyarrow as pa
    import pyarrow.csv as pacsv

    try:
        reader = pacsv.open_csv(
            path, read_options=pacsv.ReadOptions(block_size=CSV_BLOCK_BYTES, use_threads=False),
            parse_options=pacsv.ParseOptions(delimiter=delimiter, newlines_in_values=True),
            convert_options=pacsv.ConvertOptions(include_columns=columns, column_types={c: pa.string() for c in columns}))
        for batch in reader:
            yield {c: batch.column(c).to_pylist() for c in columns}
    except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
        raise DataError(f"{path}: malformed CSV: {exc}") from None


def _blocks_jsonl(path: Path, columns: list[str]) -> Iterator[dict[str, list]]:
    block: dict[str, list] = {c: [] for c in columns}
    with open(path, encoding="utf-8-sig") as f:
        for lineno, text in enumerate(f, 1):
            if not text.strip():
                continue
            obj = parse_json(text, path, lineno)
            if not isinstance(obj, dict):
                raise DataError(f"{path}: line {lineno}: expected a JSON object, got {type(obj).__name__}")
            for c in columns:
                v = obj.get(c)
                block[c].append(None if v is None else str(v))
            if len(block[columns[0]]) >= BLOCK_ROWS:
                yield block
                block = {c: [] for c in columns}
    if block[columns[0]]:
        yield block


def _blocks_parquet(path: Path, columns: list[str]) -> Iterator[dict[str, list]]:
    import pyarrow.parquet as pq

    for batch in pq.ParquetFile(path).iter_batches(batch_size=BLOCK_ROWS, columns=columns):
        yield {c: [None if v is None else str(v) for v in batch.column(c).to_pylist()] for c in columns}


def _header(path: Path, delimiter: str) -> list[str]:
    with open(path, newline="", encoding="utf-8-sig") as f:
        return [h.strip() for h in next(csv.reader(f, delimiter=delimiter), [])]


def _table_blocks(path: Path, wanted: tuple[str, ...]) -> tuple[list[str], Iterator[dict[str, list]]]:
    kind = path.suffix.lower()
    if kind in (".csv", ".tsv"):
        delim = "\t" if kind == ".tsv" else ","
        header = _header(path, delim)
        cols = [c for c in wanted if c in header]
        return header, _blocks_csv(path, cols, delim)
    if kind == ".parquet":
        import pyarrow.parquet as pq

        header = pq.ParquetFile(path).schema_arrow.names
        cols = [c for c in wanted if c in header]
        return header, _blocks_parquet(path, cols)
    if kind in (".jsonl", ".ndjson"):
        header = []
        with open(path, encoding="utf-8-sig") as f:  # the keys of the first record
            for lineno, text in enumerate(f, 1):
                if text.strip():
                    obj = parse_json(text, path, lineno)
                    header = list(obj) if isinstance(obj, dict) else []
                    break
        cols = [c for c in wanted if c in header]
        return header, _blocks_jsonl(path, cols)
    raise DataError(f"{path}: unsupported table type {path.suffix!r}")


def _keys(values: list) -> np.ndarray:
    """64-bit key per value (Python's hash: stable within one process); None gets key 0."""
    return np.fromiter((0 if v is None else hash(v) for v in values), dtype=np.int64, count=len(values))


class _FileCheck:
    """Existence of image files, each distinct path stat-ed once per block."""

    def __init__(self, root: Path, enabled: bool) -> None:
        self.root, self.enabled = root, enabled

    def missing(self, paths: list) -> np.ndarray:
        if not self.enabled:
            return np.zeros(len(paths), dtype=bool)
        seen: dict[str, bool] = {}
        for p in paths:
            if p is not None and p not in seen:
                seen[p] = not os.path.isfile(p if os.path.isabs(p) else os.path.join(self.root, p))
        return np.fromiter((p is None or seen[p] for p in paths), dtype=bool, count=len(paths))


class _Columns:
    """Per-row arrays collected block by block, concatenated at the end."""

    def __init__(self) -> None:
        self.parts: dict[str, list[np.ndarray]] = {}

    def add(self, **arrays: np.ndarray) -> None:
        for k, a in arrays.items():
            self.parts.setdefault(k, []).append(a)

    def get(self, key: str) -> np.ndarray:
        parts = self.parts.get(key, [])
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


class _Codes:
    """Small integer codes for a column with few distinct values (split, language, country)."""

    def __init__(self) -> None:
        self.names: dict[Any, int] = {}

    def __call__(self, values: list) -> np.ndarray:
        return np.fromiter((self.names.setdefault(v, len(self.names)) for v in values), np.int32, len(values))

    def counts(self, codes: np.ndarray) -> dict:
        names = {c: n for n, c in self.names.items()}
        hist = np.bincount(codes, minlength=len(names))
        order = np.argsort(-hist, kind="stable")
        return {str(names[int(c)]): int(hist[c]) for c in order if hist[c]}


@contextmanager
def _row_bar(progress: bool, path: Path) -> Iterator[Callable[[int], None]]:
    """``advance(rows)`` for a rows-read counter on stderr (shown on a terminal only)."""
    with make_progress(transient=True, enabled=None if progress else False, stderr=True) as bar:
        task = bar.add_task(f"inspecting {path.name} (rows)", total=None)
        yield lambda n: bar.advance(task, n)


def _union3(c: np.ndarray, p: np.ndarray, h: np.ndarray) -> np.ndarray:
    """Per row, how many rows share its caption, file or hash key: |C ∪ P ∪ H| by inclusion-exclusion."""
    cp, ch, ph = mix(c, p), mix(c, h), mix(p, h)
    return (group_sizes(c) + group_sizes(p) + group_sizes(h) - group_sizes(cp) - group_sizes(ch)
            - group_sizes(ph) + group_sizes(mix(cp, h)))


def _foodiml_block(block: dict[str, list], has_hash: bool, files: _FileCheck, splits: _Codes,
                   countries: _Codes, row0: int) -> dict[str, np.ndarray]:
    n = len(block["s3_path"])
    name, section = block["product_name"], block["collection_section"]
    desc = block.get("product_description") or [None] * n
    hashes = block["hash"] if has_hash else None
    blank = lambda v: v is None or not v.strip()  # noqa: E731  (the reader treats blank cells as missing)
    # the drop_duplicates key: raw (name, section, description, hash or path), as the reader groups them
    dedup = [hash((a, b, c, d)) for a, b, c, d in zip(name, section, desc, hashes or block["s3_path"])]
    caption = [hash(f"{a} {b} {'' if blank(c) else c}".lower()) for a, b, c in zip(name, section, desc)]
    rows = np.arange(row0, row0 + n, dtype=np.int64)
    # a missing hash matches nothing: a key of its own (the row number, tagged so it meets no real hash)
    hkeys = (np.where(np.fromiter((blank(v) for v in hashes), bool, n), mix(rows, np.int64(0x5EED)), _keys(hashes))
             if has_hash else mix(rows, np.int64(0x5EED)))
    paths = [None if blank(v) else v for v in block["s3_path"]]
    return {"split": splits([None if blank(v) else v for v in block["subset"]]),
            "dedup": np.asarray(dedup, np.int64), "caption": np.asarray(caption, np.int64), "path": _keys(paths),
            "hash": hkeys, "country": countries(block.get("country_code") or [None] * n),
            "missing_file": files.missing(paths),
            "bad": np.fromiter((blank(a) or blank(b) or blank(p) for a, b, p in zip(name, section, paths)), bool, n)}


def _foodiml_split(cols: _Columns, rows: np.ndarray, countries: _Codes, check_files: bool,
                   has_hash: bool) -> dict:
    c, p, h = cols.get("caption")[rows], cols.get("path")[rows], cols.get("hash")[rows]
    positives = _union3(c, p, h)
    per_file = np.unique(p, return_counts=True)[1]
    missing = None
    if check_files:
        missing_rows = cols.get("missing_file")[rows]
        missing = int(len(np.unique(p[missing_rows])))
    dups = {"captions": _duplicates(c), "image_files": _duplicates(p)}
    if has_hash:
        dups["image_hashes"] = _duplicates(h)
    n = len(rows)
    # a text matches an image iff their rows share a caption, file or hash: a symmetric relation,
    # so the texts of each image are distributed as the positives of each text
    return {"images": n, "texts": n, "image_files": int(len(per_file)), "positive_pairs": int(positives.sum()),
            "captions_per_image": distribution(positives), "positives_per_text": distribution(positives),
            "rows_per_image_file": distribution(per_file),
            "images_without_text": 0, "texts_without_image": 0, "languages": None,
            "countries": countries.counts(cols.get("country")[rows]),
            "rows_missing_fields": int(cols.get("bad")[rows].sum()), "missing_files": missing, "duplicates": dups}


def foodiml_csv_stats(path: Path, *, image_root: str | Path | None = None, drop_duplicates: bool = True,
                      check_files: bool = True, progress: bool = True) -> dict:
    """The report of a FooDI-ML CSV, streamed (see the module docstring).

    ``images``/``texts`` count rows after ``drop_duplicates`` (one image and one text per row,
    as the reader returns them); ``image_files`` counts distinct ``s3_path``s and
    ``rows_per_image_file`` the rows naming each.
    """
    from .foodiml import CSV_TEXT_COLUMNS
    from .table import bool_option

    drop_duplicates = bool_option("foodiml", "drop_duplicates", drop_duplicates)
    header = _header(path, ",")
    require_columns(path, header, ("product_name", "collection_section", "subset", "s3_path"))
    has_hash = "hash" in header
    wanted = [c for c in (*CSV_TEXT_COLUMNS, "subset", "s3_path", "hash", "country_code") if c in header]
    files = _FileCheck(Path(image_root) if image_root is not None else path.parent, check_files)
    splits, countries, cols, total = _Codes(), _Codes(), _Columns(), 0
    with _row_bar(progress, path) as advance:
        for block in _blocks_csv(path, wanted):
            cols.add(**_foodiml_block(block, has_hash, files, splits, countries, total))
            total += len(block["s3_path"])
            advance(len(block["s3_path"]))
    keep = np.ones(total, dtype=bool)
    if drop_duplicates and total:
        keep[:] = False
        keep[np.unique(cols.get("dedup"), return_index=True)[1]] = True  # the first row of each key
    split_codes = cols.get("split")
    out = {}
    for name, code in sorted(splits.names.items(), key=lambda kv: str(kv[0])):
        if name is None:
            continue
        rows = np.flatnonzero(keep & (split_codes == code))
        if len(rows):
            out[name] = _foodiml_split(cols, rows, countries, check_files, has_hash)
    return {"format": "foodiml", "path": str(path), "streamed": True, "rows": total,
            "duplicate_rows_dropped": int(total - keep.sum()), "rows_without_subset": int(
                (split_codes == splits.names[None]).sum()) if None in splits.names else 0, "splits": out}


def _table_split(cols: _Columns, rows: np.ndarray, langs: _Codes | None, check_files: bool) -> dict:
    image, path, caption = cols.get("image")[rows], cols.get("path")[rows], cols.get("caption")[rows]
    keys, first, texts_per_image = np.unique(image, return_index=True, return_counts=True)
    missing = None
    if check_files:  # distinct files, as the reader-based report counts them
        missing = int(len(np.unique(path[cols.get("missing_file")[rows]])))
    n = len(rows)
    return {"images": int(len(keys)), "texts": n, "positive_pairs": n,
            "captions_per_image": distribution(texts_per_image), "positives_per_text": distribution(np.ones(n, np.int64)),
            "images_without_text": 0, "texts_without_image": 0,
            "languages": langs.counts(cols.get("lang")[rows]) if langs is not None else None,
            "rows_missing_fields": int(cols.get("bad")[rows].sum()), "missing_files": missing,
            "duplicates": {"captions": _duplicates(caption), "image_files": _duplicates(path[first]),
                           "pairs": _duplicates(mix(image, caption))}}


def table_stats(path: Path, *, image_root: str | Path | None = None, check_files: bool = True,
                progress: bool = True) -> dict:
    """The report of a ``table`` file (CSV/TSV/JSONL streamed in blocks, Parquet by row groups).

    Rows are grouped into images as the reader groups them (``image_id``, else ``image``); a
    file without a ``split`` column is one split, ``all``.
    """
    header, blocks = _table_blocks(path, ("image", "caption", "image_id", "split", "lang"))
    require_columns(path, header, ("image", "caption"))
    files = _FileCheck(Path(image_root) if image_root is not None else path.parent, check_files)
    splits, langs = _Codes(), (_Codes() if "lang" in header else None)
    cols, total = _Columns(), 0
    with _row_bar(progress, path) as advance:
        for block in blocks:
            n = len(block["image"])
            image = block["image"]
            ids = block.get("image_id") or [None] * n
            cols.add(image=_keys([i if i not in (None, "") else p for i, p in zip(ids, image)]),
                     path=_keys(image), caption=_keys(block["caption"]),
                     split=splits(block["split"] if "split" in block else ["all"] * n),
                     lang=langs(block["lang"]) if langs is not None else np.zeros(n, np.int32),
                     missing_file=files.missing(image),
                     bad=np.fromiter((not i or not c or not str(c).strip() for i, c in zip(image, block["caption"])),
                                     bool, n))
            total += n
            advance(n)
    split_codes = cols.get("split")
    out = {}
    for name, code in sorted(splits.names.items(), key=lambda kv: str(kv[0])):
        if name is not None:
            out[str(name)] = _table_split(cols, np.flatnonzero(split_codes == code), langs, check_files)
    return {"format": "table", "path": str(path), "streamed": True, "rows": total, "splits": out}


# WebDataset -------------------------------------------------------------------------------
class _Ints:
    """A growing int64 column: Python ints gathered in a short list, packed into arrays."""

    def __init__(self) -> None:
        self.parts: list[np.ndarray] = []
        self.buf: list[int] = []

    def append(self, value: int) -> None:
        self.buf.append(value)
        if len(self.buf) >= BLOCK_ROWS:
            self.parts.append(np.asarray(self.buf, np.int64))
            self.buf = []

    def array(self) -> np.ndarray:
        if self.buf:
            self.parts.append(np.asarray(self.buf, np.int64))
            self.buf = []
        if len(self.parts) > 1:
            self.parts = [np.concatenate(self.parts)]
        return self.parts[0] if self.parts else np.zeros(0, np.int64)


class _Tally:
    """What one split's samples leave behind: keys and integer pairs, never the samples."""

    def __init__(self) -> None:
        self.images = self.texts = 0
        names = ("image_key", "label_key", "text_key", "caption_key", "text_image", "also_text", "also_key")
        self.cols = {name: _Ints() for name in names}
        self.langs: Counter = Counter()

    def add(self, rec: Any) -> None:
        c = self.cols
        c["image_key"].append(hash(rec.image_id))
        c["label_key"].append(hash(rec.label))
        for t in rec.texts:
            c["text_key"].append(hash(t["id"]))
            c["caption_key"].append(hash(t["caption"]))
            c["text_image"].append(self.images)
            self.langs[t.get("lang")] += 1
            for image_id in t.get("also", ()):
                c["also_text"].append(self.texts)
                c["also_key"].append(hash(image_id))
            self.texts += 1
        self.images += 1


def _first_repeat(keys: np.ndarray) -> tuple[int, int] | None:
    """``(j, i)``: the first element ``j`` whose key an earlier element ``i`` already had, or None."""
    if not len(keys):
        return None
    _, first, inverse = np.unique(keys, return_index=True, return_inverse=True)
    first_of = first[inverse.reshape(-1)]  # (N,) first element with each element's key
    repeats = np.flatnonzero(first_of != np.arange(len(keys)))
    return (int(repeats[0]), int(first_of[repeats[0]])) if len(repeats) else None


def _records_at(records: Iterator[Any], wanted: set[int]) -> dict[int, Any]:
    """The records at positions ``wanted`` of a fresh stream (to name a problem's samples)."""
    out: dict[int, Any] = {}
    for k, rec in enumerate(records):
        if k in wanted:
            out[k] = rec
            if len(out) == len(wanted):
                break
    return out


def _check_ids(tally: _Tally, text_image: np.ndarray, restream: Callable[[], Iterator[Any]]) -> None:
    """Raise the reader's error for the first duplicate image or text id, in reading order."""
    img = _first_repeat(tally.cols["image_key"].array())
    txt = _first_repeat(tally.cols["text_key"].array())
    if img is not None and (txt is None or img[0] <= text_image[txt[0]]):
        j, i = img
        recs = _records_at(restream(), {i, j})
        raise DataError(f"{recs[j].loc}: duplicate image id {recs[j].image_id!r} (first at {recs[i].loc})")
    if txt is not None:
        j, i = txt
        a, b = int(text_image[j]), int(text_image[i])
        recs = _records_at(restream(), {a, b})
        text_id = recs[a].texts[j - int(np.searchsorted(text_image, a))]["id"]
        raise DataError(f"{recs[a].loc}: duplicate text id {text_id!r} (first at {recs[b].loc})")


def _also_images(tally: _Tally, text_image: np.ndarray, restream: Callable[[], Iterator[Any]]) -> np.ndarray:
    """The image each ``also`` reference names; the reader's error for one that names no image."""
    image_key, also_key = tally.cols["image_key"].array(), tally.cols["also_key"].array()
    order = np.argsort(image_key, kind="stable")
    pos = np.minimum(np.searchsorted(image_key[order], also_key), max(len(order) - 1, 0))
    known = image_key[order][pos] == also_key if len(order) else np.zeros(len(also_key), bool)
    if not known.all():
        a = int(np.flatnonzero(~known)[0])
        t = int(tally.cols["also_text"].array()[a])
        i = int(text_image[t])
        rec = _records_at(restream(), {i})[i]
        text = rec.texts[t - int(np.searchsorted(text_image, i))]
        image_id = next(x for x in text["also"] if hash(x) == also_key[a])
        raise DataError(f"{rec.loc}: text {text['id']!r} also matches image {image_id!r}, "
                        "which is in none of the shards read")
    return order[pos]


def _tally_report(tally: _Tally, restream: Callable[[], Iterator[Any]]) -> dict:
    """The report :func:`dataset_stats` gives for the dataset the reader would build."""
    text_image = tally.cols["text_image"].array()  # (T,) nondecreasing: texts follow their image
    _check_ids(tally, text_image, restream)
    also_image = _also_images(tally, text_image, restream)
    n = max(tally.images, 1)
    t = np.concatenate([np.arange(tally.texts, dtype=np.int64), tally.cols["also_text"].array()])
    i = np.concatenate([text_image, also_image])
    pairs = np.unique(t * n + i)  # (P,) distinct (text, image) pairs, as GroundTruth.from_pairs keeps them
    positives = np.bincount(pairs // n, minlength=tally.texts)
    texts_per_image = np.bincount(pairs % n, minlength=tally.images)
    languages = None
    if tally.texts and None not in tally.langs:
        languages = dict(tally.langs.most_common())
    dups = {"captions": _duplicates(tally.cols["caption_key"].array()),
            "image_files": _duplicates(tally.cols["label_key"].array())}
    return _split_report(texts_per_image, positives, len(pairs), languages, None, dups)


def webdataset_stats(path: str | Path, *, splits: list[str] | None = None, options: dict | None = None,
                     check_files: bool = True, progress: bool = True) -> dict:
    """The report of WebDataset shards, streamed one sample at a time (see the module docstring).

    Equal to the report of the datasets the reader builds (the same errors for what the reader
    refuses); ``shards`` adds each split's shard count. ``check_files`` has nothing to check:
    images are shard members, and a sample without one is an error, as in the reader.
    """
    from . import webdataset as wds

    opts = wds.reader_options(**(options or {}))
    names = splits or wds.splits(path)
    read_opts = {k: opts[k] for k in ("image_ext", "text_mode", "max_member_bytes")}
    out, shard_counts = {}, {}
    for split in names:
        found = wds.split_shards(path, split, opts["shard_split"])
        tally = _Tally()
        with make_progress(transient=True, enabled=None if progress else False, stderr=True) as bar:
            task = bar.add_task(f"inspecting {split} (shards)", total=len(found.shards))
            for rec in wds.iter_records(found, **read_opts, on_shard=lambda s: bar.advance(task, 1)):
                tally.add(rec)
        if not tally.images:
            raise DataError(f"{path}: the shards hold no samples")
        out[split] = _tally_report(tally, lambda found=found: wds.iter_records(found, **read_opts))
        shard_counts[split] = len(found.shards)
    return {"format": "webdataset", "path": str(path), "streamed": True, "splits": out, "shards": shard_counts}
