"""Translations of a dataset's texts: a file format, a translator interface, augmentation.

X-MRS trains on recipes machine-translated into other languages (en->de, en->ru, en->fr,
...) and on back-translations (en->de->en, en->ru->en) used as English paraphrases. No
machine-translation model runs offline here: users translate with their own model behind
the :class:`Translator` interface (:func:`make_translations` writes the file), or bring a
translations file made elsewhere. Training reads the file (``data.train_options:
{translations: FILE}``, see :mod:`xmodal.data.pipeline`) and adds every row as another
version of its source text.

File format (CSV / TSV with a header, or JSONL objects), one row per translated text:

- ``id``: the source text's id in the dataset (a Recipe1M recipe id, an emoji text id);
- ``lang``: the language of ``text``; ``de>en`` marks a back-translation into English via
  German (a paraphrase of the English original);
- ``text``: the translation;
- ``field`` (optional): which field of a multi-field text the row translates (``title``,
  ``ingredients``, ``instructions``); absent = the caption / single field.
"""
from __future__ import annotations

import csv
import io
import json
import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterable, Protocol, Sequence

import numpy as np

from ..errors import DataError, where
from .base import CrossModalDataset, GroundTruth
from .table import json_failure_reason

log = logging.getLogger(__name__)

COLUMNS = ("id", "lang", "text")
SUFFIXES = (".csv", ".tsv", ".jsonl")


@dataclass(frozen=True)
class TranslationRow:
    """One translated text; ``via`` is the pivot language of a back-translation."""

    id: str
    lang: str
    text: str
    field: str | None = None
    via: str | None = None

    @property
    def tag(self) -> str:
        """The language as written in the file (``de>en`` for back-translations)."""
        return f"{self.via}>{self.lang}" if self.via else self.lang


def _parse_lang(raw: object, path: Path, line: int) -> tuple[str, str | None]:
    if not isinstance(raw, str) or not raw.strip():
        raise DataError(f"{where(path, line, 'lang')}expected a language code such as 'de' (or 'de>en' "
                        f"for a back-translation), got {raw!r}")
    parts = [p.strip() for p in raw.split(">")]
    if len(parts) == 1:
        return parts[0], None
    if len(parts) == 2 and all(parts):
        return parts[1], parts[0]
    raise DataError(f"{where(path, line, 'lang')}{raw!r} is not a language: use 'xx' for a translation or "
                    "'xx>yy' for a back-translation into yy via xx")


def _row(obj: dict, path: Path, line: int) -> TranslationRow:
    for col in COLUMNS:
        if col not in obj or obj[col] is None:
            raise DataError(f"{where(path, line, col)}missing; a translations row needs id, lang, text "
                            "(and optionally field)")
    rid, text = obj["id"], obj["text"]
    if not isinstance(rid, (str, int)) or isinstance(rid, bool) or not str(rid).strip():
        raise DataError(f"{where(path, line, 'id')}expected the id of a dataset text, got {rid!r}")
    if not isinstance(text, str) or not text.strip():
        raise DataError(f"{where(path, line, 'text')}expected a non-empty string, got {text!r}")
    field = obj.get("field")
    if field == "":  # an empty cell of an optional column
        field = None
    if field is not None and (not isinstance(field, str) or not field.strip()):
        raise DataError(f"{where(path, line, 'field')}expected a field name such as 'title', got {field!r}")
    lang, via = _parse_lang(obj["lang"], path, line)
    return TranslationRow(str(rid).strip(), lang, text.strip(), field.strip() if field else None, via)


def read_translations(path: str | Path) -> list[TranslationRow]:
    """Read a translations file (``.csv``, ``.tsv`` or ``.jsonl``); errors name file and line."""
    path = Path(path)
    if path.suffix not in SUFFIXES:
        raise DataError(f"{path}: translations must be a .csv, .tsv or .jsonl file")
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"{path}: translations file not found") from None
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: translations must be UTF-8 text ({exc})") from None
    rows: list[TranslationRow] = []
    if path.suffix == ".jsonl":
        # split on "\n" only: str.splitlines would also break inside texts at U+2028, U+0085,
        # form feeds..., which JSON (and write_translations) leave unescaped
        for line, raw in enumerate(text.split("\n"), start=1):
            if not raw.strip():
                continue
            try:
                obj = json.loads(raw)
            except json.JSONDecodeError as exc:
                raise DataError(f"{where(path, line)}not a JSON object ({exc.msg})") from None
            except (ValueError, RecursionError) as exc:  # e.g. a 5000-digit number, deep nesting
                raise DataError(f"{where(path, line)}not a JSON object ({json_failure_reason(exc)})") from None
            if not isinstance(obj, dict):
                raise DataError(f"{where(path, line)}expected a JSON object with id, lang, text")
            rows.append(_row(obj, path, line))
    else:
        # newline="" keeps line breaks inside quoted cells (multi-line ingredient lists)
        # strict: a stray quote or an unterminated quoted text is an error, not glued text
        reader = csv.reader(io.StringIO(text, newline=""), delimiter="\t" if path.suffix == ".tsv" else ",",
                            strict=True)
        try:
            return _csv_rows(reader, path)
        except csv.Error as exc:
            raise DataError(f"{where(path, reader.line_num)}malformed CSV: {exc}") from None
    if not rows:
        raise DataError(f"{path}: no translations")
    return rows


def _csv_rows(reader: Any, path: Path) -> list[TranslationRow]:
    """The rows of a CSV / TSV translations file (header first)."""
    header = next(reader, None)
    if header is None:
        raise DataError(f"{path}: empty translations file (expected a header: id, lang, text)")
    header = [h.strip() for h in header]
    missing = [c for c in COLUMNS if c not in header]
    if missing:
        raise DataError(f"{where(path, 1)}header lacks {', '.join(missing)}; expected columns id, lang, text "
                        f"(and optionally field), got {', '.join(header)}")
    rows: list[TranslationRow] = []
    for values in reader:
        line = reader.line_num  # the file line where this row ends
        if not values or not any(v.strip() for v in values):
            continue
        if len(values) != len(header):
            raise DataError(f"{where(path, line)}{len(values)} columns, the header has {len(header)} "
                            "(quote texts that contain the delimiter)")
        rows.append(_row(dict(zip(header, values)), path, line))
    if not rows:
        raise DataError(f"{path}: no translations")
    return rows


def write_translations(rows: Iterable[TranslationRow], path: str | Path) -> Path:
    """Write rows as CSV, TSV or JSONL (by suffix), atomically."""
    from ..utils import atomic_write_text

    path = Path(path)
    if path.suffix not in SUFFIXES:
        raise DataError(f"{path}: translations must be written as .csv, .tsv or .jsonl")
    rows = list(rows)
    with_field = any(r.field for r in rows)
    if path.suffix == ".jsonl":
        out = "".join(json.dumps({"id": r.id, "lang": r.tag, "text": r.text,
                                  **({"field": r.field} if r.field else {})}, ensure_ascii=False) + "\n"
                      for r in rows)
    else:
        buf = io.StringIO()
        w = csv.writer(buf, delimiter="\t" if path.suffix == ".tsv" else ",", lineterminator="\n")
        w.writerow([*COLUMNS, *(["field"] if with_field else [])])
        for r in rows:
            w.writerow([r.id, r.tag, r.text, *([r.field or ""] if with_field else [])])
        out = buf.getvalue()
    atomic_write_text(path, out)
    return path


# translators -------------------------------------------------------------------------------
class Translator(Protocol):
    """A machine-translation system: ``translate(texts, src, tgt) -> translations``.

    Back it with any model (e.g. fairseq's WMT'19 transformers, as X-MRS used, or a Marian
    model from ``transformers``); nothing here downloads or runs one.
    """

    def translate(self, texts: Sequence[str], src: str, tgt: str) -> list[str]: ...


class FileTranslator:
    """A :class:`Translator` answering from a translations file.

    A source text is found by its id: ``sources`` maps ids to source-language texts (the
    dataset's originals), and rows of the file in the source language add more. Translating
    a ``de`` text into ``en`` returns the file's ``de>en`` back-translation when it has one.
    Asking for a text or a language the file lacks is a :class:`DataError` naming the file.
    """

    def __init__(self, rows: Sequence[TranslationRow], sources: dict[str, str] | None = None, *,
                 source_lang: str = "en", path: str | Path = "<translations>") -> None:
        self.path = str(path)
        self.source_lang = source_lang
        self._text: dict[tuple[str, str], str] = {}
        self._ids: dict[tuple[str, str], str] = {}
        for rid, text in (sources or {}).items():
            self._add(rid, source_lang, text)
        for r in rows:
            if r.field is None:
                self._add(r.id, r.tag, r.text)

    @classmethod
    def from_file(cls, path: str | Path, sources: dict[str, str] | None = None, *,
                  source_lang: str = "en") -> "FileTranslator":
        return cls(read_translations(path), sources, source_lang=source_lang, path=path)

    def _add(self, rid: str, lang: str, text: str) -> None:
        self._text.setdefault((rid, lang), text)
        self._ids.setdefault((lang, text), rid)

    def languages(self) -> list[str]:
        return sorted({lang for _, lang in self._text})

    def translate(self, texts: Sequence[str], src: str, tgt: str) -> list[str]:
        out = []
        for text in texts:
            rid = self._ids.get((src, text))
            if rid is None:
                raise DataError(f"{self.path}: no {src!r} text {text!r} to translate from")
            # from a translation back to the source language, the stored back-translation
            got = self._text.get((rid, f"{src}>{tgt}"), self._text.get((rid, tgt)))
            if got is None:
                have = ", ".join(sorted(lang for (i, lang) in self._text if i == rid))
                raise DataError(f"{self.path}: text {rid!r} has no {tgt!r} translation (it has: {have})")
            out.append(got)
        return out


def back_translate(translator: Translator, texts: Sequence[str], src: str, pivot: str) -> list[str]:
    """``src -> pivot -> src`` round trips: paraphrases of ``texts`` (X-MRS's back-translation)."""
    return translator.translate(translator.translate(texts, src, pivot), pivot, src)


def make_translations(translator: Translator, ids: Sequence[str], texts: Sequence[str], langs: Sequence[str], *,
                      src: str = "en", back: Sequence[str] = (), field: str | None = None,
                      batch_size: int = 256) -> list[TranslationRow]:
    """Translate ``texts`` into every language of ``langs`` (and back-translate via ``back``).

    Every requested language is passed to the translator as asked (the original X-MRS script
    loads its German model whatever language it is given; this does not).
    """
    if len(ids) != len(texts):
        raise ValueError(f"{len(ids)} ids for {len(texts)} texts")
    rows: list[TranslationRow] = []
    for start in range(0, len(texts), batch_size):
        chunk_ids, chunk = list(ids[start:start + batch_size]), list(texts[start:start + batch_size])
        for lang in langs:
            for rid, t in zip(chunk_ids, translator.translate(chunk, src, lang)):
                rows.append(TranslationRow(rid, lang, t, field))
        for pivot in back:
            for rid, t in zip(chunk_ids, back_translate(translator, chunk, src, pivot)):
                rows.append(TranslationRow(rid, src, t, field, via=pivot))
    return rows


# augmentation ------------------------------------------------------------------------------
def augment_dataset(ds: CrossModalDataset, rows: Sequence[TranslationRow], *, source_lang: str = "en",
                    langs: Sequence[str] | None = None, path: str | Path = "<translations>") -> CrossModalDataset:
    """Add every translated row as another text with the positives of its source text.

    New text ids are ``<id>@<lang>`` (``<id>@de>en`` for a back-translation), tagged with the
    row's language (back-translations with the target language). For multi-field texts the
    rows carry a ``field``; a field without a translation keeps the original's. ``langs``
    keeps only those languages (file tags, e.g. ``de`` or ``de>en``). Rows whose id is not in
    the split are skipped (a file may cover every split); a file matching nothing is an error.
    """
    index = {tid: k for k, tid in enumerate(ds.text_ids)}
    keep = None if langs is None else set(langs)
    versions: dict[tuple[str, str], dict[str | None, str]] = {}
    unknown_fields = set()
    for r in rows:
        if keep is not None and r.tag not in keep:
            continue
        if r.id not in index:
            continue
        if r.field is not None and (ds.fields is None or r.field not in ds.fields):
            unknown_fields.add(r.field)
            continue
        versions.setdefault((r.id, r.tag), {})[r.field] = r.text
    if unknown_fields:
        have = ", ".join(sorted(ds.fields or {})) or "(none: single-field texts)"
        raise DataError(f"{path}: rows name fields {', '.join(sorted(unknown_fields))} that "
                        f"{ds.name}/{ds.split} does not have (its fields: {have})")
    if not versions:
        raise DataError(f"{path}: no row matches a text id of {ds.name}/{ds.split} "
                        f"(ids look like {ds.text_ids[0]!r})")
    text_ids, captions = list(ds.text_ids), list(ds.captions)
    text_langs = list(ds.langs or [source_lang] * ds.num_texts)
    fields = {k: list(v) for k, v in ds.fields.items()} if ds.fields else None
    new_t, new_i = [], []
    t_src, i_src = ds.gt.pairs()
    by_text = np.split(i_src, np.cumsum(ds.gt.counts())[:-1]) if ds.num_texts else []
    for (rid, tag), parts in versions.items():
        src = index[rid]
        lang = tag.split(">")[-1]
        caption = parts.get(None)
        if fields is not None:
            first = next(iter(fields))
            for name, vals in fields.items():
                if name in parts:
                    vals.append(parts[name])
                elif name == first and None in parts:  # a field-less row translates the caption field
                    vals.append(parts[None])
                else:
                    vals.append(vals[src])
            caption = caption or parts.get(first) or captions[src]
        t = len(text_ids)
        text_ids.append(f"{rid}@{tag}")
        captions.append(caption if caption is not None else captions[src])
        text_langs.append(lang)
        for img in by_text[src]:
            new_t.append(t)
            new_i.append(int(img))
    t_all = np.concatenate([t_src, np.asarray(new_t, dtype=np.int64)])
    i_all = np.concatenate([i_src, np.asarray(new_i, dtype=np.int64)])
    gt = GroundTruth.from_pairs(t_all, i_all, len(text_ids), ds.num_images)
    log.info("%s/%s: %d translated texts added from %s", ds.name, ds.split, len(versions), path)
    return replace(ds, text_ids=text_ids, captions=captions, langs=text_langs, fields=fields, gt=gt,
                   meta={**ds.meta, "translations": str(path)})


def load_and_augment(ds: CrossModalDataset, paths: str | Path | Sequence[str | Path], *,
                     source_lang: str = "en", langs: Sequence[str] | None = None) -> CrossModalDataset:
    """:func:`augment_dataset` with the rows of one or several translations files."""
    for p in [paths] if isinstance(paths, (str, Path)) else list(paths):
        ds = augment_dataset(ds, read_translations(p), source_lang=source_lang, langs=langs, path=p)
    return ds
