"""Streaming a JSON file whose top level is one large array, one element at a time.

Recipe1M's ``layer1.json`` is a 1.7 GB array of about a million recipes: ``json.load`` holds
the file's bytes and the whole parsed tree (about four times the file) at once, 9.9 GB at
full size. :func:`iter_json_array` reads the file in chunks and decodes one element at a time
with the standard library's own decoder, so memory stays at one chunk plus what the caller
keeps. Errors are :class:`~xmodal.errors.DataError` naming the file and line, as
:func:`xmodal.data.table.read_json` does.
"""
from __future__ import annotations

import codecs
import json
from pathlib import Path
from typing import Any, Iterator

from ..errors import DataError, where

#: bytes read at a time
CHUNK_BYTES = 1 << 22
_WS = " \t\n\r"


class _Buffer:
    """Decoded text of the file read so far, less what has been consumed; knows its line."""

    def __init__(self, fh, path: Path, chunk: int):
        self.fh, self.path, self.chunk = fh, path, chunk
        self.decoder = codecs.getincrementaldecoder("utf-8-sig")()
        self.text, self.pos, self.eof, self.line0 = "", 0, False, 1
        self.consumed = 0  # characters dropped from the front of ``text``

    def more(self) -> bool:
        """Read one more chunk; False at the end of the file."""
        if self.eof:
            return False
        data = self.fh.read(self.chunk)
        try:
            text = self.decoder.decode(data, final=not data)
        except UnicodeDecodeError as exc:
            raise DataError(f"{self.where_at(len(self.text))}not UTF-8 text ({exc.reason})") from None
        if not data:
            self.eof = True
            self.text += text
            return bool(text)
        if self.pos > self.chunk:  # drop what has been consumed, keeping the line count
            self.line0 += self.text.count("\n", 0, self.pos)
            self.consumed += self.pos
            self.text, self.pos = self.text[self.pos:], 0
        self.text += text
        return True

    def skip_ws(self) -> str | None:
        """The next non-blank character (not consumed), or None at the end of the file."""
        while True:
            while self.pos < len(self.text) and self.text[self.pos] in _WS:
                self.pos += 1
            if self.pos < len(self.text):
                return self.text[self.pos]
            if not self.more():
                return None

    def where_at(self, pos: int) -> str:
        return where(self.path, self.line0 + self.text.count("\n", 0, pos))


_KINDS = {"{": "an object", '"': "a string", "t": "true", "f": "false", "n": "null",
          **{c: "a number" for c in "-0123456789"}}
_NUMBER_CHARS = frozenset("0123456789+-.eE")


def _runs_to_the_end(text: str, end: int) -> bool:
    """True when only number characters follow ``end`` up to the end of ``text``."""
    return all(c in _NUMBER_CHARS for c in text[end:end + 64]) and len(text) - end <= 64


def _decode_next(buf: _Buffer, decoder: json.JSONDecoder) -> Any:
    """Decode the element at ``buf.pos``, reading more of the file while it is cut off."""
    while True:
        try:
            value, end = decoder.raw_decode(buf.text, buf.pos)
        except json.JSONDecodeError as exc:
            if buf.more():
                continue
            raise DataError(f"{buf.where_at(exc.pos)}invalid JSON: {exc.msg}") from None
        except (ValueError, RecursionError) as exc:
            raise DataError(f"{buf.where_at(buf.pos)}invalid JSON: {exc}") from None
        if not isinstance(value, (dict, list, str)) and _runs_to_the_end(buf.text, end) and buf.more():
            continue  # a number cut by the chunk ("12" | "3.5e-7") goes on in the next chunk
        buf.pos = end
        return value


def iter_json_array(path: str | Path, chunk: int = CHUNK_BYTES) -> Iterator[Any]:
    """Yield the elements of the JSON array that is ``path``'s whole content, in order."""
    path = Path(path)
    decoder = json.JSONDecoder()
    try:
        fh = open(path, "rb")
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    with fh:
        buf = _Buffer(fh, path, chunk)
        first = buf.skip_ws()
        if first != "[":
            got = "an empty file" if first is None else _KINDS.get(first, f"text starting {first!r}")
            raise DataError(f"{path}: expected a JSON list of objects, got {got}")
        buf.pos += 1
        if buf.skip_ws() == "]":
            buf.pos += 1
        else:
            while True:
                if buf.skip_ws() is None:
                    raise DataError(f"{buf.where_at(buf.pos)}invalid JSON: the list is not closed (file ends)")
                yield _decode_next(buf, decoder)
                sep = buf.skip_ws()
                if sep == ",":
                    buf.pos += 1
                    continue
                if sep == "]":
                    buf.pos += 1
                    break
                raise DataError(f"{buf.where_at(buf.pos)}invalid JSON: expected ',' or ']' after a list element"
                                + (", the file ends" if sep is None else f", got {sep!r}"))
        if buf.skip_ws() is not None:
            raise DataError(f"{buf.where_at(buf.pos)}invalid JSON: extra data after the list")
