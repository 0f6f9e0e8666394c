"""retrieve-corpus (Vokenization): the best images for every sentence of a large text file.

Streamed and resumable: one JSON line per sentence, a progress file beside the output.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from ..progress import make_progress
from ..errors import ConfigError, DataError, XmodalError, where
from ..index import Index
from ..utils import atomic_write_json
from .query import check_k, encode_text_queries

log = logging.getLogger(__name__)

#: The corpus signature hashes this many leading bytes (with the size and mtime).
HEAD_BYTES = 1 << 20
PROGRESS_SUFFIX = ".progress.json"
PROGRESS_FORMAT = "xmodal-retrieve-corpus"
#: Line breaks to ``str.splitlines`` that ``json.dumps(ensure_ascii=False)`` leaves raw; escaped
#: so that one output record is always one line for every JSONL reader.
_LINE_BREAKS = str.maketrans({"\x85": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"})


def corpus_signature(path: Path) -> dict[str, Any]:
    """Size, mtime and sha256 of the first MiB: detects a corpus changed between runs."""
    st = path.stat()
    with open(path, "rb") as fh:
        head = fh.read(HEAD_BYTES)
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "head_sha256": hashlib.sha256(head).hexdigest()}


def progress_path(out: Path) -> Path:
    return out.with_name(out.name + PROGRESS_SUFFIX)


def _lock(fh: Any, path: Path) -> None:
    try:
        import fcntl
    except ImportError:  # Windows: one writer assumed
        return
    try:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        raise XmodalError(f"{where(path)}another retrieve-corpus is writing this file") from None


def _sentences(fh: Any, first_line: int, corpus: Path, stats: dict[str, int]) -> Iterator[tuple[int, str, int]]:
    """(line number, text, byte offset after the line) of each non-empty line, read lazily."""
    n = first_line - 1
    for raw in fh:
        n += 1
        text = raw.decode("utf-8", errors="replace")
        if "\ufffd" in text and b"\xef\xbf\xbd" not in raw:
            stats["bad_utf8"] += 1
            if stats["bad_utf8"] == 1:
                log.warning("%sinvalid UTF-8 replaced by U+FFFD", where(corpus, n))
        text = text.strip()
        stats["lines"] = n
        if text:
            yield n, text, fh.tell()
        else:
            stats["empty"] += 1


def _corpus_progress(enabled: bool, total_bytes: int, done_bytes: int) -> Any:
    from rich.progress import TextColumn

    prog = make_progress(TextColumn("{task.fields[lines]} lines  {task.fields[rate]} lines/s"), transient=True,
                         enabled=enabled, percent=True)
    task = prog.add_task("retrieving", total=max(total_bytes, 1), completed=done_bytes, lines=0, rate="-")
    return prog, task


@torch.inference_mode()
def retrieve_corpus(index: Index, run: Any, corpus: str | os.PathLike, out: str | os.PathLike, *,
                    k: int = 5, batch_size: int = 256, overwrite: bool = False,
                    progress: bool = False) -> dict[str, Any]:
    """Top-``k`` index rows for every non-empty line of ``corpus``, as JSON lines in ``out``.

    One line per sentence, in corpus order: ``{"line": n (1-based), "text", "ids", "scores"}``.
    The corpus is streamed in batches of ``batch_size`` sentences. After each batch the output
    is flushed and fsynced, then ``OUT.progress.json`` is atomically rewritten with the lines
    consumed, the corpus offset, the committed output bytes and the corpus signature. A rerun
    truncates the output to the committed bytes and continues from there, so an interrupted and
    resumed run writes exactly the bytes of an uninterrupted one. The sidecar is removed at the
    end. Returns a summary dict.
    """
    corpus, out = Path(corpus), Path(out)
    if not corpus.is_file():
        raise XmodalError(f"{where(corpus)}no such corpus file")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise XmodalError(f"--batch-size {batch_size!r}: must be a positive integer")
    k = check_k(k, index)
    side = progress_path(out)
    sig = corpus_signature(corpus)
    identity = {"format": PROGRESS_FORMAT, "corpus": str(corpus.resolve()), "corpus_signature": sig,
                "index": str(Path(index.path).resolve()), "index_count": len(index),
                "model_ref": index.model_ref, "k": k, "batch_size": batch_size}
    state, resumed = _resume_state(side, out, identity, overwrite)

    t0 = time.perf_counter()
    resumed_from = state["lines_consumed"] + 1 if resumed else None
    resumed_line0 = state["lines_consumed"]
    stats = {"lines": state["lines_consumed"], "empty": 0, "bad_utf8": 0}
    done_sentences = state["sentences"]
    out.parent.mkdir(parents=True, exist_ok=True)
    # opened without truncating, locked, and only then cut back to the committed bytes, so a
    # second process on the same output cannot clobber the first one's file
    fd = os.open(out, os.O_RDWR | os.O_CREAT, 0o644)
    with open(fd, "r+b") as dst, open(corpus, "rb") as src:
        _lock(dst, out)
        dst.truncate(state["output_bytes"])  # drop whatever an interrupted batch half-wrote
        dst.seek(state["output_bytes"])
        src.seek(state["corpus_offset"])
        atomic_write_json(side, {**identity, **state})
        prog, task = _corpus_progress(progress, sig["size"], state["corpus_offset"])
        new_sentences = 0
        with prog:
            lines = _sentences(src, state["lines_consumed"] + 1, corpus, stats)
            while batch := _next_batch(lines, batch_size):
                scores, rows = index.search(encode_text_queries(run, [t for _, t, _ in batch]), k)
                dst.write(_records(batch, scores, index.ids_of(rows)).encode("utf-8"))
                dst.flush()
                os.fsync(dst.fileno())
                # the commit point of this batch: the sidecar names the output bytes it covers
                state = {"lines_consumed": batch[-1][0], "corpus_offset": batch[-1][2],
                         "output_bytes": dst.tell(), "sentences": done_sentences + len(batch)}
                done_sentences += len(batch)
                new_sentences += len(batch)
                atomic_write_json(side, {**identity, **state})
                rate = (batch[-1][0] - resumed_line0) / max(time.perf_counter() - t0, 1e-9)
                prog.update(task, completed=batch[-1][2], lines=batch[-1][0], rate=f"{rate:,.0f}")
    side.unlink(missing_ok=True)
    seconds = time.perf_counter() - t0
    return {"corpus": str(corpus), "out": str(out), "lines": stats["lines"], "sentences": done_sentences,
            "new_sentences": new_sentences, "resumed_from_line": resumed_from, "k": k,
            "empty_lines": stats["empty"], "bad_utf8_lines": stats["bad_utf8"], "seconds": round(seconds, 3),
            "sentences_per_s": round(new_sentences / max(seconds, 1e-9), 1), "output_bytes": out.stat().st_size}


def _resume_state(side: Path, out: Path, identity: dict[str, Any], overwrite: bool) -> tuple[dict[str, int], bool]:
    """``(state, resumed)``: the committed progress of an interrupted run to resume, else a fresh start."""
    state = {"lines_consumed": 0, "corpus_offset": 0, "output_bytes": 0, "sentences": 0}
    resumed = False
    if side.is_file() and not overwrite:
        try:
            saved = json.loads(side.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as e:
            raise DataError(f"{where(side)}unreadable progress file ({e}); delete it (and {out.name}) to start over") from None
        for key, want in identity.items():
            if saved.get(key) != want:
                why = "the corpus changed" if key == "corpus_signature" else f"{key} differs"
                raise XmodalError(f"{where(side)}cannot resume: {why} since the interrupted run; delete "
                                  f"{side.name} and {out.name} (or pass --overwrite) to start over")
        state = {key: int(saved[key]) for key in state}
        if not out.is_file() or out.stat().st_size < state["output_bytes"]:
            raise XmodalError(f"{where(out)}shorter than the {state['output_bytes']} bytes {side.name} "
                              "records as written; delete both to start over")
        resumed = True
    elif out.exists() and not overwrite and (not out.is_file() or out.stat().st_size > 0):
        # (an empty file is what a run killed before its first sidecar write leaves behind)
        raise XmodalError(f"{where(out)}already exists (a finished run?); pass --overwrite to replace it")
    return state, resumed


def _next_batch(lines: Iterator[tuple[int, str, int]], batch_size: int) -> list[tuple[int, str, int]]:
    """Up to ``batch_size`` further sentences of ``lines`` (empty at the end of the corpus)."""
    batch = []
    for item in lines:
        batch.append(item)
        if len(batch) == batch_size:
            break
    return batch


def _records(batch: list[tuple[int, str, int]], scores: Any, ids: list[list[Any]]) -> str:
    """The JSON lines of one batch of sentences with their hits (ids and scores, empty rows left out)."""
    chunk = []
    for (n, text, _), sc, id_row in zip(batch, scores.tolist(), ids):
        keep = [j for j, r in enumerate(id_row) if r is not None]
        chunk.append(json.dumps({"line": n, "text": text, "ids": [id_row[j] for j in keep],
                                 "scores": [round(sc[j], 6) for j in keep]},
                                ensure_ascii=False).translate(_LINE_BREAKS))
    return "\n".join(chunk) + "\n"
