"""Generic table format: one row per (image, caption) pair, in CSV, TSV, JSON Lines or Parquet.

Columns: ``image`` (file path) and ``caption`` are required; ``image_id``, ``caption_id``,
``split``, ``lang`` and ``fields.<name>`` columns are optional, anything else is ignored.
Rows naming the same image (same ``image_id``, else the same ``image`` path) share one image;
every row is one text. See docs/data.md for a worked example.

This module also holds the small file-reading helpers the other readers share (tables and
JSON with errors that name the file, line and field).
"""
from __future__ import annotations

import csv
import json
import logging
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np

from ..progress import make_progress
from ..errors import ConfigError, DataError, where
from .base import DATASETS, CrossModalDataset, GroundTruth

logger = logging.getLogger(__name__)

#: File suffix -> table kind understood by :func:`read_table_file`.
TABLE_SUFFIXES = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet"}
_FIELD_PREFIX = "fields."


# shared helpers ---------------------------------------------------------------------------
def check_options(fmt: str, unknown: dict[str, Any], valid: Iterable[str]) -> None:
    """Reject reader options the format does not know, listing the ones it does."""
    if unknown:
        names = ", ".join(sorted(unknown))
        choices = ", ".join(sorted(valid)) or "(none)"
        raise ConfigError(f"dataset format {fmt!r}: unknown option(s) {names}; valid options: {choices}")


def int_option(fmt: str, name: str, value: Any, *, minimum: int = 1) -> int:
    """An integer reader option (ints or digit strings), at least ``minimum``."""
    try:
        if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
            raise ValueError
        out = int(value)
    except (TypeError, ValueError):
        out = None
    if out is None or out < minimum:
        raise ConfigError(f"dataset format {fmt!r}: option {name} must be an integer >= {minimum}, got {value!r}")
    return out


def bool_option(fmt: str, name: str, value: Any) -> bool:
    """A boolean reader option (bools, or true/false/yes/no/1/0 strings)."""
    if isinstance(value, bool):
        return value
    words = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}
    if isinstance(value, (str, int)) and str(value).strip().lower() in words:
        return words[str(value).strip().lower()]
    raise ConfigError(f"dataset format {fmt!r}: option {name} must be true or false, got {value!r}")


def read_json(path: Path) -> Any:
    """Parse a JSON file; syntax errors name the file and line."""
    try:
        with open(path, "rb") as f:
            return parse_json(f.read(), path)
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None


def parse_json(text: str | bytes, path: Path, line: int | None = None) -> Any:
    """``json.loads`` whose every failure is a :class:`DataError` naming ``path`` (and the line).

    ``line``: the file line ``text`` starts on (one JSON Lines record), else the error's own
    line is used. Besides syntax errors this catches what ``json`` raises as other types:
    integers longer than Python's 4300-digit limit (``ValueError``), nesting deeper than the
    recursion limit (``RecursionError``) and bytes that are not UTF-8.
    """
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        at = line if line is not None else exc.lineno
        col = exc.colno if line is None or exc.lineno == 1 else None
        raise DataError(f"{where(path, at)}invalid JSON: {exc.msg}"
                        + (f" (column {col})" if col is not None else "")) from None
    except UnicodeDecodeError as exc:
        raise DataError(f"{where(path, line)}not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except (ValueError, RecursionError) as exc:
        raise DataError(f"{where(path, line)}invalid JSON: {json_failure_reason(exc)}") from None


def json_failure_reason(exc: BaseException) -> str:
    """A short reason for what ``json.loads`` raises besides ``JSONDecodeError``."""
    if isinstance(exc, RecursionError):
        return "nested too deeply"
    if "digits" in str(exc):  # Python's int_max_str_digits guard
        return "a number has more than 4300 digits"
    return " ".join(str(exc).split())


@contextmanager
def progress_bar(description: str, total: float | None) -> Iterator[Callable[[float], None]]:
    """Yield ``advance(n)`` for a rich progress bar on stderr (silent when stderr is not a terminal)."""
    with make_progress(transient=True, enabled=None, stderr=True, percent=True) as bar:
        task = bar.add_task(description, total=total)
        yield lambda n=1: bar.advance(task, n)


def resolve_root(image_root: str | Path | None, default: Path) -> Path:
    """The folder image paths are relative to: ``image_root`` when given, else ``default``."""
    if image_root is None:
        return default
    root = Path(image_root).expanduser()
    if not root.is_dir():
        raise DataError(f"{root}: image_root is not a folder")
    return root


@dataclass
class TableFile:
    """A table read into Python columns; ``lines[r]`` is the source line of data row ``r`` (CSV/JSONL)."""

    path: Path
    columns: dict[str, list]
    lines: list[int] | None

    @property
    def num_rows(self) -> int:
        return len(next(iter(self.columns.values()))) if self.columns else 0

    def loc(self, row: int, field: str | None = None) -> str:
        """Location prefix for messages about ``row`` (0-based data row)."""
        if self.lines is not None:
            return where(self.path, self.lines[row], field)
        label = f"row {row + 1}" + (f", {field}" if field else "")
        return where(self.path, None, label)

    def require(self, *names: str) -> None:
        require_columns(self.path, list(self.columns), names)


def require_columns(path: Path, have: Sequence[str], names: Iterable[str]) -> None:
    """Error naming the file and the missing columns, listing those present."""
    missing = [n for n in names if n not in have]
    if missing:
        raise DataError(f"{path}: missing column(s) {', '.join(missing)}; columns present: "
                        f"{', '.join(have) or '(none)'}")


def read_table_file(path: Path) -> TableFile:
    """Read a CSV, TSV, JSON Lines or Parquet file into columns of Python values (missing = None)."""
    kind = TABLE_SUFFIXES.get(path.suffix.lower())
    if kind is None:
        raise DataError(f"{path}: unsupported table type {path.suffix!r}; use one of {', '.join(TABLE_SUFFIXES)}")
    if kind in ("csv", "tsv"):
        return _read_delimited(path, "\t" if kind == "tsv" else ",")
    if kind == "jsonl":
        return _read_jsonl(path)
    return _read_parquet(path)


def _read_delimited(path: Path, delimiter: str) -> TableFile:
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
    start = 1  # the line the row being read starts on
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            # strict: a stray quote or a quoted field still open at the end of the file is an
            # error (the default parser silently glues the rest of the file into one cell)
            reader = csv.reader(f, delimiter=delimiter, strict=True)
            try:
                header = next(reader)
            except StopIteration:
                raise DataError(f"{path}: empty file, expected a header line") from None
            header = [h.strip() for h in header]
            dup = {h for h in header if header.count(h) > 1}
            if dup:
                raise DataError(f"{where(path, 1)}duplicate column name(s): {', '.join(sorted(dup))}")
            cols: list[list] = [[] for _ in header]
            lines: list[int] = []
            start = reader.line_num + 1
            for row in reader:
                if not row or (len(row) == 1 and not row[0].strip()):
                    start = reader.line_num + 1
                    continue  # blank line
                if len(row) != len(header):
                    raise DataError(f"{where(path, start)}expected {len(header)} fields (as in the header), "
                                    f"got {len(row)}")
                for c, value in zip(cols, row):
                    c.append(value if value != "" else None)
                lines.append(start)
                start = reader.line_num + 1
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except csv.Error as exc:
        end = f" (row ends on line {reader.line_num})" if reader.line_num > start else ""
        raise DataError(f"{where(path, start)}malformed CSV: {exc}{end}") from None
    return TableFile(path, dict(zip(header, cols)), lines)


def _read_jsonl(path: Path) -> TableFile:
    records: list[dict] = []
    lines: list[int] = []
    try:
        with open(path, encoding="utf-8-sig") as f:
            for lineno, text in enumerate(f, 1):
                if not text.strip():
                    continue
                obj = parse_json(text.rstrip("\r\n"), path, lineno)
                if not isinstance(obj, dict):
                    raise DataError(f"{where(path, lineno)}expected a JSON object, got {type(obj).__name__}")
                records.append(obj)
                lines.append(lineno)
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    names: dict[str, None] = {}
    for obj in records:
        names.update(dict.fromkeys(obj))
    columns = {n: [obj.get(n) for obj in records] for n in names}
    return TableFile(path, columns, lines)


def _read_parquet(path: Path) -> TableFile:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as exc:  # pyarrow raises several types for corrupt files
        raise DataError(f"{path}: cannot read Parquet: {exc}") from None
    return TableFile(path, table.to_pydict(), None)


def find_table_file(path: Path) -> Path:
    """``path`` itself, or the one table file inside the folder ``path``."""
    if path.is_file():
        return path
    if not path.is_dir():
        raise DataError(f"{path}: no such file or folder")
    found = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in TABLE_SUFFIXES)
    if len(found) != 1:
        what = ", ".join(p.name for p in found) if found else "none"
        raise DataError(f"{path}: expected exactly one table file ({', '.join(TABLE_SUFFIXES)}) in the folder, "
                        f"found {what}; pass the file itself")
    return found[0]


def _text(value: Any, table: TableFile, row: int, field: str, *, required: bool) -> str | None:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        if required:
            raise DataError(f"{table.loc(row, field)}value is missing")
        return None
    if isinstance(value, bool) or not isinstance(value, (str, int, np.integer)):
        raise DataError(f"{table.loc(row, field)}expected text, got {type(value).__name__} {value!r}")
    value = str(value)
    if required and not value.strip():
        raise DataError(f"{table.loc(row, field)}value is empty")
    return value


# the reader -------------------------------------------------------------------------------
_OPTIONS = ("image_root",)


@DATASETS.register("table")
def read(path: str | Path, split: str, *, image_root: str | Path | None = None,
         **unknown: Any) -> CrossModalDataset:
    """Read the rows of ``split`` from a CSV/TSV/JSONL/Parquet table (or a folder holding one).

    Without a ``split`` column the whole table is one split, returned for any split name;
    ``split="all"`` always returns every row.
    """
    check_options("table", unknown, _OPTIONS)
    file = find_table_file(Path(path))
    table = read_table_file(file)
    table.require("image", "caption")
    cols = table.columns
    n = table.num_rows
    if n == 0:
        raise DataError(f"{file}: no data rows")

    if "split" in cols and split != "all":
        rows = [r for r in range(n) if cols["split"][r] is not None and str(cols["split"][r]) == split]
        if not rows:
            have = ", ".join(sorted({str(s) for s in cols["split"] if s is not None})) or "(none)"
            raise DataError(f"{file}: no rows with split {split!r}; splits present: {have}")
    else:
        if "split" not in cols and split != "all":
            logger.info("%s has no 'split' column: using all %d rows for split %r", file, n, split)
        rows = list(range(n))

    field_names = [c[len(_FIELD_PREFIX):] for c in cols if c.startswith(_FIELD_PREFIX)]
    image_index: dict[str, int] = {}
    image_ids: list[str] = []
    image_paths: list[str] = []
    image_row: list[int] = []
    text_ids: list[str] = []
    captions: list[str] = []
    langs: list[str] | None = [] if "lang" in cols else None
    fields: dict[str, list[str]] = {f: [] for f in field_names}
    text_to_image = np.empty(len(rows), dtype=np.int64)
    seen_text: dict[str, int] = {}

    for t, r in enumerate(rows):
        image = _text(cols["image"][r], table, r, "image", required=True)
        image_id = _text(cols["image_id"][r], table, r, "image_id", required=False) if "image_id" in cols else None
        key = image_id if image_id not in (None, "") else image
        i = image_index.get(key)
        if i is None:
            i = image_index[key] = len(image_ids)
            image_ids.append(key)
            image_paths.append(image)
            image_row.append(r)
        elif image_paths[i] != image:
            raise DataError(f"{table.loc(r, 'image')}image id {key!r} has path {image!r} here but "
                            f"{image_paths[i]!r} at {table.loc(image_row[i]).rstrip(': ')}")
        text_to_image[t] = i
        captions.append(_text(cols["caption"][r], table, r, "caption", required=True))
        tid = _text(cols["caption_id"][r], table, r, "caption_id", required=True) if "caption_id" in cols else str(r)
        if tid in seen_text:
            raise DataError(f"{table.loc(r, 'caption_id')}duplicate caption id {tid!r} "
                            f"(first at {table.loc(seen_text[tid]).rstrip(': ')})")
        seen_text[tid] = r
        text_ids.append(tid)
        if langs is not None:
            langs.append(_text(cols["lang"][r], table, r, "lang", required=True))
        for f in field_names:
            fields[f].append(_text(cols[_FIELD_PREFIX + f][r], table, r, _FIELD_PREFIX + f, required=False) or "")

    root = resolve_root(image_root, file.parent)
    return CrossModalDataset(
        name=file.stem,
        split=split,
        image_ids=image_ids,
        text_ids=text_ids,
        captions=captions,
        gt=GroundTruth.from_map(text_to_image, len(image_ids)),
        image_paths=image_paths,
        langs=langs,
        fields=fields or None,
        root=root,
        meta={"format": "table", "source": str(file)},
    )


def splits(path: str | Path) -> list[str]:
    """Split names in the table (``["all"]`` when it has no ``split`` column)."""
    table = read_table_file(find_table_file(Path(path)))
    if "split" not in table.columns:
        return ["all"]
    return sorted({str(s) for s in table.columns["split"] if s is not None})
