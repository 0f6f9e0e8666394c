"""Reading large vector files without their pages piling up in the process's RSS.

A memory-mapped file's pages count in the resident set (``ru_maxrss``, ``VmRSS``) for as long as
they stay mapped, even though they are page cache the kernel could drop: one pass over a 5 GB
``vectors.npy`` through ``np.load(mmap_mode="r")`` leaves a 5 GB RSS. Two remedies:

* :func:`release_rows` - after a block of a read-only memory map has been used, drop its pages
  from this process (``madvise(MADV_DONTNEED)``; a later read faults them back in from the page
  cache or the file, so the array stays valid). :class:`~.store.Index` does this for maps of at
  least :data:`RELEASE_MIN_BYTES` as it streams its vectors (exact search, building a FAISS
  backend, committing); :func:`gather_rows` bounds what scattered reads (a training sample,
  ``ivfpq`` re-scoring) leave mapped.
* :class:`NpyRows` - a :class:`~.exact.VectorSource` over a 2-D ``.npy`` file read with plain
  ``pread`` calls (optionally into one reused buffer), never mapped; with ``drop_cache`` it also
  tells the kernel (``posix_fadvise(DONTNEED)``) that a one-pass read's page cache can go.
"""
from __future__ import annotations

import mmap
import os
import weakref
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from ..errors import DataError, where

#: Memory maps smaller than this keep their pages (re-faulting a small index costs more than it saves).
RELEASE_MIN_BYTES = 256 << 20
#: Bytes a read fault maps around the faulting page (Linux ``fault_around_bytes``' default).
FAULT_AROUND = 64 << 10
_PAGE = mmap.PAGESIZE
#: Rows :func:`gather_rows` copies at a time, and the bytes of fault-around windows it lets a
#: map accumulate before releasing all of it.
GATHER_ROWS = 4096
GATHER_BUDGET = 256 << 20
#: bytes touched by :func:`gather_rows` since each map's last release
_TOUCHED: "weakref.WeakKeyDictionary[mmap.mmap, int]" = weakref.WeakKeyDictionary()


def _read_only_map(arr: np.ndarray) -> mmap.mmap | None:
    """The read-only ``mmap`` behind ``arr`` (an ``np.memmap`` opened with mode ``"r"``), else None.

    Only such maps are released: ``MADV_DONTNEED`` on anonymous or copy-on-write memory would
    discard data, on a read-only file mapping it only drops pages that the file still holds.
    """
    if not isinstance(arr, np.memmap) or getattr(arr, "mode", None) != "r":
        return None
    mm = getattr(arr, "_mmap", None)  # numpy keeps the mapping here (shared by every view of it)
    return mm if isinstance(mm, mmap.mmap) and not mm.closed else None


def _map_address(mm: mmap.mmap) -> int:
    """The virtual address of the mapping's first byte."""
    return np.frombuffer(mm, np.uint8).ctypes.data  # a view: no copy


def _releasable(arr: np.ndarray, min_bytes: int | None) -> mmap.mmap | None:
    mm = _read_only_map(arr)
    limit = RELEASE_MIN_BYTES if min_bytes is None else min_bytes
    if mm is None or arr.ndim == 0 or arr.nbytes < limit or not arr.flags.c_contiguous or len(mm) == 0:
        return None
    return mm


def _release_spans(arr: np.ndarray, mm: mmap.mmap, spans: list[tuple[int, int]], align: int,
                   drop_cache: bool) -> None:
    """``madvise(DONTNEED)`` the byte ``spans`` of ``mm``, widened to ``align``-aligned addresses."""
    fd = os.open(arr.filename, os.O_RDONLY) if drop_cache and getattr(arr, "filename", None) else None
    file_start = arr.offset - arr.offset % mmap.ALLOCATIONGRANULARITY  # where numpy's mapping begins
    base = _map_address(mm)  # page-aligned
    try:
        for begin, end in spans:
            lo = max(0, (base + begin) // align * align - base)
            hi = min(len(mm), -(-(base + end) // align) * align - base)
            if hi > lo:
                mm.madvise(mmap.MADV_DONTNEED, lo, hi - lo)
                if fd is not None:
                    os.posix_fadvise(fd, file_start + lo, hi - lo, os.POSIX_FADV_DONTNEED)
    finally:
        if fd is not None:
            os.close(fd)


def release_rows(arr: np.ndarray, start: int = 0, stop: int | None = None, *, drop_cache: bool = False,
                 min_bytes: int | None = None) -> bool:
    """Drop the pages of rows ``start:stop`` of a read-only memory-mapped ``arr`` from this process's RSS.

    The rows stay readable (they are faulted back in from the file). ``drop_cache`` also advises
    the kernel to drop them from the page cache (for one-pass reads). Arrays that are not
    read-only memory maps, or smaller than ``min_bytes`` (default :data:`RELEASE_MIN_BYTES`),
    are left alone. Returns whether pages were released.
    """
    mm = _releasable(arr, min_bytes)
    stop = len(arr) if stop is None else min(stop, len(arr))
    if mm is None or stop <= start:
        return False
    begin = arr.ctypes.data - _map_address(mm) + start * arr.strides[0]
    _release_spans(arr, mm, [(begin, begin + (stop - start) * arr.strides[0])], _PAGE, drop_cache)
    return True


def gather_rows(arr: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """``arr[rows]`` as float32, keeping a big read-only memory map's resident pages bounded.

    A read fault on a file mapping maps the cached pages of the 64 KiB window around it (the
    kernel's fault-around), so a random sample of rows soon maps the whole file. Rows are
    copied in slices of :data:`GATHER_ROWS`; once the windows touched since the last release
    reach :data:`GATHER_BUDGET` bytes the whole map's pages are released (one ``madvise``,
    cheap when few pages are mapped). Small gathers (a query's re-scoring) thus release about
    once every few hundred queries rather than paying page faults on every one.
    """
    rows = np.asarray(rows, np.int64)
    mm = _releasable(arr, None)
    if mm is None:
        return np.asarray(arr[rows], np.float32)
    out = np.empty((len(rows),) + arr.shape[1:], np.float32)
    for s in range(0, len(rows), GATHER_ROWS):
        part = rows[s:s + GATHER_ROWS]
        out[s:s + len(part)] = arr[part]
        touched = _TOUCHED.get(mm, 0) + len(part) * max(FAULT_AROUND, arr.strides[0])
        if touched >= GATHER_BUDGET:
            release_rows(arr)
            touched = 0
        _TOUCHED[mm] = touched
    return out


def npy_header(path: Path) -> tuple[tuple[int, ...], np.dtype, int]:
    """``(shape, dtype, header_bytes)`` of a C-order ``.npy`` file, or a :class:`DataError` naming it."""
    try:
        with open(path, "rb") as fh:
            version = np.lib.format.read_magic(fh)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(fh)
            elif version == (2, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(fh)
            else:
                raise ValueError(f"unsupported .npy format version {version}")
            offset = fh.tell()
    except (OSError, ValueError) as e:
        raise DataError(f"{where(path)}not a readable .npy file ({e})") from None
    if fortran or dtype.hasobject:
        raise DataError(f"{where(path)}expected a C-order numeric array, got "
                        f"{'Fortran order' if fortran else dtype}")
    return tuple(shape), dtype, offset


class NpyRows:
    """Rows of a 2-D ``.npy`` file read with plain reads: a :class:`~.exact.VectorSource` that maps nothing.

    ``reuse_buffer``: :meth:`blocks` fills one buffer again and again (each block is valid until
    the next one is read); ``drop_cache``: advise the kernel to drop what was read from the page
    cache (one-pass reads of a file larger than memory). ``stop`` limits the rows seen.
    """

    def __init__(self, path: str | os.PathLike, *, reuse_buffer: bool = False, drop_cache: bool = False,
                 stop: int | None = None) -> None:
        self.path = Path(path)
        shape, self.dtype, self._offset = npy_header(self.path)
        if len(shape) != 2 or not np.issubdtype(self.dtype, np.floating):
            raise DataError(f"{where(self.path)}expected a 2-D float array (rows, dim), got shape {shape} "
                            f"dtype {self.dtype}")
        self.rows, self.dim = shape
        if self.path.stat().st_size < self._offset + self.rows * self.dim * self.dtype.itemsize:
            raise DataError(f"{where(self.path)}shorter than its header's shape {shape} (truncated?)")
        self.n = self.rows if stop is None else max(0, min(stop, self.rows))
        self.reuse_buffer, self.drop_cache = reuse_buffer, drop_cache
        self._row_bytes = self.dim * self.dtype.itemsize
        self._fd: int | None = os.open(self.path, os.O_RDONLY)
        self._buf: np.ndarray | None = None

    def __len__(self) -> int:
        return self.n

    def read(self, start: int, stop: int, out: np.ndarray | None = None) -> np.ndarray:
        """Rows ``start:stop`` (storage dtype), into ``out`` when given."""
        stop = min(stop, self.n)
        count = max(0, stop - start)
        out = np.empty((count, self.dim), self.dtype) if out is None else out[:count]
        pos = self._offset + start * self._row_bytes
        view, got = memoryview(out.reshape(-1).view(np.uint8)), 0
        while got < len(view):  # pread may return less than asked for on huge reads
            n = os.preadv(self._handle(), [view[got:]], pos + got)
            if n <= 0:
                raise DataError(f"{where(self.path)}ended at byte {pos + got} while reading rows {start}:{stop}")
            got += n
        if self.drop_cache and count:
            os.posix_fadvise(self._handle(), pos, count * self._row_bytes, os.POSIX_FADV_DONTNEED)
        return out

    def blocks(self, block_size: int, start: int = 0) -> Iterator[tuple[int, np.ndarray]]:
        """``(first_row, rows)`` blocks of at most ``block_size`` rows, in file order."""
        for s in range(start, self.n, block_size):
            e = min(self.n, s + block_size)
            if self.reuse_buffer:
                if self._buf is None or len(self._buf) < block_size:
                    self._buf = np.empty((block_size, self.dim), self.dtype)
                yield s, self.read(s, e, self._buf)
            else:
                yield s, self.read(s, e)

    def take(self, rows: np.ndarray) -> np.ndarray:
        """Rows by number as float32 ``(len(rows), dim)``, one read per row (for small gathers)."""
        rows = np.asarray(rows, np.int64)
        if len(rows) and (rows.min() < 0 or rows.max() >= self.n):
            raise IndexError(f"{self.path}: row out of range 0..{self.n - 1}")
        out = np.empty((len(rows), self.dim), np.float32)
        one = np.empty((1, self.dim), self.dtype)
        for i, r in enumerate(rows.tolist()):
            out[i] = self.read(r, r + 1, one)[0]
        return out

    def _handle(self) -> int:
        if self._fd is None:
            raise DataError(f"{where(self.path)}is closed")
        return self._fd

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        self._buf = None

    def __enter__(self) -> "NpyRows":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __del__(self) -> None:
        if getattr(self, "_fd", None) is not None:
            self.close()
