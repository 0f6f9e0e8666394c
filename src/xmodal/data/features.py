"""Feature extraction: run a frozen image tower over a dataset once, keep the result on disk.

A feature folder holds memory-mapped ``.npy`` arrays aligned with the dataset's images::

    pooled.npy     (N, D)     the tower's pooled vector per image
    grid.npy       (N, T, D)  the tower's tokens (grid cells) per image; absent with grid=False
    valid.npy      (N,) bool  False where an image could not be read (its rows are zero)
    ids.json       the N image ids, in row order
    manifest.json  what produced it (tower spec, dataset, shapes, dtype, sha256 per file, skips)

Writes go to ``<out>/.partial/`` and are resumable: rows are written in order and
``progress.json`` records how many are done after every batch. On completion the files are
moved into place with :func:`os.replace`, the manifest last, so a folder is only trusted once
its manifest exists. :func:`cached_features` picks a folder under a cache root from a hash
of the tower spec and the dataset, and reuses it when complete.
"""
from __future__ import annotations

import collections
import contextlib
import multiprocessing
import dataclasses
import hashlib
import json
import logging
import os
import shutil
import sys
import time
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np
import torch
from PIL import Image

from .._version import __version__
from .base import CrossModalDataset
from .extract_backends import Engine, resolve_backend
from .images import DEFAULT_MAX_PIXELS, ImageLoadError, open_image
from ..progress import RateColumn, make_progress
from ..errors import ConfigError, DataError, XmodalError, where
from ..models.base import ImageTower
from ..utils import atomic_write_json, cache_dir

try:  # advisory lock against two extractions writing one folder; POSIX only
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger(__name__)

FORMAT = "xmodal-features"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
PARTIAL = ".partial"
PROGRESS = "progress.json"
_LOCK = "lock"
#: every file name a feature folder may hold besides the manifest
DATA_FILES = ("pooled.npy", "grid.npy", "valid.npy", "ids.json")
DTYPES = ("float16", "float32")
_MAX_LOGGED_SKIPS = 20


# --------------------------------------------------------------------------- helpers
def ids_sha256(ids: Sequence[str]) -> str:
    """Stable digest of an ordered list of image ids."""
    blob = json.dumps(list(ids), ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def file_sha256(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1, ensure_ascii=False)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _read_json(path: Path) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as exc:
        raise DataError(f"{where(path, exc.lineno)}not valid JSON ({exc.msg})") from None
    except OSError as exc:
        raise DataError(f"{where(path)}cannot read: {exc.strerror or exc}") from None


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):  # not every filesystem / OS allows opening a folder
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def default_cache_root() -> Path:
    """``$XMODAL_CACHE/features``, else ``$XDG_CACHE_HOME/xmodal/features``, else ``~/.cache/xmodal/features``
    (:func:`xmodal.utils.cache_dir`, the root the trainer's caches use too)."""
    return cache_dir() / "features"


def _describe_tower(tower: ImageTower) -> dict:
    """A spec for towers passed without one (weights are not identified: pass a real spec)."""
    cls = type(tower)
    spec: dict[str, Any] = {"class": f"{cls.__module__}.{cls.__qualname__}"}
    for key in ("image_size", "output_dim"):
        val = getattr(tower, key, None)
        if isinstance(val, (int, float, str, bool)):
            spec[key] = val
    return spec


# --------------------------------------------------------------------------- reading
@dataclasses.dataclass
class FeatureSet:
    """A complete feature folder: read-only memory maps plus its manifest."""

    path: Path
    manifest: dict
    pooled: np.ndarray  # (N, D) read-only memmap
    grid: np.ndarray | None  # (N, T, D) read-only memmap, None when extracted without grid
    valid: np.ndarray  # (N,) bool
    ids: list[str]

    @property
    def num_images(self) -> int:
        return len(self.ids)

    @property
    def num_valid(self) -> int:
        return int(self.valid.sum())

    @property
    def skipped(self) -> list[dict]:
        """``[{"index", "id", "path", "reason"}, ...]`` for the images that could not be read."""
        return list(self.manifest.get("skipped", []))

    @property
    def tower(self) -> dict:
        return dict(self.manifest.get("tower", {}))

    def summary(self) -> str:
        grid = f", grid {tuple(self.grid.shape)}" if self.grid is not None else ""
        return (f"{self.path}: {self.num_images} images ({len(self.skipped)} skipped), "
                f"pooled {tuple(self.pooled.shape)}{grid} {self.pooled.dtype}")

    @classmethod
    def open(cls, path: str | Path, *, verify: bool = False) -> "FeatureSet":
        """Open and validate a feature folder.

        Checks that every file the manifest lists exists with the recorded size, shape and
        dtype, and that ``ids.json`` matches its digest; ``verify=True`` also re-hashes every
        file against the manifest's sha256 (slow for large grids).
        """
        path = Path(path)
        mpath = path / MANIFEST
        if not mpath.is_file():
            if (path / PARTIAL / PROGRESS).is_file():
                raise DataError(f"{where(path)}feature extraction is incomplete (no {MANIFEST}); "
                                "re-run the same extract command to resume it")
            if not path.exists():
                raise DataError(f"{where(path)}no such feature folder")
            raise DataError(f"{where(path)}not a feature folder: {MANIFEST} is missing")
        manifest = _read_json(mpath)
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            raise DataError(f"{where(mpath, field='format')}not an xmodal feature manifest")
        if manifest.get("format_version") != FORMAT_VERSION:
            raise DataError(f"{where(mpath, field='format_version')}version {manifest.get('format_version')!r} "
                            f"is not supported (this xmodal reads version {FORMAT_VERSION})")
        try:
            n = int(manifest["num_images"])
            files: dict = manifest["files"]
        except (KeyError, TypeError, ValueError) as exc:
            raise DataError(f"{where(mpath)}malformed manifest ({exc})") from None
        for required in ("pooled.npy", "valid.npy", "ids.json"):
            if required not in files:
                raise DataError(f"{where(mpath, field='files')}does not list {required}")

        for name, info in files.items():
            if name not in DATA_FILES:
                raise DataError(f"{where(mpath, field='files')}unexpected file {name!r}")
            fpath = path / name
            if not fpath.is_file():
                raise DataError(f"{where(fpath)}missing (listed in {mpath})")
            size = fpath.stat().st_size
            if size != info.get("bytes"):
                raise DataError(f"{where(fpath)}is {size} bytes, {MANIFEST} says {info.get('bytes')} "
                                "(the file was changed or truncated; extract again with --overwrite)")
            if verify and file_sha256(fpath) != info.get("sha256"):
                raise DataError(f"{where(fpath)}sha256 does not match {MANIFEST} (the file is corrupt)")

        def load(name: str) -> np.ndarray:
            fpath, info = path / name, files[name]
            try:
                arr = np.load(fpath, mmap_mode="r", allow_pickle=False)
            except (ValueError, OSError) as exc:
                raise DataError(f"{where(fpath)}not a readable .npy array ({exc})") from None
            if list(arr.shape) != list(info.get("shape", [])) or str(arr.dtype) != info.get("dtype"):
                raise DataError(f"{where(fpath)}has shape {list(arr.shape)} {arr.dtype}, {MANIFEST} says "
                                f"{info.get('shape')} {info.get('dtype')}")
            if arr.shape[0] != n:
                raise DataError(f"{where(fpath)}has {arr.shape[0]} rows for {n} images")
            return arr

        pooled = load("pooled.npy")
        grid = load("grid.npy") if "grid.npy" in files else None
        valid = np.array(load("valid.npy"))
        if valid.dtype != np.bool_ or valid.ndim != 1:
            raise DataError(f"{where(path / 'valid.npy')}must be a 1-D bool array")
        ids = _read_json(path / "ids.json")
        if not isinstance(ids, list) or len(ids) != n or not all(isinstance(i, str) for i in ids):
            raise DataError(f"{where(path / 'ids.json')}must be a list of {n} string ids")
        if ids_sha256(ids) != manifest.get("image_ids_sha256"):
            raise DataError(f"{where(path / 'ids.json')}does not match image_ids_sha256 in {MANIFEST}")
        if n - int(valid.sum()) != len(manifest.get("skipped", [])):
            raise DataError(f"{where(path / 'valid.npy')}marks {n - int(valid.sum())} images invalid, "
                            f"{MANIFEST} lists {len(manifest.get('skipped', []))} skipped")
        return cls(path=path, manifest=manifest, pooled=pooled, grid=grid, valid=valid, ids=ids)


# --------------------------------------------------------------------------- image source
class _ImageSource:
    """Where a dataset's pixels come from: a ``meta["pixels"]`` accessor, else image files."""

    def __init__(self, dataset: CrossModalDataset, max_pixels: int | None) -> None:
        self.ds = dataset
        self.pixels = dataset.meta.get("pixels") if isinstance(dataset.meta, Mapping) else None
        self.max_pixels = max_pixels
        if self.pixels is not None and len(self.pixels) != dataset.num_images:
            raise DataError(f"{dataset.name}/{dataset.split}: pixel accessor has {len(self.pixels)} "
                            f"images for {dataset.num_images} image ids")
        if self.pixels is None and dataset.image_paths is None:
            raise DataError(f"{dataset.name}/{dataset.split}: dataset has no image files or pixels "
                            "(it holds precomputed features only), so there is nothing to extract")

    def label(self, i: int) -> str:
        """How to name image ``i`` in messages: its file (resolved) or source path, else its id."""
        paths = self.ds.image_paths
        if self.pixels is None and paths is not None and paths[i] is not None:
            return str(self.ds.image_path(i))
        if paths is not None and paths[i] is not None:
            return str(paths[i])
        return self.ds.image_ids[i]

    def _one(self, i: int) -> Image.Image:
        if self.pixels is not None:
            img = self.pixels[i]
            return img if img.mode == "RGB" else img.convert("RGB")
        return open_image(self.ds.image_path(i), max_pixels=self.max_pixels)

    def load(self, indices: np.ndarray) -> list[Image.Image | str]:
        """PIL images (RGB) for ``indices``, or a reason string where one cannot be read."""
        if self.pixels is not None and hasattr(self.pixels, "load_pixels"):
            try:
                arr = np.asarray(self.pixels.load_pixels(indices))  # (k, H, W, 3) uint8
            except (XmodalError, OSError, ValueError, IndexError, KeyError):
                pass  # fall back to one at a time, to find which image is bad
            else:
                if arr.dtype == np.uint8 and arr.ndim == 4 and arr.shape[0] == len(indices) and arr.shape[-1] == 3:
                    return [Image.fromarray(a) for a in arr]
        out: list[Image.Image | str] = []
        for i in indices:
            try:
                out.append(self._one(int(i)))
            except ImageLoadError as exc:
                out.append(exc.reason)
            except XmodalError as exc:
                out.append(str(exc))
            except (OSError, ValueError, IndexError, KeyError) as exc:  # a pixel accessor's own failure
                out.append(f"cannot read image: {type(exc).__name__}: {exc}")
        return out


# --------------------------------------------------------------------------- extraction
@dataclasses.dataclass
class _Batch:
    indices: np.ndarray  # (B,) image indices, consecutive
    pixels: list[torch.Tensor | None]  # preprocessed (3, H, W) uint8 tensors
    errors: list[str | None]


def _decode_batch(source: _ImageSource, preprocess: Callable[[Image.Image], torch.Tensor],
                  indices: np.ndarray) -> _Batch:
    pixels: list[torch.Tensor | None] = []
    errors: list[str | None] = []
    for item in source.load(indices):
        if isinstance(item, str):
            pixels.append(None)
            errors.append(item)
        else:
            pixels.append(preprocess(item))
            errors.append(None)
    return _Batch(indices, pixels, errors)


# A decoding worker process's source and preprocess: set by the pool's initializer, which a
# forked child inherits without pickling (the dataset and the tower stay in shared pages).
_WORKER: tuple[_ImageSource, Callable] | None = None


def _init_worker(source: _ImageSource, preprocess: Callable) -> None:
    global _WORKER
    _WORKER = (source, preprocess)
    torch.set_num_threads(1)  # the parent's model owns the cores; a decoder needs one


def _decode_in_worker(indices: np.ndarray) -> tuple[list[np.ndarray | None], list[str | None]]:
    """:func:`_decode_batch` in a worker process; pixels come back as numpy arrays (cheap to send)."""
    if _WORKER is None:
        raise XmodalError("decoding worker used before its initializer ran")
    batch = _decode_batch(*_WORKER, indices)
    return [None if p is None else p.numpy() for p in batch.pixels], batch.errors


def _decode_pool(source: _ImageSource, preprocess: Callable, num_workers: int) -> tuple[Executor, bool]:
    """``(pool, is_process_pool)``: ``num_workers`` forked decoding processes where the platform can
    fork, else threads (a spawned process would have to pickle the dataset and the tower)."""
    if "fork" in multiprocessing.get_all_start_methods():
        return ProcessPoolExecutor(num_workers, mp_context=multiprocessing.get_context("fork"),
                                   initializer=_init_worker, initargs=(source, preprocess)), True
    return ThreadPoolExecutor(num_workers, thread_name_prefix="xmodal-decode"), False


def _batches(source: _ImageSource, preprocess, starts: Sequence[int], batch_size: int, n: int,
             num_workers: int) -> Iterator[_Batch]:
    """Decoded batches in order; with workers, up to ``num_workers + 1`` batches decode ahead in
    worker processes. The first batch is decoded here, which also loads lazily read sources (a
    compressed pixel pack) once, before the workers fork and share them."""
    spans = [np.arange(s, min(s + batch_size, n)) for s in starts]
    if num_workers <= 0 or len(spans) <= 1:
        for idx in spans:
            yield _decode_batch(source, preprocess, idx)
        return
    first = _decode_batch(source, preprocess, spans[0])
    pool, processes = _decode_pool(source, preprocess, num_workers)
    submit = (lambda idx: pool.submit(_decode_in_worker, idx)) if processes else \
        (lambda idx: pool.submit(_decode_batch, source, preprocess, idx))
    pending: collections.deque[tuple[np.ndarray, Future]] = collections.deque()
    it = iter(spans[1:])
    try:
        for idx in it:
            pending.append((idx, submit(idx)))
            if len(pending) > num_workers:
                break
        yield first
        while pending:
            idx, fut = pending.popleft()
            batch = _batch_result(idx, fut, processes)
            nxt = next(it, None)
            if nxt is not None:
                pending.append((nxt, submit(nxt)))
            yield batch
    finally:  # an error or an early stop: drop work not started yet, stop the workers
        pool.shutdown(wait=True, cancel_futures=True)


def _batch_result(idx: np.ndarray, fut: Future, processes: bool) -> _Batch:
    if not processes:
        return fut.result()
    try:
        pixels, errors = fut.result()
    except BrokenProcessPool:
        raise XmodalError(f"a decoding worker process died while reading images {int(idx[0])}..{int(idx[-1])} "
                          "(killed, out of memory, or a crash in an image decoder); run again with "
                          "--workers 0 to decode in the main process and find the image") from None
    return _Batch(idx, [None if p is None else torch.from_numpy(p) for p in pixels], errors)


class _Partial:
    """The ``.partial`` folder of an extraction in progress."""

    def __init__(self, out_dir: Path) -> None:
        self.out = out_dir
        self.dir = out_dir / PARTIAL
        self.progress_path = self.dir / PROGRESS
        self._lock_file = None

    def lock(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        f = open(self.dir / _LOCK, "a+")
        if fcntl is not None:
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                f.close()
                raise DataError(f"{where(self.out)}another extraction is writing into this folder") from None
        self._lock_file = f

    def unlock(self) -> None:
        if self._lock_file is not None:
            self._lock_file.close()
            self._lock_file = None

    def clear(self) -> None:
        """Remove everything in the partial folder but the lock."""
        for p in self.dir.iterdir():
            if p.name == _LOCK:
                continue
            shutil.rmtree(p) if p.is_dir() else p.unlink()

    def remove(self) -> None:
        self.clear()  # e.g. a temp file left by a crash during an earlier atomic write
        with contextlib.suppress(FileNotFoundError):
            (self.dir / _LOCK).unlink()
        self.unlock()
        with contextlib.suppress(OSError):
            self.dir.rmdir()


def _remove_feature_files(out_dir: Path) -> None:
    """Delete a previous result: the manifest first, so no reader trusts a half-removed folder."""
    for name in (MANIFEST, *DATA_FILES):
        with contextlib.suppress(FileNotFoundError):
            (out_dir / name).unlink()


def _inputs(dataset: CrossModalDataset, tower_spec: Mapping, grid: bool, dtype: str, backend: str = "eager") -> dict:
    """Everything that determines the output bytes; a resume or reuse requires equality."""
    return {
        "tower": json.loads(json.dumps(dict(tower_spec), sort_keys=True)),
        "dataset": dataset.name,
        "split": dataset.split,
        "num_images": dataset.num_images,
        "image_ids_sha256": ids_sha256(dataset.image_ids),
        "grid": bool(grid),
        "dtype": dtype,
        "backend": backend,
    }


def _content_inputs(images_sha256: str, num_images: int, tower_spec: Mapping, grid: bool, dtype: str,
                    backend: str) -> dict:
    """The inputs of a cache entry: the images' content and the tower, not the dataset's name or ids."""
    return {"tower": json.loads(json.dumps(dict(tower_spec), sort_keys=True)), "images_sha256": images_sha256,
            "num_images": num_images, "grid": bool(grid), "dtype": dtype, "backend": backend}


def _same_inputs(old: Any, new: Mapping) -> bool:
    """Equal inputs; folders written before backends existed were extracted eagerly."""
    return isinstance(old, dict) and {"backend": "eager", **old} == dict(new)


def _first_difference(a: Mapping, b: Mapping) -> str:
    for key in sorted(set(a) | set(b)):
        if a.get(key) != b.get(key):
            return f"{key}: was {a.get(key)!r}, now {b.get(key)!r}"
    return "(none)"


def _reuse_finished(out_dir: Path, inputs: dict) -> "FeatureSet":
    """The finished features in ``out_dir``, if they were made from ``inputs`` (else a DataError)."""
    manifest = _read_json(out_dir / MANIFEST)
    old = manifest.get("inputs") if isinstance(manifest, dict) else None
    if not _same_inputs(old, inputs):
        diff = _first_difference(old, inputs) if isinstance(old, dict) else "unreadable manifest"
        raise DataError(f"{where(out_dir)}already holds features made from other inputs ({diff}); "
                        "choose another folder or pass --overwrite (overwrite=True)")
    log.info("%s: features already extracted, reusing them", out_dir)
    return FeatureSet.open(out_dir)

def extract_features(
    dataset: CrossModalDataset,
    tower: ImageTower,
    out_dir: str | Path,
    *,
    tower_spec: Mapping[str, Any] | None = None,
    batch_size: int = 64,
    on_error: str = "skip",
    grid: bool = True,
    dtype: str = "float16",
    num_workers: int = 0,
    progress: bool = True,
    device: str | torch.device = "cpu",
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    overwrite: bool = False,
    backend: str = "auto",
) -> FeatureSet:
    """Run a frozen pixel tower over every image of ``dataset`` once and store the outputs.

    ``tower_spec`` (JSON-serialisable, e.g. ``{"name": "efficientnet_lite0", "image_size": 224}``)
    identifies the tower in the manifest and decides whether an existing or partial folder
    may be reused; without it only the tower's class and sizes are recorded. Unreadable
    images are reported with path and reason and either skipped (zero rows, ``valid`` False,
    listed in the manifest) with ``on_error="skip"`` or raise :class:`ImageLoadError` with
    ``on_error="fail"``. Re-running with the same inputs resumes an interrupted run, or
    returns the finished folder; ``overwrite=True`` starts again. ``num_workers`` decoding
    processes run ahead of the model; ``backend`` (:mod:`xmodal.data.extract_backends`) picks
    how the tower runs (``auto``: the fastest one installed).
    """
    dev, spec, backend = _checked(dataset, tower, tower_spec, on_error=on_error, dtype=dtype,
                                  batch_size=batch_size, num_workers=num_workers, device=device, backend=backend)
    inputs = _inputs(dataset, spec, grid, dtype, backend)
    return _extract_into(dataset, tower, Path(out_dir), inputs, batch_size=batch_size, on_error=on_error,
                         grid=grid, dtype=dtype, num_workers=num_workers, progress=progress, device=dev,
                         max_pixels=max_pixels, overwrite=overwrite, backend=backend)


def _checked(dataset: CrossModalDataset, tower: ImageTower, tower_spec: Mapping[str, Any] | None, *, on_error: str,
             dtype: str, batch_size: int, num_workers: int, device: Any, backend: str) -> tuple[torch.device, dict, str]:
    """The extraction's arguments checked: ``(device, tower spec, resolved backend)``."""
    if on_error not in ("skip", "fail"):
        raise ConfigError(f"on_error must be 'skip' or 'fail', got {on_error!r}")
    if dtype not in DTYPES:
        raise ConfigError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if batch_size < 1:
        raise ConfigError(f"batch_size must be at least 1, got {batch_size}")
    if num_workers < 0:
        raise ConfigError(f"num_workers must be 0 or more, got {num_workers}")
    if getattr(tower, "input_kind", None) != "pixels" or not callable(getattr(tower, "preprocess", None)):
        raise ConfigError(f"image tower {type(tower).__name__} does not take pixels (input_kind="
                          f"{getattr(tower, 'input_kind', None)!r}); extraction needs a pixel backbone")
    if dataset.num_images == 0:
        raise DataError(f"{dataset.name}/{dataset.split}: dataset has no images")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ConfigError(f"device {device!r} is not a torch device ({exc})") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} requested but CUDA is not available")
    spec = dict(tower_spec) if tower_spec is not None else _describe_tower(tower)
    try:
        json.dumps(spec)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"tower_spec must be JSON-serialisable ({exc})") from None
    return dev, spec, resolve_backend(backend, tower, dev, dataset.num_images)


def _extract_into(dataset: CrossModalDataset, tower: ImageTower, out_dir: Path, inputs: dict, *, max_pixels: int | None,
                  overwrite: bool, **kw: Any) -> FeatureSet:
    """Extract into ``out_dir`` (or reuse / resume it) for checked arguments and ``inputs``."""
    source = _ImageSource(dataset, max_pixels)
    if (out_dir / MANIFEST).is_file() and not overwrite:
        return _reuse_finished(out_dir, inputs)

    partial = _Partial(out_dir)
    partial.lock()
    try:
        if overwrite:
            _remove_feature_files(out_dir)
            partial.clear()
        return _run(dataset, tower, source, partial, inputs, **kw)
    finally:
        partial.unlock()


def _run(dataset: CrossModalDataset, tower: ImageTower, source: _ImageSource, partial: _Partial,
         inputs: dict, *, batch_size: int, on_error: str, grid: bool, dtype: str, num_workers: int,
         progress: bool, device: torch.device, backend: str) -> FeatureSet:
    """Extract (or resume) every image of ``dataset`` into ``partial``, then move the result into place."""
    n = dataset.num_images
    state = _start_or_resume(dataset, partial, inputs)
    if state["done"] >= n and (partial.dir / MANIFEST).is_file():
        return _finish(partial)  # interrupted while moving files into place

    _extract_rows(dataset, Engine(tower, backend, device), source, partial, state, batch_size=batch_size,
                  on_error=on_error, grid=grid, dtype=dtype, num_workers=num_workers, progress=progress)

    skipped: list[dict] = state["skipped"]
    if not state["shapes"]:
        first = "; ".join(f"{s['path']}: {s['reason']}" for s in skipped[:3])
        raise DataError(f"{dataset.name}/{dataset.split}: none of the {n} images could be read ({first})")
    if len(skipped) > _MAX_LOGGED_SKIPS:
        log.warning("... and %d more skipped images", len(skipped) - _MAX_LOGGED_SKIPS)
    if skipped:
        log.warning("%s/%s: %d of %d images could not be read and were skipped (zero rows, valid=False); "
                    "all are listed in %s", dataset.name, dataset.split, len(skipped), n, partial.out / MANIFEST)
    _write_manifest(partial, state, dataset, device, batch_size)
    return _finish(partial)


def _start_or_resume(dataset: CrossModalDataset, partial: _Partial, inputs: dict) -> dict:
    """The progress state of ``partial``: read back to resume, or a fresh one with empty files."""
    n = dataset.num_images
    pdir, out_dir = partial.dir, partial.out
    state: dict
    if partial.progress_path.is_file():
        state = _read_json(partial.progress_path)
        if not isinstance(state, dict) or not _same_inputs(state.get("inputs"), inputs):
            old = state.get("inputs") if isinstance(state, dict) else None
            diff = _first_difference(old, inputs) if isinstance(old, dict) else "unreadable progress file"
            raise DataError(f"{where(pdir)}holds a partial extraction made from other inputs ({diff}); "
                            "re-run with the original arguments to resume, or pass --overwrite (overwrite=True)")
        log.info("%s: resuming at image %d of %d", out_dir, state["done"], n)
    else:
        partial.clear()
        # Files left in out_dir without a manifest are untrusted leftovers; ours will replace them.
        _remove_feature_files(out_dir)
        _write_json_atomic(pdir / "ids.json", list(dataset.image_ids))
        np.lib.format.open_memmap(pdir / "valid.npy", mode="w+", dtype=np.bool_, shape=(n,)).flush()
        state = {"format_version": FORMAT_VERSION, "inputs": inputs, "done": 0, "shapes": None,
                 "skipped": [], "elapsed_s": 0.0, "started": _now()}
        _write_json_atomic(partial.progress_path, state)
    return state


def _open_arrays(pdir: Path, shapes: dict, dtype: str, create: bool) -> dict[str, np.ndarray]:
    """Memory-map the partial feature arrays of ``shapes``: new files, or existing ones checked."""
    arrays = {}
    for key, shape in shapes.items():
        path = pdir / f"{key}.npy"
        if create:
            arrays[key] = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=tuple(shape))
            continue
        try:
            arr = np.load(path, mmap_mode="r+", allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise DataError(f"{where(path)}partial extraction is damaged ({exc}); pass --overwrite "
                            "(overwrite=True) to start again") from None
        if list(arr.shape) != list(shape) or str(arr.dtype) != dtype:
            raise DataError(f"{where(path)}partial extraction has shape {list(arr.shape)} {arr.dtype}, "
                            f"expected {list(shape)} {dtype}; pass --overwrite to start again")
        arrays[key] = arr
    return arrays


def _extract_rows(dataset: CrossModalDataset, engine: Engine, source: _ImageSource, partial: _Partial,
                  state: dict, *, batch_size: int, on_error: str, grid: bool, dtype: str, num_workers: int,
                  progress: bool) -> None:
    """Run the tower over the images not done yet, writing rows and progress after every batch."""
    n = dataset.num_images
    pdir = partial.dir
    try:
        valid = np.load(pdir / "valid.npy", mmap_mode="r+", allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise DataError(f"{where(pdir / 'valid.npy')}partial extraction is damaged ({exc}); "
                        "pass --overwrite (overwrite=True) to start again") from None
    arrays = _open_arrays(pdir, state["shapes"], dtype, create=False) if state["shapes"] else {}

    tower = engine.tower
    was_training = tower.training
    tower.eval()
    tower.to(engine.device)
    np_dtype = np.dtype(dtype)
    skipped: list[dict] = state["skipped"]
    elapsed0, t0 = float(state.get("elapsed_s", 0.0)), time.perf_counter()
    bar = make_progress(RateColumn("img"), enabled=progress and sys.stderr.isatty(), stderr=True)
    try:
        starts = range(state["done"], n, batch_size)
        batches = _batches(source, tower.preprocess, starts, batch_size, n, num_workers)
        # closing(): on an error, stop the decoder threads now, not when the traceback is freed
        with bar, torch.inference_mode(), contextlib.closing(batches):
            task = bar.add_task(f"extract {dataset.name}/{dataset.split}", total=n, completed=state["done"])
            for batch in batches:
                lo, hi = int(batch.indices[0]), int(batch.indices[-1]) + 1
                ok = _note_failures(batch, dataset, source, on_error, skipped)
                if ok:
                    pooled, tokens = _encode(engine, batch, ok, grid)
                    if not arrays:
                        shapes = {"pooled": [n, pooled.shape[1]]}
                        if grid:
                            shapes["grid"] = [n, *tokens.shape[1:]]
                        arrays = _open_arrays(pdir, shapes, dtype, create=True)
                        state["shapes"] = shapes
                    for key, val in (("pooled", pooled), ("grid", tokens)):
                        if key not in arrays:
                            continue
                        arrays[key][lo:hi] = _rows_block(key, val, list(arrays[key].shape[1:]), ok, lo, hi,
                                                         np_dtype, dtype)
                        arrays[key].flush()
                elif arrays:  # every image in this batch failed: rows must still read as zero
                    for arr in arrays.values():
                        arr[lo:hi] = 0
                        arr.flush()
                valid[lo:hi] = [e is None for e in batch.errors]
                valid.flush()
                # data is flushed before progress moves, so "done" never covers unwritten rows
                state["done"] = hi
                state["elapsed_s"] = elapsed0 + time.perf_counter() - t0
                _write_json_atomic(partial.progress_path, state)
                bar.update(task, completed=hi)
    finally:
        tower.train(was_training)
        del arrays, valid  # close the memory maps before files move


def _note_failures(batch: _Batch, dataset: CrossModalDataset, source: _ImageSource, on_error: str,
                   skipped: list[dict]) -> list[int]:
    """Record (or, with on_error="fail", raise for) the batch's unreadable images; the readable positions."""
    ok = [k for k, e in enumerate(batch.errors) if e is None]
    for k, reason in enumerate(batch.errors):
        if reason is None:
            continue
        i = int(batch.indices[k])
        if on_error == "fail":
            raise ImageLoadError(source.label(i), reason)
        skipped.append({"index": i, "id": dataset.image_ids[i], "path": source.label(i),
                        "reason": reason})
        if len(skipped) <= _MAX_LOGGED_SKIPS:
            log.warning("skipping image %r (%s): %s", dataset.image_ids[i], source.label(i), reason)
    return ok


def _encode(engine: Engine, batch: _Batch, ok: list[int], grid: bool) -> tuple[np.ndarray, np.ndarray | None]:
    """The tower's pooled vectors (b, D) and, with ``grid``, tokens (b, T, D) for the readable images."""
    x = torch.stack([batch.pixels[k] for k in ok])  # (b, 3, H, W)
    pooled, tokens, mask_ok = engine(x, grid)
    _check_output(mask_ok, pooled, tokens, len(ok))
    return pooled, tokens


def _rows_block(key: str, val: np.ndarray, row_shape: list[int], ok: list[int], lo: int, hi: int,
                np_dtype: np.dtype, dtype: str) -> np.ndarray:
    """Rows ``lo..hi-1`` of array ``key``: ``val`` at the readable positions, zero elsewhere, checked."""
    if list(val.shape[1:]) != row_shape:
        raise XmodalError(f"tower output {key} has shape {list(val.shape[1:])} per image, "
                          f"earlier batches had {row_shape}")
    block = np.zeros((hi - lo, *val.shape[1:]), dtype=np_dtype)
    with np.errstate(over="ignore"):  # overflow is caught just below, with advice
        block[ok] = val
    if not np.isfinite(block).all():
        raise XmodalError(
            f"tower produced non-finite {key} features for images {lo}..{hi - 1}"
            + (" (float16 overflows above 65504: try dtype float32)" if dtype == "float16" else ""))
    return block


def _check_output(mask_ok: bool, pooled: np.ndarray, tokens: np.ndarray | None, b: int) -> None:
    if pooled.ndim != 2 or pooled.shape[0] != b:
        raise XmodalError(f"tower returned pooled of shape {list(pooled.shape)}, expected ({b}, D)")
    if tokens is not None:
        if tokens.ndim != 3 or tokens.shape[0] != b:
            raise XmodalError(f"tower returned tokens of shape {list(tokens.shape)}, expected ({b}, T, D)")
        if not mask_ok:
            raise XmodalError("tower returned padded tokens (mask has False entries); a grid of varying "
                              "length cannot be stored, extract with grid=False (--no-grid)")


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _write_manifest(partial: _Partial, state: dict, dataset: CrossModalDataset, device: torch.device,
                    batch_size: int) -> None:
    pdir = partial.dir
    names = ["pooled.npy", *(["grid.npy"] if "grid" in state["shapes"] else []), "valid.npy", "ids.json"]
    files = {}
    for name in names:
        path = pdir / name
        info: dict[str, Any] = {"bytes": path.stat().st_size, "sha256": file_sha256(path)}
        if name.endswith(".npy"):
            arr = np.load(path, mmap_mode="r", allow_pickle=False)
            info.update(shape=list(arr.shape), dtype=str(arr.dtype))
            del arr
        files[name] = info
    n = dataset.num_images
    inputs = state["inputs"]
    elapsed = float(state.get("elapsed_s", 0.0))
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "tower": inputs["tower"],
        "dataset": {"name": dataset.name, "split": dataset.split},
        "num_images": n,
        "num_valid": n - len(state["skipped"]),
        "dtype": inputs["dtype"],
        "grid": inputs["grid"],
        "shapes": state["shapes"],
        "image_ids_sha256": ids_sha256(_read_json(pdir / "ids.json")),  # a cache entry's first user's ids
        "files": files,
        "skipped": state["skipped"],
        "inputs": inputs,
        "xmodal_version": __version__,
        "torch_version": torch.__version__,
        "device": str(device),
        "batch_size": batch_size,
        "started": state.get("started"),
        "created": _now(),
        "elapsed_s": round(elapsed, 3),
        "images_per_s": round(n / elapsed, 2) if elapsed > 0 else None,
    }
    _write_json_atomic(pdir / MANIFEST, manifest)


def _finish(partial: _Partial) -> FeatureSet:
    """Move the finished files into place, the manifest last; safe to repeat after a crash."""
    pdir, out_dir = partial.dir, partial.out
    manifest = _read_json(pdir / MANIFEST)
    for name in manifest["files"]:
        src = pdir / name
        if src.is_file():
            os.replace(src, out_dir / name)
        elif not (out_dir / name).is_file():
            raise DataError(f"{where(src)}missing while finishing the extraction; pass --overwrite to start again")
    for name in DATA_FILES:  # a leftover from an older, different run must not sit beside ours
        if name not in manifest["files"]:
            with contextlib.suppress(FileNotFoundError):
                (out_dir / name).unlink()
    _fsync_dir(out_dir)
    os.replace(pdir / MANIFEST, out_dir / MANIFEST)
    _fsync_dir(out_dir)
    with contextlib.suppress(FileNotFoundError):
        partial.progress_path.unlink()
    partial.remove()
    fs = FeatureSet.open(out_dir)
    log.info("%s", fs.summary())
    return fs


# --------------------------------------------------------------------------- several processes
SHARDS = ".shards"


class _PixelSlice:
    """Pixels ``lo..hi`` of a dataset's pixel accessor, indexed from 0."""

    def __init__(self, pixels: Any, lo: int, hi: int) -> None:
        self.pixels, self.lo, self.hi = pixels, lo, hi
        if hasattr(pixels, "load_pixels"):  # keep the accessor's fast batched path
            self.load_pixels = lambda idx: pixels.load_pixels(np.asarray(idx, dtype=np.int64) + lo)

    def __len__(self) -> int:
        return self.hi - self.lo

    def __getitem__(self, i: int) -> Any:
        return self.pixels[self.lo + int(i)]


class _ShardView:
    """Images ``lo..hi`` of a dataset: the part of a dataset that extraction reads."""

    def __init__(self, dataset: CrossModalDataset, lo: int, hi: int) -> None:
        self._ds, self._lo = dataset, lo
        self.name, self.split, self.root = dataset.name, dataset.split, dataset.root
        self.image_ids = list(dataset.image_ids[lo:hi])
        self.image_paths = None if dataset.image_paths is None else list(dataset.image_paths[lo:hi])
        pixels = dataset.meta.get("pixels") if isinstance(dataset.meta, Mapping) else None
        self.meta = {"pixels": _PixelSlice(pixels, lo, hi)} if pixels is not None else {}

    @property
    def num_images(self) -> int:
        return len(self.image_ids)

    def image_path(self, i: int) -> Path:
        return self._ds.image_path(self._lo + i)


def extract_features_sharded(dataset: CrossModalDataset, tower: ImageTower, out_dir: str | Path, *,
                             env: Any, tower_spec: Mapping[str, Any] | None = None, batch_size: int = 64,
                             grid: bool = True, dtype: str = "float16", overwrite: bool = False,
                             progress: bool = True, device: str | torch.device = "cpu",
                             **kw: Any) -> FeatureSet:
    """:func:`extract_features` split over the processes of a ``torchrun`` job.

    Every process calls it with the same arguments and ``env`` (a
    :class:`xmodal.distributed.DistEnv`). Rank ``r`` extracts the ``r``-th contiguous
    shard of the images, cut on whole batches so its batches are those of a 1-process run (for
    a WebDataset split, on batch starts that also start a shard where that keeps the ranks
    balanced, so each tar is read by one rank: :func:`xmodal.data.webdataset.rank_cuts`),
    into ``<out>/.shards/`` (a resumable feature folder of its own); rank 0 then merges the
    shards into ``<out>`` through the same ``.partial`` folder and manifest-last rename as
    a 1-process extraction, so the result, manifest inputs included, is the same folder.
    Every process returns the merged :class:`FeatureSet`.
    """
    from ..distributed import barrier
    from .webdataset import extraction_bounds

    out_dir = Path(out_dir)
    if dtype not in DTYPES:
        raise ConfigError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if batch_size < 1:
        raise ConfigError(f"batch_size must be at least 1, got {batch_size}")
    if dataset.num_images == 0:
        raise DataError(f"{dataset.name}/{dataset.split}: dataset has no images")
    spec = dict(tower_spec) if tower_spec is not None else _describe_tower(tower)
    backend = resolve_backend(kw.pop("backend", "auto"), tower, device, dataset.num_images)  # as 1 process would
    inputs = _inputs(dataset, spec, grid, dtype, backend)
    if (out_dir / MANIFEST).is_file() and not overwrite:
        return _reuse_finished(out_dir, inputs)

    shard_dir = lambda r: out_dir / SHARDS / f"{r:05d}-of-{env.world_size:05d}"  # noqa: E731
    lo, hi = extraction_bounds(dataset, env.rank, env.world_size, batch_size)
    if hi > lo:
        extract_features(_ShardView(dataset, lo, hi), tower, shard_dir(env.rank),  # type: ignore[arg-type]
                         tower_spec=spec, batch_size=batch_size, grid=grid, dtype=dtype, overwrite=overwrite,
                         progress=progress and env.is_main, device=device, backend=backend, **kw)
    barrier(env)  # every shard is complete
    if env.is_main:
        bounds = []
        for r in range(env.world_size):
            rlo, rhi = extraction_bounds(dataset, r, env.world_size, batch_size)
            if rhi > rlo:
                bounds.append((rlo, rhi, shard_dir(r)))
        _merge_shards(dataset, out_dir, inputs, bounds, batch_size=batch_size, device=device,
                      overwrite=overwrite)
    barrier(env)  # the merged folder is in place
    return FeatureSet.open(out_dir)


def _merge_shards(dataset: CrossModalDataset, out_dir: Path, inputs: dict,
                  shards: list[tuple[int, int, Path]], *, batch_size: int, device: Any, overwrite: bool) -> None:
    """Concatenate shard folders into ``out_dir``; the manifest goes in last (atomic)."""
    parts = [(lo, hi, FeatureSet.open(path)) for lo, hi, path in shards]
    for lo, hi, fs in parts:
        if fs.ids != list(dataset.image_ids[lo:hi]):
            raise DataError(f"{where(fs.path)}shard does not hold images {lo}..{hi - 1} of "
                            f"{dataset.name}/{dataset.split}; remove {out_dir / SHARDS} and extract again")
    partial = _Partial(out_dir)
    partial.lock()
    try:
        partial.clear()
        if overwrite:
            _remove_feature_files(out_dir)
        n = dataset.num_images
        first = parts[0][2]
        shapes = {"pooled": [n, *first.pooled.shape[1:]]}
        if first.grid is not None:
            shapes["grid"] = [n, *first.grid.shape[1:]]
        _write_json_atomic(partial.dir / "ids.json", list(dataset.image_ids))
        arrays = {key: np.lib.format.open_memmap(partial.dir / f"{key}.npy", mode="w+", dtype=inputs["dtype"],
                                                 shape=tuple(shape)) for key, shape in shapes.items()}
        valid = np.lib.format.open_memmap(partial.dir / "valid.npy", mode="w+", dtype=np.bool_, shape=(n,))
        skipped: list[dict] = []
        elapsed = 0.0
        for lo, hi, fs in parts:
            arrays["pooled"][lo:hi] = fs.pooled
            if "grid" in arrays:
                arrays["grid"][lo:hi] = fs.grid
            valid[lo:hi] = fs.valid
            skipped += [{**s, "index": int(s["index"]) + lo} for s in fs.skipped]
            elapsed = max(elapsed, float(fs.manifest.get("elapsed_s") or 0.0))  # shards run side by side
        for arr in (*arrays.values(), valid):
            arr.flush()
        del arrays, valid
        state = {"inputs": inputs, "shapes": shapes, "skipped": skipped, "elapsed_s": elapsed,
                 "started": min(str(fs.manifest.get("started") or "") for _, _, fs in parts) or None}
        del parts
        _write_manifest(partial, state, dataset, torch.device(device), batch_size)
        _finish(partial)
    finally:
        partial.unlock()
    shutil.rmtree(out_dir / SHARDS, ignore_errors=True)


# --------------------------------------------------------------------------- cache and use
_DIGESTS = ".digests"  # memo of image-file digests beside the cache entries
_PIXEL_CHUNK = 512


def _file_fingerprint(dataset: CrossModalDataset) -> tuple[list[Path | None], str]:
    """The image files of ``dataset`` and a digest of their paths and ``stat`` (size, times, inode)."""
    h = hashlib.sha256(b"xmodal-file-stat-1\0")
    files: list[Path | None] = []
    for i, rel in enumerate(dataset.image_paths or []):
        path = None if rel is None else dataset.image_path(i)
        files.append(path)
        try:
            st = os.stat(path) if path is not None else None
            stamp = "none" if st is None else f"{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}:{st.st_ino}"
        except OSError as exc:
            stamp = f"error:{exc.errno}"
        h.update(f"{path}\0{stamp}\0".encode("utf-8", "surrogatepass"))
    return files, h.hexdigest()


def _files_digest(files: list[Path | None]) -> str:
    """sha256 over every file's bytes, in order (an unreadable or absent file counts as a marker)."""
    h = hashlib.sha256(b"xmodal-image-bytes-1\0")
    for path in files:
        try:
            h.update(b"file:" + bytes.fromhex(file_sha256(path)) if path is not None else b"none")
        except OSError as exc:
            h.update(f"unreadable:{exc.errno}".encode())  # extraction skips it, with its own reason
        h.update(b"\0")
    return h.hexdigest()


def images_digest(dataset: CrossModalDataset, memo_root: str | Path | None = None) -> str:
    """A digest of a dataset's images in row order, whatever they are called.

    Image files: sha256 over each file's bytes; it is memoised under ``memo_root/.digests/`` by the
    files' paths and ``stat`` (size, modification and change times, inode), so a second look reads
    no image. A pixel accessor with ``load_pixels`` (the emoji pack): sha256 over the decoded
    pixels. Other pixel accessors (tar shards) are named by the dataset, split, image paths and
    ids, as their bytes cannot be read without decoding.
    """
    n = dataset.num_images
    pixels = dataset.meta.get("pixels") if isinstance(dataset.meta, Mapping) else None
    if pixels is not None and hasattr(pixels, "load_pixels"):
        h = hashlib.sha256(f"xmodal-pixels-1\0{n}\0".encode())
        try:
            for lo in range(0, n, _PIXEL_CHUNK):
                arr = np.ascontiguousarray(pixels.load_pixels(np.arange(lo, min(lo + _PIXEL_CHUNK, n))))
                h.update(f"{arr.shape[1:]}{arr.dtype}\0".encode() + arr.tobytes())  # (k, H, W, 3) uint8
            return "pixels-" + h.hexdigest()
        except (XmodalError, OSError, ValueError, IndexError, KeyError):
            pass  # a bad image among them: name the images instead, extraction reports it
    if pixels is not None or dataset.image_paths is None:
        blob = json.dumps([dataset.name, dataset.split, [str(p) for p in dataset.image_paths or []],
                           list(dataset.image_ids)], ensure_ascii=False)
        return "names-" + hashlib.sha256(blob.encode("utf-8", "surrogatepass")).hexdigest()
    files, stamp = _file_fingerprint(dataset)
    memo = (Path(memo_root).expanduser() if memo_root is not None else default_cache_root()) / _DIGESTS \
        / f"{stamp[:32]}.json"
    with contextlib.suppress(OSError, ValueError, TypeError, KeyError):
        with open(memo, encoding="utf-8") as f:
            found = json.load(f)
        if found["stat_sha256"] == stamp and isinstance(found["images_sha256"], str):
            return found["images_sha256"]
    digest = "files-" + _files_digest(files)
    with contextlib.suppress(OSError):  # a read-only cache only costs a re-hash next time
        atomic_write_json(memo, {"stat_sha256": stamp, "images_sha256": digest, "num_images": n})
    return digest


def cache_key(dataset: CrossModalDataset, tower_spec: Mapping[str, Any], *, grid: bool = True,
              dtype: str = "float16", backend: str = "eager", cache_root: str | Path | None = None) -> str:
    """16 hex digits naming a cache folder: the images' content (:func:`images_digest`, not the
    dataset's name, split or ids), the tower spec, the output form and a non-eager backend."""
    return _content_key(images_digest(dataset, cache_root), tower_spec, grid=grid, dtype=dtype, backend=backend)


def _content_key(digest: str, tower_spec: Mapping[str, Any], *, grid: bool, dtype: str, backend: str) -> str:
    form = {"tower": dict(tower_spec), "grid": bool(grid), "dtype": dtype}
    if backend != "eager":  # eager entries keep the keys they had before backends existed
        form["backend"] = backend
    h = hashlib.sha256(b"xmodal-feature-cache-2\0")
    for part in (json.dumps(form, sort_keys=True), digest):
        h.update(part.encode("utf-8"))
        h.update(b"\0")
    return h.hexdigest()[:16]


def cached_features(dataset: CrossModalDataset, tower: ImageTower, tower_spec: Mapping[str, Any],
                    cache_root: str | Path | None = None, **kw: Any) -> FeatureSet:
    """Extract into (or reuse) ``cache_root / cache_key(...)``; see :func:`extract_features` for ``kw``.

    ``tower_spec`` must identify the tower fully (name, weights, image size, ...): two towers
    with the same spec share a cache entry, and so do two datasets with the same images in the
    same order (an English table and its multilingual copy). The result is labelled with this
    dataset's image ids and paths.
    """
    if "tower_spec" in kw:
        raise ConfigError("cached_features takes tower_spec as its third argument, not as a keyword")
    root = Path(cache_root).expanduser() if cache_root is not None else default_cache_root()
    grid, dtype = kw.pop("grid", True), kw.pop("dtype", "float16")
    on_error, batch_size, num_workers = kw.pop("on_error", "skip"), kw.pop("batch_size", 64), kw.pop("num_workers", 0)
    dev, spec, backend = _checked(dataset, tower, tower_spec, on_error=on_error, dtype=dtype, batch_size=batch_size,
                                  num_workers=num_workers, device=kw.pop("device", "cpu"),
                                  backend=kw.pop("backend", "auto"))
    digest = images_digest(dataset, root)
    out = root / _content_key(digest, spec, grid=grid, dtype=dtype, backend=backend)
    log.info("feature cache for %s/%s: %s", dataset.name, dataset.split, out)
    inputs = _content_inputs(digest, dataset.num_images, spec, grid, dtype, backend)
    fs = _extract_into(dataset, tower, out, inputs, max_pixels=kw.pop("max_pixels", DEFAULT_MAX_PIXELS),
                       overwrite=kw.pop("overwrite", False), batch_size=batch_size, on_error=on_error, grid=grid,
                       dtype=dtype, num_workers=num_workers, progress=kw.pop("progress", True), device=dev,
                       backend=backend, **kw)
    return _relabelled(fs, dataset)


def _relabelled(fs: FeatureSet, dataset: CrossModalDataset) -> FeatureSet:
    """``fs`` (same images, same order) with ``dataset``'s ids, and its paths in the skip list."""
    source = _ImageSource(dataset, None)
    skipped = [{**s, "id": dataset.image_ids[int(s["index"])], "path": source.label(int(s["index"]))}
               for s in fs.skipped]
    return dataclasses.replace(fs, ids=list(dataset.image_ids), manifest={**fs.manifest, "skipped": skipped})


def apply_valid(dataset: CrossModalDataset, features: FeatureSet, *, use: str = "pooled") -> CrossModalDataset:
    """The dataset with unreadable images dropped and extracted features attached.

    ``use`` picks ``"pooled"`` (N, D) or ``"grid"`` (N, T, D) as ``image_features``. When every
    image is valid the memory map is attached as is (no copy); otherwise the valid rows are
    read once into memory, and texts left without an image are dropped.
    """
    if use not in ("pooled", "grid"):
        raise ConfigError(f"use must be 'pooled' or 'grid', got {use!r}")
    arr = features.pooled if use == "pooled" else features.grid
    if arr is None:
        raise DataError(f"{where(features.path)}was extracted without grid features (--no-grid)")
    if features.ids != list(dataset.image_ids):
        if len(features.ids) != dataset.num_images:
            detail = f"{len(features.ids)} feature rows for {dataset.num_images} images"
        else:
            k = next(k for k, (a, b) in enumerate(zip(features.ids, dataset.image_ids)) if a != b)
            detail = f"image {k} is {dataset.image_ids[k]!r} in the dataset, {features.ids[k]!r} in the features"
        raise DataError(f"{where(features.path)}features do not belong to {dataset.name}/{dataset.split} ({detail})")
    if features.valid.all():
        return dataclasses.replace(dataset, image_features=arr)
    keep = np.flatnonzero(features.valid)
    # select first without features, so the (possibly huge) map is indexed once, not copied twice
    ds = dataclasses.replace(dataset, image_features=None).select_images(keep)
    return dataclasses.replace(ds, image_features=np.asarray(arr[keep]))


__all__ = ["FeatureSet", "extract_features", "extract_features_sharded", "cached_features", "cache_key", "apply_valid",
           "images_digest",
           "default_cache_root", "ids_sha256", "DATA_FILES", "MANIFEST"]
