"""retrieve-corpus (Vokenization): the best images for every sentence of a large text file.

Streamed and resumable: one JSON line per sentence, a progress file beside the output.
Pipelined at encoder speed: a reader thread reads and encodes batch ``i + 1`` while a search
thread searches batch ``i`` and formats its JSON lines, and the calling thread writes and
commits batch ``i - 1`` (:class:`CorpusPipeline`); each batch is computed exactly as a plain
loop would, so the output is byte-for-byte the same.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import queue
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch

from ..progress import make_progress
from ..errors import ConfigError, DataError, XmodalError, where
from ..index import Index
from ..utils import atomic_write_json
from .query import check_k, encode_text_queries

log = logging.getLogger(__name__)

#: Encoded batches the reader may run ahead of the search, and searched ones ahead of the writer.
PREFETCH = 2
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
        lines = _sentences(src, state["lines_consumed"] + 1, corpus, stats)
        pipe = CorpusPipeline(lambda: _next_batch(lines, batch_size), lambda texts: encode_text_queries(run, texts),
                              lambda q: index.search(q, k), lambda batch, scores, rows: _records(
                                  batch, scores, index.ids_of(rows)).encode("utf-8"))
        with prog, pipe:
            for batch, chunk in pipe:
                t_write = time.perf_counter()
                dst.write(chunk)
                dst.flush()
                os.fsync(dst.fileno())
                # the commit point of this batch: the sidecar names the output bytes it covers
                state = {"lines_consumed": batch[-1][0], "corpus_offset": batch[-1][2],
                         "output_bytes": dst.tell(), "sentences": done_sentences + len(batch)}
                done_sentences += len(batch)
                new_sentences += len(batch)
                atomic_write_json(side, {**identity, **state})
                pipe.timings["write_s"] += time.perf_counter() - t_write
                rate = (batch[-1][0] - resumed_line0) / max(time.perf_counter() - t0, 1e-9)
                prog.update(task, completed=batch[-1][2], lines=batch[-1][0], rate=f"{rate:,.0f}")
    side.unlink(missing_ok=True)
    seconds = time.perf_counter() - t0
    return {"corpus": str(corpus), "out": str(out), "lines": stats["lines"], "sentences": done_sentences,
            "new_sentences": new_sentences, "resumed_from_line": resumed_from, "k": k,
            "empty_lines": stats["empty"], "bad_utf8_lines": stats["bad_utf8"], "seconds": round(seconds, 3),
            "sentences_per_s": round(new_sentences / max(seconds, 1e-9), 1), "output_bytes": out.stat().st_size,
            **_stage_summary(pipe.timings, new_sentences)}


def _stage_summary(timings: dict[str, float], sentences: int) -> dict[str, Any]:
    """Busy seconds of each pipeline stage and the text encoder's own rate inside the pipeline."""
    return {"stage_seconds": {key[:-2]: round(v, 3) for key, v in timings.items()},
            "encoder_sentences_per_s": round(sentences / timings["encode_s"], 1) if timings["encode_s"] > 0 else None}


class CorpusPipeline:
    """Three overlapped stages over batches of sentences, in order:

    * a reader thread: ``next_batch()`` (an empty batch ends it), then ``encode(texts)`` -> (B, D);
    * a search thread: ``search(q)`` -> ``(scores, rows)``, then ``fmt(batch, scores, rows)``;
    * the caller iterates ``(batch, formatted)`` and writes it.

    Queues of :data:`PREFETCH` batches bound the memory. An error in a stage is raised in the
    caller; leaving the ``with`` block (also on Ctrl-C) stops the threads and waits for them, so
    the caller's files are not closed under them. ``timings`` holds each stage's busy seconds.
    """

    def __init__(self, next_batch: Callable[[], list], encode: Callable[[list[str]], Any],
                 search: Callable[[Any], tuple[Any, Any]], fmt: Callable[[list, Any, Any], Any],
                 prefetch: int = PREFETCH) -> None:
        self.next_batch, self.encode, self.search, self.fmt = next_batch, encode, search, fmt
        self.timings = {"read_s": 0.0, "encode_s": 0.0, "search_s": 0.0, "format_s": 0.0, "write_s": 0.0}
        self._encoded: queue.Queue = queue.Queue(maxsize=prefetch)
        self._searched: queue.Queue = queue.Queue(maxsize=prefetch)
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._guard, args=(self._read_encode, self._encoded),
                                          name="xmodal-corpus-encode", daemon=True),
                         threading.Thread(target=self._guard, args=(self._search_format, self._searched),
                                          name="xmodal-corpus-search", daemon=True)]

    def __enter__(self) -> "CorpusPipeline":
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        for q in (self._encoded, self._searched):  # unblock a stage waiting to put
            while not q.empty():
                q.get_nowait()
        for t in self._threads:
            t.join()

    def __iter__(self) -> Iterator[tuple[list, Any]]:
        while True:
            item = self._get(self._searched)
            if item is None:
                return
            yield item

    # -- stages -------------------------------------------------------------------------
    def _read_encode(self) -> Iterator[tuple[list, Any]]:
        while not self._stop.is_set():  # (the caller is leaving: read no further)
            t = time.perf_counter()
            batch = self.next_batch()
            t1 = time.perf_counter()
            self.timings["read_s"] += t1 - t
            if not batch:
                return
            q = self.encode([text for _, text, _ in batch])  # (B, D)
            self.timings["encode_s"] += time.perf_counter() - t1
            yield batch, q

    def _search_format(self) -> Iterator[tuple[list, Any]]:
        while (item := self._get(self._encoded)) is not None:
            batch, q = item
            t = time.perf_counter()
            scores, rows = self.search(q)  # (B, k) each
            t1 = time.perf_counter()
            out = self.fmt(batch, scores, rows)
            self.timings["search_s"] += t1 - t
            self.timings["format_s"] += time.perf_counter() - t1
            yield batch, out

    # -- plumbing -----------------------------------------------------------------------
    def _guard(self, stage: Callable[[], Iterator[Any]], out: queue.Queue) -> None:
        """Run ``stage`` into ``out``; then an end mark, or the stage's exception to re-raise downstream."""
        try:
            for item in stage():
                if not self._put(out, ("item", item)):
                    return
            self._put(out, ("end", None))
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
            self._put(out, ("error", e))

    def _put(self, q: queue.Queue, item: tuple[str, Any]) -> bool:
        while not self._stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _get(self, q: queue.Queue) -> Any:
        while True:
            try:
                kind, value = q.get(timeout=0.1)
            except queue.Empty:
                if self._stop.is_set():
                    return None
                continue
            if kind == "error":
                raise value
            return value if kind == "item" else None


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
