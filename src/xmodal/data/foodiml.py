"""FooDI-ML (Glovo): the released CSV, or the Parquet its benchmark preprocessing writes.

CSV columns: ``country_code, city_code, store_name, product_name, collection_section,
product_description, subset, HIER, s3_path`` (plus ``hash`` when image hashes were added,
and a leading unnamed index column when the file was re-saved by pandas). Parquet columns:
``caption, s3_path, country_code, hash, img_id`` partitioned by ``split=train|val|test``.

Each row is one (image, caption) pair, as in the original: one image per row. The ground
truth is duplicate-aware like the original ``compute_valid_answers``: a text matches its own
image, every image whose row has the same caption, and every image with the same file
(``s3_path``) or the same content hash. It is built by grouping with hash maps, in time linear
in the rows plus the positive pairs, instead of the original loop over all rows per row.
"""
from __future__ import annotations

import csv
import hashlib
import logging
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..errors import DataError
from .base import DATASETS, CrossModalDataset, GroundTruth
from .table import bool_option, check_options, progress_bar, require_columns, resolve_root

logger = logging.getLogger(__name__)

_OPTIONS = ("image_root", "drop_duplicates", "hash_files")
_SPLIT_ALIASES = {"dev": "val"}  # the original adapter maps 'dev' to 'val'
CSV_TEXT_COLUMNS = ("product_name", "collection_section", "product_description")
_CSV_REQUIRED = ("product_name", "collection_section", "subset", "s3_path")
_PARQUET_REQUIRED = ("caption", "s3_path")


# ground truth -----------------------------------------------------------------------------
def group_ids(keys: Sequence[Any]) -> np.ndarray:
    """Dense group id per key (equal keys, equal ids), by one pass over a hash map."""
    index: dict[Any, int] = {}
    return np.fromiter((index.setdefault(k, len(index)) for k in keys), dtype=np.int64, count=len(keys))


def _gather(query_group: np.ndarray, member_group: np.ndarray,
            member_value: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pairs ``(q, member_value[m])`` for every query ``q`` and member ``m`` of the query's group."""
    num_groups = int(max(query_group.max(initial=-1), member_group.max(initial=-1))) + 1
    order = np.argsort(member_group, kind="stable")
    values = member_value[order]
    counts = np.bincount(member_group, minlength=num_groups)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    per_query = counts[query_group]
    total = int(per_query.sum())
    q = np.repeat(np.arange(len(query_group), dtype=np.int64), per_query)
    first = np.repeat(starts[query_group], per_query)
    offset = np.arange(total, dtype=np.int64) - np.repeat(np.cumsum(per_query) - per_query, per_query)
    return q, values[first + offset]


def duplicate_aware_gt(captions: Sequence[str], text_image: np.ndarray,
                       image_keys: Sequence[Sequence[Any]], num_images: int) -> GroundTruth:
    """Text ``t`` matches image ``text_image[t]``, the images of texts with the same caption, and
    every image sharing any of the per-image keys (e.g. file path, content hash) with its image.

    ``image_keys`` is a list of key columns, each with one key per image; ``None`` keys never match.
    """
    text_image = np.asarray(text_image, dtype=np.int64)
    m = len(text_image)
    t_parts = [np.arange(m, dtype=np.int64)]
    i_parts = [text_image]
    cap_group = group_ids(captions)
    t, i = _gather(cap_group, cap_group, text_image)
    t_parts.append(t)
    i_parts.append(i)
    for keys in image_keys:
        # each None key gets its own group, so a missing hash matches nothing else
        group = group_ids([k if k is not None else (None, n) for n, k in enumerate(keys)])
        t, i = _gather(group[text_image], group, np.arange(num_images, dtype=np.int64))
        t_parts.append(t)
        i_parts.append(i)
    return GroundTruth.from_pairs(np.concatenate(t_parts), np.concatenate(i_parts), m, num_images)


# reading ----------------------------------------------------------------------------------
def _find_source(path: Path) -> tuple[str, Path]:
    """('csv' | 'parquet', path) for a CSV file, a Parquet file, or a folder holding either."""
    if path.is_file():
        kind = {".csv": "csv", ".parquet": "parquet"}.get(path.suffix.lower())
        if kind is None:
            raise DataError(f"{path}: expected the FooDI-ML .csv or a .parquet file")
        return kind, path
    if not path.is_dir():
        raise DataError(f"{path}: no such file or folder")
    for folder in (path, path / "samples"):
        if folder.is_dir() and any(p.is_dir() and p.name.startswith("split=") for p in folder.iterdir()):
            return "parquet", folder
    csvs = sorted(path.glob("*.csv"))
    if len(csvs) == 1:
        return "csv", csvs[0]
    parquets = sorted(path.glob("*.parquet"))
    if len(parquets) == 1 and not csvs:
        return "parquet", parquets[0]
    raise DataError(f"{path}: expected one FooDI-ML .csv, a .parquet file, or a 'samples' folder partitioned "
                    "by split=...; pass the file itself")


def _csv_header(path: Path) -> list[str]:
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            return [h.strip() for h in next(csv.reader(f))]
    except StopIteration:
        raise DataError(f"{path}: empty file, expected a header line") from None
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None


def _read_csv(path: Path, split: str, drop_duplicates: bool) -> tuple[dict[str, list], list[str]]:
    """Rows of ``split`` as Python columns, plus their ids (0-based data row numbers)."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.csv as pacsv

    header = _csv_header(path)
    require_columns(path, header, _CSV_REQUIRED)
    wanted = [c for c in (*CSV_TEXT_COLUMNS, "subset", "s3_path", "hash", "country_code") if c in header]
    try:
        table = pacsv.read_csv(
            path,
            parse_options=pacsv.ParseOptions(newlines_in_values=True),
            convert_options=pacsv.ConvertOptions(include_columns=wanted,
                                                 column_types={c: pa.string() for c in wanted}),
        )
    except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
        raise DataError(f"{path}: malformed CSV: {exc}") from None
    table = table.append_column("_row", pa.array(np.arange(table.num_rows, dtype=np.int64)))
    if drop_duplicates:
        # The original preprocessing drops rows repeating (name, section, description, hash),
        # over the whole file and before splitting; without a hash column the file path stands in.
        keys = [c for c in (*CSV_TEXT_COLUMNS, "hash" if "hash" in header else "s3_path") if c in header]
        first = table.group_by(keys, use_threads=False).aggregate([("_row", "min")])["_row_min"]
        before = table.num_rows
        table = table.filter(pc.is_in(table["_row"], value_set=first))
        if table.num_rows < before:
            logger.info("%s: dropped %d duplicate rows", path, before - table.num_rows)
    present = sorted({s for s in table["subset"].to_pylist() if s})
    table = table.filter(pc.equal(table["subset"], split))
    if table.num_rows == 0:
        raise DataError(f"{path}: no rows with subset {split!r}; subsets present: {', '.join(present) or '(none)'}")
    # empty cells come back as "" (not null); treat them as missing like pandas does
    cols = {c: [v if v and v.strip() else None for v in table[c].to_pylist()] for c in wanted}
    rows = table["_row"].to_pylist()
    for name in ("product_name", "collection_section", "s3_path"):
        for r, value in zip(rows, cols[name]):
            if value is None:
                raise DataError(f"{path}: data row {r + 1} [{name}]: value is missing")
    description = cols.get("product_description", [None] * len(rows))
    # Caption as the benchmark preprocessing builds it: name, section and description (missing
    # description = empty) joined by single spaces, lower-cased; the trailing space it leaves
    # when the description is missing is kept so captions compare equal to the original's.
    cols["caption"] = [f"{n} {s} {d or ''}".lower()
                       for n, s, d in zip(cols["product_name"], cols["collection_section"], description)]
    cols["product_description"] = [d or "" for d in description]
    return cols, [str(r) for r in rows]


def _read_parquet(path: Path, split: str) -> tuple[dict[str, list], list[str]]:
    import pyarrow as pa
    import pyarrow.dataset as ds

    try:
        dataset = ds.dataset(path, format="parquet", partitioning="hive")
        names = dataset.schema.names
        require_columns(path, names, _PARQUET_REQUIRED)
        columns = [c for c in ("caption", "s3_path", "hash", "img_id", "country_code") if c in names]
        if "split" in names:
            table = dataset.to_table(columns=columns, filter=ds.field("split") == split)
            if table.num_rows == 0:
                present = sorted({str(s) for s in dataset.to_table(columns=["split"])["split"].to_pylist()})
                raise DataError(f"{path}: no rows with split {split!r}; splits present: {', '.join(present)}")
        else:
            logger.info("%s has no 'split' column: using all rows for split %r", path, split)
            table = dataset.to_table(columns=columns)
    except (pa.ArrowInvalid, pa.ArrowTypeError, OSError) as exc:
        raise DataError(f"{path}: cannot read Parquet: {exc}") from None
    cols = {c: [None if v is None else str(v) for v in table[c].to_pylist()] for c in columns}
    ids = cols.pop("img_id", None) or [str(r) for r in range(table.num_rows)]
    for name in ("caption", "s3_path"):
        for r, value in enumerate(cols[name]):
            if not value or not value.strip():
                raise DataError(f"{path}: row {r + 1} of split {split!r} [{name}]: value is missing")
    seen: dict[str, int] = {}
    for r, i in enumerate(ids):
        if seen.setdefault(i, r) != r:
            raise DataError(f"{path}: row {r + 1} of split {split!r} [img_id]: duplicate id {i!r}")
    return cols, ids


def _hash_files(paths: list[str], root: Path) -> list[str | None]:
    """SHA-1 of each existing image file (None where the file is missing); each path read once."""
    cache: dict[str, str | None] = {}
    with progress_bar("hashing images", len(paths)) as advance:
        for p in paths:
            if p not in cache:
                file = Path(p) if Path(p).is_absolute() else root / p
                cache[p] = hashlib.sha1(file.read_bytes()).hexdigest() if file.is_file() else None
            advance(1)
    missing = sum(v is None for v in cache.values())
    if missing:
        logger.warning("hash_files: %d of %d image files not found under %s; they match by path only",
                       missing, len(cache), root)
    return [cache[p] for p in paths]


def splits(path: str | Path) -> list[str]:
    """Split names present (``subset`` values of the CSV, ``split`` partitions of the Parquet)."""
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.dataset as ds

    kind, source = _find_source(Path(path))
    if kind == "csv":
        require_columns(source, _csv_header(source), ("subset",))
        column = pacsv.read_csv(source, parse_options=pacsv.ParseOptions(newlines_in_values=True),
                                convert_options=pacsv.ConvertOptions(include_columns=["subset"],
                                                                     column_types={"subset": pa.string()}))["subset"]
    else:
        dataset = ds.dataset(source, format="parquet", partitioning="hive")
        if "split" not in dataset.schema.names:
            return ["all"]
        column = dataset.to_table(columns=["split"])["split"]
    return sorted({str(s) for s in column.to_pylist() if s})


@DATASETS.register("foodiml")
def read(path: str | Path, split: str, *, image_root: str | Path | None = None,
         drop_duplicates: bool = True, hash_files: bool = False, **unknown: Any) -> CrossModalDataset:
    """Read one split of FooDI-ML from the CSV or the preprocessed Parquet.

    ``drop_duplicates`` (CSV only) drops repeated (name, section, description, hash) rows as
    the benchmark preprocessing does. ``hash_files`` hashes the image files' bytes when the data
    has no ``hash`` column, so identical images under different paths also match.
    """
    check_options("foodiml", unknown, _OPTIONS)
    drop_duplicates = bool_option("foodiml", "drop_duplicates", drop_duplicates)
    hash_files = bool_option("foodiml", "hash_files", hash_files)
    kind, source = _find_source(Path(path))
    split_name = _SPLIT_ALIASES.get(split, split)
    if kind == "csv":
        cols, ids = _read_csv(source, split_name, drop_duplicates)
        default_root = source.parent
    else:
        cols, ids = _read_parquet(source, split_name)
        default_root = source.parent if source.is_file() or source.name == "samples" else source
    root = resolve_root(image_root, default_root)

    paths = cols["s3_path"]
    hashes = cols.get("hash")
    if hash_files and (hashes is None or any(h is None for h in hashes)):
        computed = _hash_files(paths, root)
        hashes = computed if hashes is None else [h if h is not None else c for h, c in zip(hashes, computed)]
    n = len(ids)
    gt = duplicate_aware_gt(cols["caption"], np.arange(n, dtype=np.int64),
                            [paths] + ([hashes] if hashes is not None else []), n)
    logger.info("foodiml/%s: %d pairs, %d positives after duplicate matching", split, n, gt.nnz)
    fields = ({c: [v or "" for v in cols[c]] for c in CSV_TEXT_COLUMNS} if kind == "csv" else None)
    return CrossModalDataset(
        name="foodiml",
        split=split,
        image_ids=list(ids),
        text_ids=list(ids),
        captions=cols["caption"],
        gt=gt,
        image_paths=list(paths),
        image_hashes=list(hashes) if hashes is not None and all(h is not None for h in hashes) else None,
        fields=fields,
        root=root,
        meta={"format": "foodiml", "source": str(source),
              "country_code": cols.get("country_code")},
    )
