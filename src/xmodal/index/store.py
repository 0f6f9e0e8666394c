"""The on-disk index folder and :class:`Index`, the object behind ``xmodal index/search/serve``.

Folder layout (see docs/index.md)::

    manifest.json     format version, dim, count, dtype, metric, backend + args, modality,
                      model_ref, created/updated, commit version, size + sha256 of every file
    vectors.npy       (count, dim) float32 or float16, C order: the source of truth
    ids.jsonl         one JSON string a row
    metadata.jsonl    one JSON object a row (path, caption, ...)
    faiss.index       FAISS backends only, written by faiss.write_index

Commits are atomic by a redo log: every changed file is first written in full as ``NAME.new``
and fsynced, then ``manifest.json.new`` (written to a temporary file and renamed, so it exists
complete or not at all) records the new version. Its appearance is the commit point. After
it, each ``NAME.new`` is renamed over ``NAME`` and finally ``manifest.json.new`` over
``manifest.json``. A crash before the commit point leaves the old files and manifest untouched
(stray ``.new`` files are ignored and deleted by the next commit); a crash after it is
finished ("rolled forward") by the next :meth:`Index.open` or commit, which redo the renames.
Writers are serialised by an advisory lock on ``.lock``.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, BinaryIO, Iterator, Sequence

import numpy as np

from ..errors import ConfigError, DataError, XmodalError, where
from ..progress import track
from ..utils import atomic_write_json
from . import faiss_backend  # noqa: F401  (registers flat / ivf / hnsw; FAISS itself is imported lazily)
from .exact import BACKENDS, METRICS, Backend
from .pages import gather_rows, npy_header, release_rows

log = logging.getLogger(__name__)

FORMAT = "xmodal-index"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
VECTORS = "vectors.npy"
IDS = "ids.jsonl"
METADATA = "metadata.jsonl"
FAISS_FILE = "faiss.index"
#: Every file an index may hold; only these are ever renamed or deleted in the folder.
KNOWN_FILES = (VECTORS, IDS, METADATA, FAISS_FILE)
PENDING = ".new"
LOCK = ".lock"

MODALITIES = ("image", "text")
DTYPES = {"float32": np.dtype("<f4"), "float16": np.dtype("<f2")}
#: Default cap on k: larger result lists are almost always a mistake (and cost memory Q x k).
MAX_K = 10_000
#: ``verify="auto"`` hashes files up to this size and only checks the size of larger ones.
AUTO_SHA_MAX_BYTES = 256 << 20
VERIFY_MODES = ("auto", "size", "sha256", "none")
_COPY_BYTES = 64 << 20
_COPY_ROWS = 65536


# ---------------------------------------------------------------------------------------------
# file helpers


class _HashingWriter:
    """A binary file that hashes and counts what is written to it."""

    def __init__(self, fh: BinaryIO) -> None:
        self.fh = fh
        self.sha = hashlib.sha256()
        self.size = 0

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        self.fh.write(view)
        self.sha.update(view)
        self.size += len(view)
        return len(view)

    def record(self) -> dict[str, Any]:
        return {"size": self.size, "sha256": self.sha.hexdigest()}


@contextlib.contextmanager
def _writing(path: Path) -> Iterator[_HashingWriter]:
    """Write ``path`` (a ``.new`` staging file) and fsync it before returning."""
    with open(path, "wb") as fh:
        w = _HashingWriter(fh)
        yield w
        fh.flush()
        os.fsync(fh.fileno())


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 64 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_COPY_BYTES):
            h.update(chunk)
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    """Make renames in ``path`` durable (no-op where directories cannot be opened, e.g. Windows)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def _locked(folder: Path) -> Iterator[None]:
    """Exclusive advisory lock on ``folder/.lock`` (writers and roll-forward only)."""
    try:
        import fcntl
    except ImportError:  # Windows: single writer assumed, documented
        yield
        return
    try:
        fd = os.open(folder / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise XmodalError(f"{where(folder / LOCK)}cannot take the index lock ({e.strerror}); "
                          "is the folder writable?") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


#: Characters Python's ``str.splitlines`` (and some JSONL readers) treat as line breaks that
#: ``json.dumps(ensure_ascii=False)`` leaves raw; escaped so one row is always one line.
_LINE_BREAKS = str.maketrans({"\x85": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"})


def _json_line(obj: Any, path: Path, row: int, field: str) -> str:
    try:
        text = json.dumps(obj, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as e:
        raise DataError(f"{where(path, None, field)}row {row}: not JSON-serialisable ({e})") from None
    return text.translate(_LINE_BREAKS)  # only inside strings in valid JSON, so escaping is exact


def _copy_bytes(src: Path, dst: _HashingWriter) -> None:
    with open(src, "rb") as fh:
        while chunk := fh.read(_COPY_BYTES):
            dst.write(chunk)


# ---------------------------------------------------------------------------------------------
# manifest, verification, recovery


def read_manifest(folder: Path) -> dict[str, Any]:
    """Parse and sanity-check ``folder/manifest.json``."""
    path = folder / MANIFEST
    if not folder.is_dir():
        raise XmodalError(f"{where(folder)}no such index folder")
    if not path.is_file():
        raise DataError(f"{where(path)}missing: not an xmodal index (or its creation was interrupted)")
    try:
        m = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise DataError(f"{where(path)}not valid JSON ({e})") from None
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise DataError(f"{where(path, None, 'format')}not an xmodal index manifest")
    if not isinstance(m.get("format_version"), int) or m["format_version"] > FORMAT_VERSION:
        raise DataError(f"{where(path, None, 'format_version')}{m.get('format_version')!r} is not "
                        f"supported (this xmodal reads up to {FORMAT_VERSION}); upgrade xmodal")
    for key, kind in (("dim", int), ("count", int), ("version", int), ("files", dict),
                      ("backend", str), ("backend_args", dict), ("metric", str), ("dtype", str)):
        if not isinstance(m.get(key), kind) or isinstance(m.get(key), bool):
            raise DataError(f"{where(path, None, key)}missing or not a {kind.__name__}")
    if m["dtype"] not in DTYPES:
        raise DataError(f"{where(path, None, 'dtype')}{m['dtype']!r}: expected one of {', '.join(DTYPES)}")
    if m["metric"] not in METRICS:
        raise DataError(f"{where(path, None, 'metric')}{m['metric']!r}: expected one of {', '.join(METRICS)}")
    if m["backend"] not in BACKENDS:
        raise DataError(f"{where(path, None, 'backend')}{m['backend']!r}: expected one of "
                        f"{', '.join(BACKENDS.names())}")
    if m.get("modality") not in MODALITIES:
        raise DataError(f"{where(path, None, 'modality')}{m.get('modality')!r}: expected one of "
                        f"{', '.join(MODALITIES)}")
    if m["dim"] < 1 or m["count"] < 0:
        raise DataError(f"{where(path)}dim {m['dim']} / count {m['count']} out of range")
    unknown = sorted(set(m["files"]) - set(KNOWN_FILES))
    if unknown:  # never touch paths an untrusted manifest makes up (e.g. "../x")
        raise DataError(f"{where(path, None, 'files')}unknown file {unknown[0]!r}")
    required = [VECTORS, IDS, METADATA]
    if BACKENDS.get(m["backend"]).file:
        required.append(BACKENDS.get(m["backend"]).file)
    for name in required:
        rec = m["files"].get(name)
        if not isinstance(rec, dict) or not isinstance(rec.get("size"), int) or not isinstance(rec.get("sha256"), str):
            raise DataError(f"{where(path, None, 'files')}no size/sha256 record for {name}")
    return m


def verify_files(folder: Path, manifest: dict[str, Any], mode: str = "auto") -> None:
    """Check every file listed in the manifest exists with the recorded size (and sha256).

    ``mode``: ``"sha256"`` hashes every file (reads the whole index: about 1 s a GB),
    ``"size"`` only compares sizes, ``"auto"`` hashes files up to 256 MiB, ``"none"`` skips.
    """
    if mode == "none":
        return
    for name, rec in manifest["files"].items():
        path = folder / name
        if not path.is_file():
            raise DataError(f"{where(path)}missing (listed in {MANIFEST})")
        size = path.stat().st_size
        if size != rec["size"]:
            raise DataError(f"{where(path)}is {size} bytes, {MANIFEST} records {rec['size']} "
                            "(truncated, modified or from another version)")
        if mode == "sha256" or (mode == "auto" and size <= AUTO_SHA_MAX_BYTES):
            if sha256_file(path) != rec["sha256"]:
                raise DataError(f"{where(path)}sha256 does not match {MANIFEST} (file modified or corrupted)")


def _remove_staging(folder: Path) -> None:
    """Delete leftovers of an aborted commit (only names this module writes)."""
    for name in (*KNOWN_FILES, MANIFEST):
        (folder / (name + PENDING)).unlink(missing_ok=True)
        for tmp in folder.glob(f".{name}*.tmp"):  # utils.atomic_write's temporary files
            tmp.unlink(missing_ok=True)


def _roll_forward(folder: Path) -> bool:
    """Finish a commit whose ``manifest.json.new`` exists (call with the lock held).

    Idempotent: renames each staged ``NAME.new`` over ``NAME`` (those already renamed are
    simply absent), then the manifest, then drops files the new version no longer lists.
    Returns whether there was anything to finish.
    """
    pending = folder / (MANIFEST + PENDING)
    if not pending.is_file():
        return False
    try:
        m = json.loads(pending.read_text(encoding="utf-8"))
        files = m["files"]
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        # written by rename from a complete temp file, so this is not our commit record
        raise DataError(f"{where(pending)}unreadable pending commit record; remove it to "
                        f"keep the previous version ({MANIFEST})") from None
    for name, rec in files.items():
        if name not in KNOWN_FILES:  # never rename paths an untrusted record makes up
            raise DataError(f"{where(pending, None, 'files')}unknown file {name!r}")
        staged = folder / (name + PENDING)
        if staged.is_file():
            if staged.stat().st_size != rec["size"]:
                raise DataError(f"{where(staged)}is {staged.stat().st_size} bytes, the pending "
                                f"commit records {rec['size']}; remove {pending.name} and it")
            os.replace(staged, folder / name)
    os.replace(pending, folder / MANIFEST)
    _fsync_dir(folder)
    for name in KNOWN_FILES:
        if name not in files:
            (folder / name).unlink(missing_ok=True)
    return True


def recover(folder: Path) -> bool:
    """Finish an interrupted commit in ``folder`` if there is one; True if one was finished."""
    folder = Path(folder)
    if not (folder / (MANIFEST + PENDING)).is_file():
        return False
    with _locked(folder):
        done = _roll_forward(folder)
    if done:
        log.warning("%s: finished a commit that had been interrupted", folder)
    return done


def _read_vectors(path: Path, manifest: dict[str, Any]) -> np.ndarray:
    """Memory-map ``vectors.npy`` after checking its header against the manifest."""
    count, dim, dtype = manifest["count"], manifest["dim"], DTYPES[manifest["dtype"]]
    shape, file_dtype, header_len = npy_header(path)  # C order and numeric, or a DataError naming it
    if file_dtype != dtype:
        raise DataError(f"{where(path)}dtype {file_dtype} but {MANIFEST} says {manifest['dtype']} "
                        f"(vectors must be float32 or float16)")
    if shape != (count, dim):
        raise DataError(f"{where(path)}shape {shape}, {MANIFEST} says ({count}, {dim})")
    expected = header_len + count * dim * dtype.itemsize
    if path.stat().st_size != expected:
        raise DataError(f"{where(path)}is {path.stat().st_size} bytes, a ({count}, {dim}) "
                        f"{manifest['dtype']} array needs {expected} (truncated?)")
    if count == 0:
        return np.zeros((0, dim), dtype)
    return np.load(path, mmap_mode="r", allow_pickle=False)


def _read_ids(path: Path, count: int) -> list[str]:
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{where(path)}not UTF-8 ({e})") from None
    lines = text.split("\n")
    if lines[-1] != "":
        raise DataError(f"{where(path, len(lines))}last line is not terminated (truncated file?)")
    lines.pop()
    if len(lines) != count:
        raise DataError(f"{where(path)}{len(lines)} ids, {MANIFEST} says {count} rows")
    try:
        ids = json.loads("[" + ",".join(lines) + "]") if lines else []
    except ValueError:
        ids = None
    if ids is None or len(ids) != count or not all(isinstance(i, str) for i in ids):
        for n, line in enumerate(lines, 1):  # slow path only to name the bad line
            try:
                ok = isinstance(json.loads(line), str)
            except ValueError:
                ok = False
            if not ok:
                raise DataError(f"{where(path, n)}expected a JSON string id, got {line[:80]!r}")
    if len(set(ids)) != len(ids):  # temporary set: the id -> row dict is only built when needed
        first: dict[str, int] = {}
        for n, id_ in enumerate(ids, 1):
            if id_ in first:
                raise DataError(f"{where(path, n)}duplicate id {id_!r} (also on line {first[id_]}); "
                                "ids must be unique")
            first[id_] = n
    return ids


def parse_metadata_line(raw: bytes, path: Path, line: int) -> dict[str, Any]:
    """One ``metadata.jsonl`` row as a dict; anything else is a :class:`DataError` naming ``path:line``."""
    from ..data.table import parse_json  # lazily: opening an index imports no dataset readers

    try:
        text = raw.rstrip(b"\n").decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{where(path, line)}not UTF-8 ({e.reason} at column {e.start + 1})") from None
    obj = parse_json(text, path, line)  # its errors name the line (and column)
    if not isinstance(obj, dict):
        raise DataError(f"{where(path, line)}expected a JSON object, got {type(obj).__name__}")
    return obj


def _line_offsets(path: Path, count: int) -> np.ndarray:
    """Byte offsets of the ``count + 1`` line starts of a JSONL file (last = file size)."""
    starts = [np.zeros(1, np.int64)]
    pos = 0
    with open(path, "rb") as fh:
        while chunk := fh.read(_COPY_BYTES):
            nl = np.flatnonzero(np.frombuffer(chunk, np.uint8) == 10)
            starts.append(nl.astype(np.int64) + pos + 1)
            pos += len(chunk)
    offsets = np.concatenate(starts)
    if offsets[-1] != pos:
        raise DataError(f"{where(path, len(offsets))}last line is not terminated (truncated file?)")
    if len(offsets) - 1 != count:
        raise DataError(f"{where(path)}{len(offsets) - 1} rows, {MANIFEST} says {count}")
    return offsets


def _check_verify(verify: bool | str | None) -> str:
    if verify is True:
        return "sha256"
    if verify is False or verify is None:
        return "none"
    if verify not in VERIFY_MODES:
        raise ConfigError(f"verify={verify!r}: choose True, False or one of {', '.join(VERIFY_MODES)}")
    return verify


# ---------------------------------------------------------------------------------------------
# the index


class _Source:
    """The index's vectors as a :class:`~.exact.VectorSource`: memory map + rows added since."""

    def __init__(self, index: "Index") -> None:
        self._ix = index
        self.dim = index.dim

    def __len__(self) -> int:
        return len(self._ix)

    def blocks(self, block_size: int, start: int = 0) -> Iterator[tuple[int, np.ndarray]]:
        ix = self._ix
        committed, pending = ix._vectors, ix._pending_array()
        nc = committed.shape[0]
        for s in range(start, len(ix), block_size):
            e = min(s + block_size, len(ix))
            if e <= nc:
                yield s, committed[s:e]
            elif s >= nc:
                yield s, pending[s - nc:e - nc]
            else:  # a block straddling the committed / added boundary
                yield s, np.concatenate([committed[s:nc], pending[:e - nc]])  # (e - s, d)
            release_rows(committed, s, min(e, nc))  # else a big memory map's pages pile up in RSS

    def take(self, rows: np.ndarray) -> np.ndarray:
        ix = self._ix
        rows = np.asarray(rows, np.int64)
        nc = ix._vectors.shape[0]
        out = np.empty((len(rows), self.dim), np.float32)
        old = rows < nc
        out[old] = gather_rows(ix._vectors, rows[old])  # a big memory map's pages are released
        if not old.all():
            out[~old] = ix._pending_array()[rows[~old] - nc]
        return out


class Index:
    """A folder of vectors + ids + metadata searchable by one backend (``exact``, ``flat``, ``ivf``, ``hnsw``).

    >>> with Index.create("gallery.idx", dim=512, modality="image") as index:
    ...     index.add(vectors, ids, [{"path": p} for p in paths])    # committed on exit
    >>> index = Index.open("gallery.idx")
    >>> scores, rows = index.search(queries, k=10)                  # (Q, 10) each
    >>> index.ids_of(rows[0]), index.metadata(rows[0])

    Rows added with :meth:`add` are searchable at once and written by :meth:`commit`
    (or on leaving a ``with`` block without an exception).
    """

    def __init__(self, path: Path, meta: dict[str, Any], backend: Backend, *, progress: bool = False) -> None:
        # use Index.create / Index.open
        self.path = Path(path)
        self.progress = progress
        self._meta = meta
        self._backend = backend
        self._vectors: np.ndarray = np.zeros((0, meta["dim"]), DTYPES[meta["dtype"]])
        self._ids: list[str] = []
        self._id_rows: dict[str, int] | None = None
        self._meta_fd: int | None = None
        self._meta_offsets = np.zeros(1, np.int64)
        self._pending_vecs: list[np.ndarray] = []
        self._pending_cat: np.ndarray | None = None
        self._pending_meta: list[str] = []
        self._disk_version: int | None = None  # the committed version this object extends
        self._disk_files: dict[str, Any] = {}
        self._backend_dirty = True
        self._write_error: str | None = None
        self._overwrite = False  # created with overwrite=True over an existing index
        self._warned_norm = False
        self._source = _Source(self)

    # -- construction ------------------------------------------------------------------
    @classmethod
    def create(cls, path: str | os.PathLike, dim: int, *, backend: str = "exact", metric: str = "ip",
               modality: str = "image", model_ref: dict[str, Any] | None = None,
               backend_args: dict[str, Any] | None = None, dtype: str = "float32",
               overwrite: bool = False, progress: bool = False) -> "Index":
        """A new, empty index at ``path``; nothing is written until :meth:`commit`.

        ``overwrite=True`` replaces an existing index atomically at commit time (until then the
        old one stays readable). ``dtype="float16"`` halves ``vectors.npy``; search still
        computes in float32.
        """
        path = Path(path)
        if not isinstance(dim, int) or isinstance(dim, bool) or dim < 1:
            raise ConfigError(f"dim={dim!r}: must be a positive integer")
        if metric not in METRICS:
            raise ConfigError(f"metric={metric!r}: choose one of {', '.join(METRICS)}")
        if modality not in MODALITIES:
            raise ConfigError(f"modality={modality!r}: choose one of {', '.join(MODALITIES)}")
        if dtype not in DTYPES:
            raise ConfigError(f"dtype={dtype!r}: choose one of {', '.join(DTYPES)}")
        if model_ref is not None:
            if not isinstance(model_ref, dict):
                raise ConfigError(f"model_ref must be a dict or None, got {type(model_ref).__name__}")
            try:
                model_ref = json.loads(json.dumps(model_ref, allow_nan=False))
            except (TypeError, ValueError) as e:
                raise ConfigError(f"model_ref is not JSON-serialisable ({e})") from None
        backend_obj = BACKENDS.get(backend)(dim, metric, backend_args)
        existing: int | None = None
        if path.exists():
            if (path / MANIFEST).exists() or (path / (MANIFEST + PENDING)).exists():
                if not overwrite:
                    raise XmodalError(f"{where(path)}an index already exists here; open it with "
                                      "Index.open() to add to it, or pass overwrite=True")
                recover(path)
                existing = read_manifest(path)["version"]
            elif not path.is_dir():
                raise XmodalError(f"{where(path)}exists and is not a folder")
            else:
                ours = {LOCK, *(n + PENDING for n in (*KNOWN_FILES, MANIFEST))}
                other = [p.name for p in path.iterdir() if p.name not in ours and not p.name.endswith(".tmp")]
                if other:
                    raise XmodalError(f"{where(path)}folder is not empty (holds {other[0]!r}); "
                                      "choose a new path for the index")
        now = _now()
        meta = {"dim": dim, "metric": metric, "modality": modality, "model_ref": model_ref,
                "dtype": dtype, "created": now, "updated": now}
        index = cls(path, meta, backend_obj, progress=progress)
        index._disk_version = existing
        index._overwrite = existing is not None
        return index

    @classmethod
    def open(cls, path: str | os.PathLike, verify: bool | str = "auto", *, backend: str | None = None,
             progress: bool = False) -> "Index":
        """Open an index folder, checking it against its manifest.

        ``verify``: ``"auto"`` (default) sha256-checks files up to 256 MiB and size-checks larger
        ones, ``True``/``"sha256"`` hashes everything (about 1 s per GB), ``"size"`` only sizes,
        ``False`` skips file checks. Structure (npy header, dtype, shape, row counts of ids and
        metadata, FAISS ntotal) is always checked. ``backend`` searches with another backend
        than the stored one, built in memory from ``vectors.npy`` (commit to persist it).
        """
        path = Path(path)
        mode = _check_verify(verify)
        for attempt in range(2):
            recover(path)  # finish an interrupted commit (waits for a writer holding the lock)
            manifest = read_manifest(path)
            try:
                verify_files(path, manifest, mode)
                return cls._load(path, manifest, backend, progress)
            except DataError:
                # a reader that raced a commit sees a half-renamed folder: once the writer is
                # done (recover() waits on its lock) the files match a manifest again
                racing = (path / (MANIFEST + PENDING)).is_file() or read_manifest(path)["version"] != manifest["version"]
                if attempt or not racing:
                    raise
        raise AssertionError("unreachable")

    @classmethod
    def _load(cls, path: Path, m: dict[str, Any], backend: str | None, progress: bool) -> "Index":
        count = m["count"]
        meta = {k: m.get(k) for k in ("dim", "metric", "modality", "model_ref", "dtype", "created", "updated")}
        stored = BACKENDS.get(m["backend"])
        index = cls(path, meta, _placeholder_backend(m), progress=progress)
        index._vectors = _read_vectors(path / VECTORS, m)
        index._ids = _read_ids(path / IDS, count)
        index._meta_offsets = _line_offsets(path / METADATA, count)
        index._meta_fd = os.open(path / METADATA, os.O_RDONLY)
        index._disk_version = m["version"]
        index._disk_files = dict(m["files"])
        index._overwrite = False
        if backend is None or backend == m["backend"]:
            b = stored(m["dim"], m["metric"], m["backend_args"])
            b.load(path / stored.file if stored.file else None, count, m.get("backend_info") or {})
            index._backend = b
            index._backend_dirty = False
        else:
            index._backend = BACKENDS.get(backend)(m["dim"], m["metric"], None)
            index._backend.build(index._source, progress)
            index._backend_dirty = True
        return index

    # -- properties --------------------------------------------------------------------
    def __len__(self) -> int:
        return self._vectors.shape[0] + sum(len(v) for v in self._pending_vecs)

    @property
    def dim(self) -> int:
        return self._meta["dim"]

    @property
    def modality(self) -> str:
        return self._meta["modality"]

    @property
    def metric(self) -> str:
        return self._meta["metric"]

    @property
    def dtype(self) -> str:
        return self._meta["dtype"]

    @property
    def model_ref(self) -> dict[str, Any] | None:
        """Which model made the vectors, e.g. ``{"run": ..., "checkpoint": "best", "config_hash": ...}``."""
        ref = self._meta["model_ref"]
        return None if ref is None else json.loads(json.dumps(ref))

    @property
    def backend(self) -> str:
        return self._backend.name

    @property
    def backend_args(self) -> dict[str, Any]:
        return dict(self._backend.args)

    @property
    def dirty(self) -> bool:
        """Whether there are changes that :meth:`commit` would write."""
        return bool(self._pending_vecs) or self._backend_dirty or self._disk_version is None or self._overwrite

    def __repr__(self) -> str:
        return (f"Index({str(self.path)!r}, n={len(self)}, dim={self.dim}, backend={self.backend!r}, "
                f"metric={self.metric!r}, modality={self.modality!r})")

    # -- adding ------------------------------------------------------------------------
    def add(self, vectors: Any, ids: Sequence[str], metadata: Sequence[dict[str, Any]] | None = None) -> range:
        """Append ``vectors`` (n, dim) with unique string ``ids`` and one metadata dict each.

        Rows are searchable at once and written by :meth:`commit`. Returns the new row numbers.
        """
        self._check_writable()
        x = _to_numpy(vectors)
        where_ = f"{self.path} add()"
        if x.ndim != 2:
            raise DataError(f"{where_}: vectors must be a 2-D (n, {self.dim}) array, got shape {x.shape}")
        n = x.shape[0]
        if x.shape[1] != self.dim:
            raise DataError(f"{where_}: vectors have dim {x.shape[1]}, the index has dim {self.dim}")
        if not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer)):
            raise DataError(f"{where_}: vectors must be numeric, got dtype {x.dtype}")
        with np.errstate(over="ignore"):  # float16 overflow is reported below, by row
            given, x = x, np.ascontiguousarray(x, dtype=DTYPES[self.dtype])
        bad = ~np.isfinite(x).all(axis=1)
        if bad.any():
            r = int(np.flatnonzero(bad)[0])
            why = f" (too large for {self.dtype} storage)" if np.isfinite(given[r]).all() else ""
            raise DataError(f"{where_}: vector {r} (id {_id_repr(ids, r)}) has NaN or infinite values{why}")
        ids = list(ids)
        if len(ids) != n:
            raise DataError(f"{where_}: {n} vectors but {len(ids)} ids")
        if metadata is None:
            metadata = [{}] * n
        metadata = list(metadata)
        if len(metadata) != n:
            raise DataError(f"{where_}: {n} vectors but {len(metadata)} metadata entries")
        seen = self._id_index()
        new_seen: dict[str, int] = {}
        for i, id_ in enumerate(ids):
            if not isinstance(id_, str):
                raise DataError(f"{where_}: id {i} is a {type(id_).__name__}, ids must be strings")
            if id_ in seen or id_ in new_seen:
                raise DataError(f"{where_}: duplicate id {id_!r} (row {seen.get(id_, new_seen.get(id_))})")
            new_seen[id_] = len(self) + i
        lines = []
        for i, m in enumerate(metadata):
            if not isinstance(m, dict):
                raise DataError(f"{where_}: metadata {i} is a {type(m).__name__}, expected a dict")
            lines.append(_json_line(m, self.path / METADATA, len(self) + i, "metadata"))
        if self.metric == "ip" and n and not self._warned_norm:
            norms = np.linalg.norm(x[:1024].astype(np.float64), axis=1)
            if np.abs(norms - 1).max() > 1e-2:
                self._warned_norm = True
                log.warning("%s: vectors are not L2-normalised (norms %.3g..%.3g); inner-product "
                            "scores are then not cosine similarities", self.path, norms.min(), norms.max())
        start = len(self)
        self._pending_vecs.append(x)
        self._pending_cat = None
        self._ids.extend(ids)
        seen.update(new_seen)
        self._pending_meta.extend(lines)
        return range(start, start + n)

    def rebuild(self, backend: str | None = None, backend_args: dict[str, Any] | None = None) -> None:
        """Rebuild the search structure from the vectors (another backend, or new arguments).

        Written by the next :meth:`commit`; ``backend_args`` default to the current ones when
        the backend is unchanged.
        """
        self._check_writable()
        name = backend or self.backend
        args = backend_args if backend_args is not None else (self._backend.args if name == self.backend else None)
        b = BACKENDS.get(name)(self.dim, self.metric, args)
        t0 = time.perf_counter()
        b.build(self._source, self.progress)
        log.info("%s: rebuilt %s backend over %d vectors in %.1fs", self.path, name, len(self),
                 time.perf_counter() - t0)
        self._backend = b
        self._backend_dirty = True

    # -- reading -----------------------------------------------------------------------
    def search(self, queries: Any, k: int = 10, *, max_k: int = MAX_K,
               **params: Any) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` rows for each query.

        ``queries``: (Q, dim) (or one (dim,) vector, searched as Q=1). ``params`` override the
        backend's search arguments for this call (``nprobe`` for ivf, ``ef_search`` for hnsw,
        ``block_size`` for exact). Returns ``(scores, ids)``: float32 (Q, k), descending, and
        int64 (Q, k) row numbers; ``-1`` rows (score ``-inf``) pad results past ``len(index)``.
        """
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= max_k:
            raise XmodalError(f"k={k!r}: must be an integer between 1 and {max_k}")
        q = _to_numpy(queries)
        if q.ndim == 1:
            q = q[None, :]  # (1, d)
        if q.ndim != 2:
            raise XmodalError(f"queries must be (Q, {self.dim}) or ({self.dim},), got shape {q.shape}")
        if q.shape[1] != self.dim:
            raise XmodalError(f"query dim {q.shape[1]} does not match the index dim {self.dim} "
                              f"({self.path}; was it built with another model?)")
        if not (np.issubdtype(q.dtype, np.floating) or np.issubdtype(q.dtype, np.integer)):
            raise XmodalError(f"queries must be numeric, got dtype {q.dtype}")
        with np.errstate(over="ignore"):  # overflow is reported below, by row
            given, q = q, np.ascontiguousarray(q, dtype=np.float32)
        bad = ~np.isfinite(q).all(axis=1)
        if bad.any():
            r = int(np.flatnonzero(bad)[0])
            why = " (too large for float32)" if np.isfinite(given[r]).all() else ""
            raise XmodalError(f"query {r} has NaN or infinite values{why}")
        params = self._backend.check_args(params, search=True)
        self._sync_backend()
        scores, rows = self._backend.search(q, int(k), self._source, **params)
        self._check_scores(q, scores, rows)
        return scores, rows

    def _check_scores(self, q: np.ndarray, scores: np.ndarray, rows: np.ndarray) -> None:
        """Refuse results with a non-finite score (a damaged vector, or a float32 overflow).

        Only the (Q, k) result is inspected: the exact search ranks NaN and +inf first, so what
        would be shown is what is checked. FAISS drops rows it cannot score instead, which an
        exhaustive backend (exact, flat) shows as padding before ``min(k, len(index))`` results.
        """
        bad = ~np.isfinite(scores) & (rows >= 0)
        top = min(scores.shape[1], len(self))
        if self._backend.exhaustive:
            bad[:, :top] |= rows[:, :top] < 0
        if not bad.any():
            return
        qi, j = (int(v[0]) for v in np.nonzero(bad))
        r = int(rows[qi, j])
        damaged = r if r >= 0 and not np.isfinite(self._source.take(np.array([r]))).all() else None
        if r < 0:  # FAISS dropped a row: find a damaged one by a scan (error path only)
            damaged = next((s + int(np.flatnonzero(~np.isfinite(b).all(axis=1))[0]) for s, b in
                            self._source.blocks(_COPY_ROWS) if not np.isfinite(b).all()), None)
        if damaged is not None:
            raise DataError(f"{where(self.path / VECTORS)}row {damaged} (id {self._ids[damaged]!r}) has NaN or "
                            "infinite values; the index is damaged: rebuild it from its source")
        what = (f"scores row {r} (id {self._ids[r]!r}) {float(scores[qi, j])}, which is not finite" if r >= 0
                else f"has no finite score for {top - int((rows[qi, :top] >= 0).sum())} of its top {top} rows")
        qn = float(np.linalg.norm(q[qi].astype(np.float64)))
        raise XmodalError(f"{self.path}: query {qi} {what}: the {self.metric} score overflows float32 "
                          f"(query norm {qn:.3g}); normalise the queries and vectors")

    def ids_of(self, rows: Any) -> Any:
        """String ids of row numbers (any shape, e.g. the (Q, k) ``ids`` of :meth:`search`); ``-1`` -> None."""
        return self._lookup(rows, lambda r: self._ids[r])

    def rows_of(self, ids: Sequence[str]) -> list[int]:
        """Row numbers of string ids."""
        index = self._id_index()
        out = []
        for id_ in ids:
            if id_ not in index:
                raise XmodalError(f"{where(self.path / IDS)}no row with id {id_!r}")
            out.append(index[id_])
        return out

    def metadata(self, rows: Any) -> Any:
        """Metadata dicts of row numbers (any shape); ``-1`` -> None. Read lazily from disk."""
        return self._lookup(rows, self._metadata_row)

    def vector(self, row: int) -> np.ndarray:
        """The stored vector of ``row`` as float32 (dim,)."""
        r = self._check_row(row)
        return self._source.take(np.array([r]))[0]

    # -- writing -----------------------------------------------------------------------
    def commit(self) -> None:
        """Write everything added or rebuilt since the last commit, atomically (see module doc)."""
        self._check_writable()
        if not self.dirty:
            return
        t0 = time.perf_counter()
        self.path.mkdir(parents=True, exist_ok=True)
        with _locked(self.path):
            _roll_forward(self.path)
            on_disk = read_manifest(self.path)["version"] if (self.path / MANIFEST).is_file() else None
            if on_disk != self._disk_version:
                raise XmodalError(f"{where(self.path)}changed on disk since it was opened (now version "
                                  f"{on_disk}, opened {self._disk_version}); reopen it and add again")
            _remove_staging(self.path)
            self._sync_backend()
            try:
                manifest = self._stage()
                # the commit point: once manifest.json.new exists the new version wins
                atomic_write_json(self.path / (MANIFEST + PENDING), manifest)
            except BaseException:
                _remove_staging(self.path)
                raise
            _fsync_dir(self.path)
            try:
                _roll_forward(self.path)
            except BaseException as e:
                self._write_error = (f"{where(self.path)}commit recorded but not finished ({e}); "
                                     "Index.open() will finish it - reopen the index")
                raise
        self._after_commit(manifest)
        log.info("%s: committed version %d (%d rows, %s backend) in %.1fs", self.path,
                 manifest["version"], manifest["count"], self.backend, time.perf_counter() - t0)

    def _stage(self) -> dict[str, Any]:
        """Write the changed files as ``NAME.new`` and return the manifest describing them."""
        files: dict[str, Any] = {}
        data_changed = bool(self._pending_vecs) or self._disk_version is None or self._overwrite
        if data_changed:
            files[VECTORS] = self._write_vectors(self.path / (VECTORS + PENDING))
            files[IDS] = self._write_lines(self.path / (IDS + PENDING), IDS,
                                           [_json_line(i, self.path / IDS, r, "id") for r, i in
                                            enumerate(self._ids[self._n_committed():], self._n_committed())])
            files[METADATA] = self._write_lines(self.path / (METADATA + PENDING), METADATA, self._pending_meta)
        else:
            for name in (VECTORS, IDS, METADATA):
                files[name] = self._disk_files[name]
        b = self._backend
        if b.file:
            if self._backend_dirty or b.file not in self._disk_files:
                staged = self.path / (b.file + PENDING)
                b.save(staged)
                with open(staged, "rb+") as fh:
                    os.fsync(fh.fileno())
                files[b.file] = {"size": staged.stat().st_size, "sha256": sha256_file(staged)}
            else:
                files[b.file] = self._disk_files[b.file]
        self._meta["updated"] = _now()
        return {"format": FORMAT, "format_version": FORMAT_VERSION,
                "version": (self._disk_version or 0) + 1,
                "dim": self.dim, "count": len(self), "dtype": self.dtype, "metric": self.metric,
                "modality": self.modality, "model_ref": self._meta["model_ref"],
                "backend": b.name, "backend_args": b.args, "backend_info": b.info(),
                "created": self._meta["created"], "updated": self._meta["updated"],
                "files": files}

    def _write_vectors(self, path: Path) -> dict[str, Any]:
        dtype = DTYPES[self.dtype]
        header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False,
                  "shape": (len(self), self.dim)}
        n_blocks = -(-len(self) // _COPY_ROWS)
        with _writing(path) as w:
            np.lib.format.write_array_header_1_0(w, header)
            for _, block in track(self._source.blocks(_COPY_ROWS), f"writing {VECTORS}",
                                  total=n_blocks, enabled=self.progress and n_blocks > 1):
                w.write(np.ascontiguousarray(block, dtype=dtype))
        return w.record()

    def _write_lines(self, path: Path, name: str, new_lines: list[str]) -> dict[str, Any]:
        with _writing(path) as w:
            if self._n_committed() and not self._overwrite:
                _copy_bytes(self.path / name, w)
            for line in new_lines:
                w.write((line + "\n").encode("utf-8"))
        return w.record()

    def _after_commit(self, manifest: dict[str, Any]) -> None:
        """Point this object at the files just committed and forget the pending rows."""
        new_lens = [len((line + "\n").encode("utf-8")) for line in self._pending_meta]
        base = self._meta_offsets if not self._overwrite else np.zeros(1, np.int64)
        self._meta_offsets = np.concatenate([base, base[-1] + np.cumsum(new_lens, dtype=np.int64)])
        self._vectors = _read_vectors(self.path / VECTORS, manifest)
        if self._meta_fd is not None:
            os.close(self._meta_fd)
        self._meta_fd = os.open(self.path / METADATA, os.O_RDONLY)
        self._pending_vecs, self._pending_cat, self._pending_meta = [], None, []
        self._disk_version = manifest["version"]
        self._disk_files = dict(manifest["files"])
        self._backend_dirty = False
        self._overwrite = False

    def close(self) -> None:
        """Release the memory map and file handle (uncommitted rows are dropped)."""
        if self._meta_fd is not None:
            os.close(self._meta_fd)
            self._meta_fd = None
        self._vectors = np.zeros((0, self.dim), DTYPES[self.dtype])
        self._pending_vecs, self._pending_cat, self._pending_meta = [], None, []
        self._write_error = "index is closed"

    def __del__(self) -> None:
        fd = getattr(self, "_meta_fd", None)
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)

    def __enter__(self) -> "Index":
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self.commit()
        elif self.dirty:
            log.warning("%s: not committed because of %s", self.path, exc_type.__name__)

    # -- internals ---------------------------------------------------------------------
    def _n_committed(self) -> int:
        return self._vectors.shape[0]

    def _pending_array(self) -> np.ndarray:
        if self._pending_cat is None:
            parts = self._pending_vecs or [np.zeros((0, self.dim), DTYPES[self.dtype])]
            self._pending_cat = parts[0] if len(parts) == 1 else np.concatenate(parts)  # (n_new, d)
            # nothing pending stays [] (else commit would think rows were added and rewrite vectors.npy)
            self._pending_vecs = [self._pending_cat] if self._pending_vecs else []
        return self._pending_cat

    def _sync_backend(self) -> None:
        b = self._backend
        if b.ntotal == len(self):
            return
        if b.ntotal > len(self):  # cannot happen through the public API; rebuild to be safe
            b.build(self._source, self.progress)
        else:
            b.extend(self._source, self.progress)
        self._backend_dirty = True

    def _id_index(self) -> dict[str, int]:
        if self._id_rows is None:
            self._id_rows = {id_: r for r, id_ in enumerate(self._ids)}
        return self._id_rows

    def _check_writable(self) -> None:
        if self._write_error:
            raise XmodalError(self._write_error)

    def _check_row(self, row: Any) -> int:
        if isinstance(row, bool) or not isinstance(row, (int, np.integer)) or not 0 <= row < len(self):
            raise XmodalError(f"row {row!r} out of range: {self.path} has {len(self)} rows")
        return int(row)

    def _metadata_row(self, r: int) -> dict[str, Any]:
        nc = self._n_committed()
        if r >= nc:
            return json.loads(self._pending_meta[r - nc])  # written by add(): always an object
        start, end = int(self._meta_offsets[r]), int(self._meta_offsets[r + 1])
        return parse_metadata_line(os.pread(self._meta_fd, end - start, start), self.path / METADATA, r + 1)

    def _lookup(self, rows: Any, get: Any) -> Any:
        arr = np.asarray(rows)
        if arr.ndim == 0:
            r = arr.item()
            return None if r == -1 else get(self._check_row(r))
        flat = np.empty(arr.size, dtype=object)
        for i, r in enumerate(arr.ravel().tolist()):
            flat[i] = None if r == -1 else get(self._check_row(r))
        return flat.reshape(arr.shape).tolist()


def _placeholder_backend(m: dict[str, Any]) -> Backend:
    return BACKENDS.get("exact")(m["dim"], m["metric"], None)


def _to_numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach") and hasattr(x, "cpu"):  # a torch.Tensor, without importing torch here
        t = x.detach().cpu()
        try:
            return t.numpy()
        except TypeError:  # bfloat16 has no NumPy dtype
            return t.float().numpy()
    return np.asarray(x)


def _id_repr(ids: Any, r: int) -> str:
    try:
        return repr(list(ids)[r])
    except (IndexError, TypeError):
        return "?"
