"""WebDataset tar shards: the layout img2dataset writes and OpenCLIP trains on.

A shard is an uncompressed POSIX tar whose members are grouped into samples by key: the
member name up to the first dot of its base name (``000000123.jpg``, ``000000123.txt`` and
``000000123.json`` are one sample). ``path`` is one ``.tar``, a brace pattern
(``shards-{000000..000099}.tar``, expanded with ``braceexpand`` as the ``webdataset``
library does; ``{split}`` is replaced by the split name first), or a folder of shards
(``DIR/{split}/*.tar`` when that folder exists, else ``DIR/*.tar``; ``.tar.gz``, ``.tgz``,
``.tar.bz2`` and ``.tar.xz`` shards count too).

**Compressed shards.** Random access needs byte offsets, which a compressed stream does not
have, so a gzip, bzip2 or xz shard is decompressed once into the xmodal cache
(``<cache>/webdataset/plain/``, with a progress bar; it needs the shard's uncompressed size
free there) and read from that copy, which is rebuilt when the shard's size or mtime changes,
like the ``.idx`` sidecar. Messages and ``image_paths`` still name the compressed shard.

**Random access.** Each shard is scanned once, headers only, into an index of member
offsets: a ``.idx`` sidecar beside it (JSON; in the xmodal cache when the shard's folder
is read-only), written atomically and rebuilt when the shard's size or mtime changes.
Images are then read by offset (``os.pread``), so extraction, training and indexing read
shards exactly like image files: :class:`TarImages` is the dataset's ``meta["pixels"]``
accessor, and ``image_paths`` name each image as ``wds://SHARD::MEMBER``.

**Samples.** The image is the first member with an image extension (``image_ext`` picks
one). Texts come from the sample's ``.json`` when it has a ``texts`` list (what
:func:`write_shards` writes: ids, captions, languages, fields and the other images a text
matches), else from ``.txt`` (one caption; ``text="lines"`` reads one caption per line, as
CLIP_benchmark's retrieval shards hold them), else from a ``caption`` in ``.json``
(img2dataset). Image ids are the ``.json``'s ``image_id``, else the key.

**Safety.** Member names that are absolute or contain ``..``, links and device members,
members larger than ``max_member_bytes`` and zstd-compressed shards are refused with an error
naming the shard and member; members with other extensions (``.pyd``, ``.pickle``, ``.npy``
...) are never read, let alone unpickled.
"""
from __future__ import annotations

import bz2
import errno
import gzip
import hashlib
import io
import json
import logging
import lzma
import os
import shutil
import tarfile
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from ..errors import ConfigError, DataError
from ..utils import atomic_write, atomic_write_json, atomic_write_text, cache_dir
from .base import DATASETS, PATTERN_FORMATS, CrossModalDataset, GroundTruth
from .images import DEFAULT_MAX_PIXELS, open_image
from .table import bool_option, check_options, int_option, parse_json, progress_bar

logger = logging.getLogger(__name__)

#: member extensions read as images, in the order a sample's image is chosen
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff", "ppm")
#: largest member read by default (an image file or a sample's text)
DEFAULT_MAX_MEMBER_BYTES = 64 << 20
INDEX_SUFFIX = ".idx"
INDEX_FORMAT = "xmodal-webdataset-index"
INDEX_VERSION = 1
SHARD_PREFIX = "shard"
MANIFEST = "manifest.json"
#: ``image_paths`` of a WebDataset split are virtual: ``wds://SHARD::MEMBER`` (SHARD relative to ``root``)
URI_SCHEME = "wds://"
_OPTIONS = ("image_ext", "text", "max_member_bytes", "max_pixels", "shard_split")
_COMPRESSED = {b"\x1f\x8b": "gzip", b"BZh": "bzip2", b"\xfd7zXZ": "xz", b"\x28\xb5\x2f\xfd": "zstd"}
_OPENERS: dict[str, Callable[[Any], Any]] = {"gzip": lambda f: gzip.GzipFile(fileobj=f, mode="rb"),
                                             "bzip2": bz2.BZ2File, "xz": lzma.LZMAFile}
#: file names read as shards (a compressed one is decompressed into the cache once)
SHARD_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz")
PLAIN_FORMAT = "xmodal-decompressed-shard"

PATTERN_FORMATS.add("webdataset")


# shards -----------------------------------------------------------------------------------
def expand_shards(path: str | Path, split: str | None = None) -> list[Path]:
    """The shard files ``path`` names for ``split`` (see the module docstring), in order."""
    from braceexpand import braceexpand

    text = str(path)
    if split is not None and "{split}" in text:
        text = text.replace("{split}", split)
    p = Path(text).expanduser()
    if p.is_dir():
        folder = p / split if split is not None and (p / split).is_dir() else p
        shards = _shards_in(folder)
        if not shards:
            have = sorted(d.name for d in p.iterdir() if d.is_dir() and _shards_in(d))
            hint = f"; splits present: {', '.join(have)}" if have else ""
            raise DataError(f"{p}: no .tar shards in {folder}{hint}")
        return shards
    shards = [Path(s).expanduser() for s in braceexpand(text)]
    missing = [s for s in shards if not s.is_file()]
    if missing:
        raise DataError(f"{missing[0]}: no such shard ({len(missing)} of the {len(shards)} shards "
                        f"{text!r} names are missing)")
    for s in shards:
        if not s.name.endswith(SHARD_SUFFIXES):
            raise DataError(f"{s}: not a tar shard (xmodal reads {', '.join(SHARD_SUFFIXES)} files)")
    return shards


def _shards_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.name.endswith(SHARD_SUFFIXES) and p.is_file())


def splits(path: str | Path) -> list[str]:
    """Split folders holding shards (``DIR/{split}/*.tar``), else ``["all"]``."""
    p = Path(path)
    if p.is_dir():
        found = sorted(d.name for d in p.iterdir() if d.is_dir() and _shards_in(d))
        if found:
            return found
    return ["all"]


def rank_shards(shards: Sequence[Any], env: Any) -> list[Any]:
    """This process's shards: a contiguous run of whole shards, disjoint between ranks (across
    nodes too: ``env.rank`` is the global rank). Every rank must get at least one."""
    from ..distributed import shard_bounds

    if len(shards) < env.world_size:
        raise DataError(f"{len(shards)} shard(s) for {env.world_size} processes: every process needs at least "
                        "one; write smaller shards (xmodal export --shard-size) or run fewer processes")
    lo, hi = shard_bounds(len(shards), env)
    return list(shards[lo:hi])


def rank_cuts(n: int, world_size: int, batch_size: int, shard_starts: np.ndarray | None) -> list[int]:
    """Where sharded extraction cuts ``n`` images between ``world_size`` ranks (rank ``r`` gets
    images ``cuts[r]..cuts[r+1]``).

    Cuts always fall on whole batches (:func:`xmodal.distributed.shard_bounds`), so every rank
    runs exactly the batches of a 1-process run and the merged features are bit-identical to it
    (a convolutional tower's output on CPU changes in the last bits with its batch). With
    ``shard_starts`` (a WebDataset split: the image where each shard begins), each cut moves to
    the nearest shard start that is also a batch start (the lower one on a tie), so that every
    rank reads whole shards, as long as that keeps the work balanced: the busiest rank gets at
    most 10% more images, or one batch more, than under the plain batch cuts. Otherwise the batch
    cuts stay, and a shard on a cut is read, by offset, by the two ranks either side. Shards of
    a multiple of the batch size (``xmodal export --shard-size 1024`` for batches of 64) are
    always cut whole when their count allows a balanced split.
    """
    from ..distributed import DistEnv, shard_bounds

    cuts = [shard_bounds(n, DistEnv(rank=r, world_size=world_size), align=batch_size)[0]
            for r in range(world_size)] + [n]
    if shard_starts is None or world_size == 1:
        return cuts
    starts = np.asarray(shard_starts, np.int64)
    starts = np.union1d(starts[starts % batch_size == 0], [0, n])  # (C,) sorted: shard and batch starts, the end
    near = []
    for c in cuts[1:-1]:
        k = int(np.searchsorted(starts, c))  # starts[k - 1] < c <= starts[k]
        lo, hi = int(starts[max(k - 1, 0)]), int(starts[min(k, len(starts) - 1)])
        near.append(hi if hi - c < c - lo else lo)
    snapped = [0, *near, n]
    busiest, ideal = max(np.diff(snapped)), max(np.diff(cuts))
    return snapped if busiest <= ideal + max(batch_size, int(0.1 * ideal)) else cuts


def extraction_bounds(dataset: CrossModalDataset, rank: int, world_size: int, batch_size: int) -> tuple[int, int]:
    """Rank ``rank``'s images ``[lo, hi)`` in sharded feature extraction (:func:`rank_cuts`): on
    shard boundaries for a WebDataset split read in shard order, else on batch boundaries."""
    pixels = dataset.meta.get("pixels") if isinstance(dataset.meta, dict) else None
    starts = pixels.shard_starts() if isinstance(pixels, TarImages) else None
    cuts = rank_cuts(dataset.num_images, world_size, batch_size, starts)
    return cuts[rank], cuts[rank + 1]


def split_key(name: str) -> tuple[str, str]:
    """``("dir/000001", "jpg")`` for member ``dir/000001.jpg``: the key ends at the base name's first dot."""
    folder, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), (ext if dot else "")


# the member index -------------------------------------------------------------------------
@dataclass
class ShardIndex:
    """The regular-file members of one shard: names, data offsets and sizes, in tar order."""

    path: Path
    names: list[str]
    offsets: np.ndarray  # (K,) int64 byte offset of each member's data
    sizes: np.ndarray  # (K,) int64


def _check_member(shard: Path, m: tarfile.TarInfo, max_bytes: int) -> None:
    name = m.name.replace("\\", "/")
    if name.startswith("/") or ".." in PurePosixPath(name).parts or name[1:2] == ":":
        raise DataError(f"{shard}: member {m.name!r}: unsafe name (absolute or containing '..')")
    if not m.isfile():
        kind = "link" if (m.issym() or m.islnk()) else "special file"
        raise DataError(f"{shard}: member {m.name!r} is a {kind}, not a regular file")
    if m.size > max_bytes:
        raise DataError(f"{shard}: member {m.name!r} is {m.size:,} bytes, above max_member_bytes={max_bytes:,}")
    if not split_key(m.name)[1]:
        raise DataError(f"{shard}: member {m.name!r} has no extension, so it belongs to no sample field")


def compression(shard: Path) -> str | None:
    """``"gzip"``, ``"bzip2"``, ``"xz"`` or ``"zstd"`` when ``shard`` starts with that format's magic, else None."""
    try:
        with open(shard, "rb") as f:
            head = f.read(6)
    except OSError as exc:
        raise DataError(f"{shard}: cannot read the shard: {exc}") from None
    return next((kind for magic, kind in _COMPRESSED.items() if head.startswith(magic)), None)


def scan_shard(shard: Path, max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES,
               name: Path | None = None) -> ShardIndex:
    """Read every member header of the uncompressed tar ``shard`` (no member data) and check it;
    messages call it ``name`` (the compressed shard it was decompressed from) when given."""
    label = name or shard
    kind = compression(shard)
    if kind is not None:
        raise DataError(f"{shard}: {kind}-compressed shard; members are read by offset, so read it through "
                        "plain_shard (its decompressed copy)")
    names: list[str] = []
    offsets: list[int] = []
    sizes: list[int] = []
    try:
        with tarfile.open(shard, "r:") as tf:
            while (m := tf.next()) is not None:  # headers only: member data is skipped, not read
                tf.members.clear()  # keep memory flat on large shards
                if m.isdir():
                    continue
                _check_member(label, m, max_member_bytes)
                names.append(m.name)
                offsets.append(m.offset_data)
                sizes.append(m.size)
    except tarfile.TarError as exc:
        raise DataError(f"{label}: not a readable tar file: {exc}") from None
    return ShardIndex(shard, names, np.asarray(offsets, np.int64), np.asarray(sizes, np.int64))


def _index_locations(shard: Path) -> list[Path]:
    digest = hashlib.sha256(str(shard.resolve()).encode("utf-8", "surrogatepass")).hexdigest()[:24]
    return [shard.with_name(shard.name + INDEX_SUFFIX), cache_dir() / "webdataset" / f"{digest}{INDEX_SUFFIX}"]


def _stamp(shard: Path) -> dict:
    st = shard.stat()
    return {"format": INDEX_FORMAT, "version": INDEX_VERSION, "tar_size": st.st_size, "tar_mtime_ns": st.st_mtime_ns}


def _load_index(shard: Path, stamp: dict) -> ShardIndex | None:
    for loc in _index_locations(shard):
        try:
            obj = json.loads(loc.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(obj, dict) and all(obj.get(k) == v for k, v in stamp.items()):
            names, offsets, sizes = obj.get("names"), obj.get("offsets"), obj.get("sizes")
            if isinstance(names, list) and isinstance(offsets, list) and len(names) == len(offsets) == len(sizes):
                return ShardIndex(shard, names, np.asarray(offsets, np.int64), np.asarray(sizes, np.int64))
        logger.info("%s: stale or unreadable index, rebuilding", loc)
    return None


def shard_index(shard: Path, max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES,
                name: Path | None = None) -> ShardIndex:
    """The member index of ``shard``: its ``.idx`` sidecar when current, else a scan that writes one
    (``name``: the shard as messages call it, see :func:`scan_shard`)."""
    stamp = _stamp(shard)
    idx = _load_index(shard, stamp)
    if idx is not None:
        too_big = np.flatnonzero(idx.sizes > max_member_bytes)
        if len(too_big):
            k = int(too_big[0])
            raise DataError(f"{name or shard}: member {idx.names[k]!r} is {int(idx.sizes[k]):,} bytes, "
                            f"above max_member_bytes={max_member_bytes:,}")
        return idx
    idx = scan_shard(shard, max_member_bytes, name)
    blob = json.dumps({**stamp, "names": idx.names, "offsets": idx.offsets.tolist(), "sizes": idx.sizes.tolist()})
    for loc in _index_locations(shard):
        try:
            atomic_write_text(loc, blob)
            break
        except OSError as exc:  # a read-only shard folder: the cache copy
            logger.debug("cannot write %s (%s)", loc, exc)
    return idx


# compressed shards ------------------------------------------------------------------------
def _plain_locations(shard: Path) -> tuple[Path, Path]:
    digest = hashlib.sha256(str(shard.resolve()).encode("utf-8", "surrogatepass")).hexdigest()[:24]
    folder = cache_dir() / "webdataset" / "plain"
    return folder / f"{digest}.tar", folder / f"{digest}.json"


def _expected_size(shard: Path, kind: str, compressed: int) -> int:
    """Bytes the decompressed shard needs at least: gzip's trailer (size mod 2**32), else the compressed size."""
    if kind == "gzip" and compressed >= 4:
        with open(shard, "rb") as f:
            f.seek(-4, os.SEEK_END)
            isize = int.from_bytes(f.read(4), "little")
        while isize < compressed:  # the trailer keeps the size modulo 4 GiB
            isize += 1 << 32
        return isize
    return compressed


class _Corrupt(Exception):
    """The compressed stream could not be read (raised inside the atomic write, turned into a DataError)."""


def _copy_decompressed(shard: Path, kind: str, tmp: Path, compressed: int) -> None:
    with open(shard, "rb") as raw, _OPENERS[kind](raw) as src, open(tmp, "wb") as dst, \
            progress_bar(f"decompressing {shard.name}", compressed) as advance:
        done = 0
        while True:
            try:
                chunk = src.read(1 << 20)
            except (EOFError, OSError, lzma.LZMAError) as exc:  # gzip.BadGzipFile is an OSError
                raise _Corrupt(str(exc)) from None
            if not chunk:
                break
            dst.write(chunk)
            advance(raw.tell() - done)
            done = raw.tell()


def _decompress(shard: Path, kind: str, out: Path, compressed: int) -> None:
    need = _expected_size(shard, kind, compressed)
    hint = "point XMODAL_CACHE at a larger disk or decompress the shards yourself"
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(out.parent).free
        if free < need:
            raise DataError(f"{shard}: decompressing this {kind} shard needs about {need:,} bytes in "
                            f"{out.parent}, which has {free:,} free; {hint}")
        atomic_write(out, lambda tmp: _copy_decompressed(shard, kind, tmp, compressed))
    except _Corrupt as exc:
        raise DataError(f"{shard}: corrupt or truncated {kind} data: {exc}") from None
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise DataError(f"{shard}: no space left in {out.parent} while decompressing it; {hint}") from None
        raise DataError(f"{shard}: cannot write its decompressed copy in {out.parent}: {exc}") from None


def plain_shard(shard: Path) -> Path:
    """``shard`` itself when it is an uncompressed tar; for a gzip, bzip2 or xz shard, its decompressed
    copy in the xmodal cache, made once and remade when the shard's size or mtime changes."""
    kind = compression(shard)
    if kind is None:
        return shard
    if kind not in _OPENERS:
        raise DataError(f"{shard}: {kind}-compressed shard; xmodal decompresses gzip, bzip2 and xz shards, "
                        f"not {kind}: decompress it first")
    out, stamp_path = _plain_locations(shard)
    st = shard.stat()
    stamp = {"format": PLAIN_FORMAT, "source": str(shard.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    if _plain_is_current(out, stamp_path, stamp):
        return out
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataError(f"{shard}: cannot write its decompressed copy in {out.parent}: {exc}") from None
    with _exclusive(stamp_path.with_suffix(".lock")):  # processes on one machine decompress a shard once
        if not _plain_is_current(out, stamp_path, stamp):
            logger.info("%s: decompressing into %s", shard, out)
            _decompress(shard, kind, out, st.st_size)
            atomic_write_json(stamp_path, {**stamp, "plain_bytes": out.stat().st_size})
    return out


def _plain_is_current(out: Path, stamp_path: Path, stamp: dict) -> bool:
    try:
        return json.loads(stamp_path.read_text(encoding="utf-8")) == {**stamp, "plain_bytes": out.stat().st_size}
    except (OSError, ValueError):
        return False


@contextmanager
def _exclusive(lock: Path) -> Iterator[None]:
    """An exclusive advisory lock on ``lock`` (``flock``; none where it does not exist)."""
    try:
        import fcntl
    except ImportError:  # not POSIX: two processes may both decompress; the renames keep it correct
        yield
        return
    try:
        f = open(lock, "a+b")
    except OSError:  # an unwritable cache: decompressing fails with its own message
        yield
        return
    with f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


# reading members --------------------------------------------------------------------------
class _Files:
    """Open shard files, shared by threads (``os.pread`` keeps no file position)."""

    def __init__(self) -> None:
        self._fds: dict[str, int] = {}
        self._lock = threading.Lock()

    def read(self, path: str, offset: int, size: int) -> bytes:
        with self._lock:
            fd = self._fds.get(path)
            if fd is None:
                fd = self._fds[path] = os.open(path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
        data = os.pread(fd, size, offset)
        if len(data) != size:
            raise DataError(f"{path}: shard ends inside a member at byte {offset} (truncated since it was indexed)")
        return data

    def close(self) -> None:
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()

    def __del__(self) -> None:
        self.close()


class TarImages:
    """The images of a WebDataset split, read from their shards by offset.

    ``images[i]`` is image ``i`` as an RGB :class:`PIL.Image.Image`, checked and decoded by
    :func:`xmodal.data.images.open_image` (the same checks and pixels as an image file);
    :meth:`read_bytes` gives the stored bytes. The object pickles without open files, so it
    goes into DataLoader workers; ``shards_read()`` lists the shards this process opened.
    ``shards`` are the files read (uncompressed tars); ``names``, when given, the shards as the
    dataset names them (a compressed shard, for its decompressed copy), used in labels.
    """

    def __init__(self, shards: Sequence[str], refs: np.ndarray, members: Sequence[str],
                 max_pixels: int | None = DEFAULT_MAX_PIXELS, names: Sequence[str] | None = None) -> None:
        self.shards = [str(s) for s in shards]
        self.names = [str(s) for s in names] if names is not None else list(self.shards)
        self.refs = np.asarray(refs, dtype=np.int64).reshape(-1, 3)  # (N, 3): shard, offset, size
        self.members = list(members)
        self.max_pixels = max_pixels
        self._files = _Files()
        self._read: set[int] = set()

    def __len__(self) -> int:
        return len(self.members)

    def label(self, i: int) -> str:
        return f"{self.names[int(self.refs[i, 0])]}::{self.members[i]}"

    def ext(self, i: int) -> str:
        return split_key(self.members[i])[1].lower()

    def read_bytes(self, i: int) -> bytes:
        s, off, size = (int(v) for v in self.refs[int(i)])
        self._read.add(s)
        return self._files.read(self.shards[s], off, size)

    def __getitem__(self, i: int):
        return open_image(self.label(int(i)), data=self.read_bytes(int(i)), max_pixels=self.max_pixels)

    def select(self, keep: np.ndarray | Sequence[int]) -> "TarImages":
        keep = np.asarray(keep, dtype=np.int64)
        return TarImages(self.shards, self.refs[keep], [self.members[k] for k in keep], self.max_pixels, self.names)

    def shards_read(self) -> list[str]:
        return [self.names[s] for s in sorted(self._read)]

    def shard_starts(self) -> np.ndarray | None:
        """Image positions where a new shard begins (0 first), or None when images are not grouped
        by shard (a selection that interleaves shards)."""
        s = self.refs[:, 0]  # (N,) shard of each image
        if not len(s):
            return np.zeros(1, np.int64)
        starts = np.concatenate([[0], np.flatnonzero(s[1:] != s[:-1]) + 1]).astype(np.int64)
        return starts if len(np.unique(s[starts])) == len(starts) else None

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k not in ("_files", "_read")}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._files, self._read = _Files(), set()


# samples ----------------------------------------------------------------------------------
def group_samples(names: Sequence[str]) -> dict[str, dict[str, int]]:
    """``{key: {ext: member index}}`` in order of each key's first member (webdataset's grouping)."""
    out: dict[str, dict[str, int]] = {}
    for k, name in enumerate(names):
        key, ext = split_key(name)
        out.setdefault(key, {})[ext] = k
    return out


def pick_image(shard: Path, key: str, members: dict[str, int], image_ext: str | None) -> int:
    """The member index of a sample's image: ``image_ext``'s member, else the first of :data:`IMAGE_EXTS`."""
    lowered = {ext.lower(): k for ext, k in members.items()}
    for ext in ([image_ext] if image_ext else IMAGE_EXTS):
        if ext in lowered:
            return lowered[ext]
    want = image_ext or "/".join(IMAGE_EXTS)
    raise DataError(f"{shard}: sample {key!r} has no image member ({want}); its members: "
                    f"{', '.join(sorted(members))}")


def _str_field(value: Any, loc: str, name: str, *, required: bool = True) -> str | None:
    if value is None and not required:
        return None
    if not isinstance(value, str) or (required and not value.strip()):
        raise DataError(f"{loc}: field {name!r}: expected non-empty text, got {value!r}")
    return value


def _xmodal_texts(obj: dict, loc: str) -> list[dict]:
    """The ``texts`` list of a sample's ``.json`` as written by :func:`write_shards`, checked."""
    texts = obj["texts"]
    if not isinstance(texts, list):
        raise DataError(f"{loc}: field 'texts': expected a list, got {type(texts).__name__}")
    out = []
    for j, t in enumerate(texts):
        at = f"{loc}: texts[{j}]"
        if not isinstance(t, dict):
            raise DataError(f"{at}: expected an object, got {type(t).__name__}")
        fields = t.get("fields")
        if fields is not None and not (isinstance(fields, dict) and all(isinstance(v, str) for v in fields.values())):
            raise DataError(f"{at}: field 'fields': expected an object of texts")
        also = t.get("also", [])
        if not isinstance(also, list) or not all(isinstance(a, str) for a in also):
            raise DataError(f"{at}: field 'also': expected a list of image ids")
        out.append({"id": _str_field(t.get("id"), at, "id"), "caption": _str_field(t.get("caption"), at, "caption"),
                    "lang": _str_field(t.get("lang"), at, "lang", required=False), "fields": fields, "also": also})
    return out


def _decode_text(data: bytes, loc: str) -> str:
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(f"{loc}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None


def sample_texts(read: Any, shard: Path, key: str, members: dict[str, int], names: Sequence[str],
                 text_mode: str) -> tuple[str | None, list[dict]]:
    """``(image id from .json or None, texts)`` of one sample; ``read(k)`` returns member ``k``'s bytes."""
    obj = None
    if "json" in members:
        loc = f"{shard}::{names[members['json']]}"
        obj = parse_json(read(members["json"]), Path(loc))
        if not isinstance(obj, dict):
            raise DataError(f"{loc}: expected a JSON object, got {type(obj).__name__}")
        image_id = _str_field(obj.get("image_id"), loc, "image_id", required=False)
        if "texts" in obj:
            return image_id, _xmodal_texts(obj, loc)
    else:
        image_id = None
    if "txt" in members:
        loc = f"{shard}::{names[members['txt']]}"
        text = _decode_text(read(members["txt"]), loc)
        caps = [c for c in text.splitlines() if c.strip()] if text_mode == "lines" else [text.strip()]
        caps = [c for c in caps if c]
        ids = [key] if text_mode == "one" else [f"{key}#{j}" for j in range(len(caps))]
        return image_id, [{"id": i, "caption": c} for i, c in zip(ids, caps)]
    if obj is not None and isinstance(obj.get("caption"), str) and obj["caption"].strip():
        return image_id, [{"id": key, "caption": obj["caption"].strip()}]
    return image_id, []


class _Builder:
    """Accumulates images and texts shard by shard into one :class:`CrossModalDataset`."""

    def __init__(self) -> None:
        self.image_ids: list[str] = []
        self.shards: list[str] = []
        self.where: dict[str, int] = {}  # image id -> image
        self.refs: list[tuple[int, int, int]] = []
        self.members: list[str] = []
        self.labels: list[str] = []
        self.text_ids: list[str] = []
        self.text_where: dict[str, int] = {}  # text id -> text
        self.captions: list[str] = []
        self.langs: list[str | None] = []
        self.fields: list[dict | None] = []
        self.text_image: list[int] = []
        self.also: list[tuple[int, str, str]] = []

    def add_image(self, image_id: str, loc: str, ref: tuple[int, int, int], member: str, label: str) -> int:
        if image_id in self.where:
            raise DataError(f"{loc}: duplicate image id {image_id!r} (first at {self.loc(self.where[image_id])})")
        self.where[image_id] = len(self.image_ids)
        self.image_ids.append(image_id)
        self.refs.append(ref)
        self.members.append(member)
        self.labels.append(label)
        return len(self.image_ids) - 1

    def add_text(self, t: dict, image: int, loc: str) -> None:
        if t["id"] in self.text_where:
            first = self.loc(self.text_image[self.text_where[t["id"]]])
            raise DataError(f"{loc}: duplicate text id {t['id']!r} (first at {first})")
        self.text_where[t["id"]] = len(self.text_ids)
        self.text_ids.append(t["id"])
        self.captions.append(t["caption"])
        self.langs.append(t.get("lang"))
        self.fields.append(t.get("fields"))
        self.text_image.append(image)
        self.also += [(len(self.text_ids) - 1, a) for a in t.get("also", ())]

    def loc(self, image: int) -> str:
        """``SHARD::KEY`` of an image's sample, for messages."""
        return f"{self.shards[self.refs[image][0]]}::{split_key(self.members[image])[0]}"

    def ground_truth(self) -> GroundTruth:
        index = self.where
        t = list(range(len(self.text_ids)))
        i = list(self.text_image)
        for text, image_id in self.also:
            if image_id not in index:
                raise DataError(f"{self.loc(self.text_image[text])}: text {self.text_ids[text]!r} also matches image {image_id!r}, "
                                "which is in none of the shards read")
            t.append(text)
            i.append(index[image_id])
        return GroundTruth.from_pairs(np.asarray(t, np.int64), np.asarray(i, np.int64), len(self.text_ids),
                                      len(self.image_ids))

    def text_extras(self) -> tuple[list[str] | None, dict[str, list[str]] | None]:
        langs = self.langs if self.langs and all(x is not None for x in self.langs) else None
        keys = {tuple(sorted(f)) for f in self.fields if f is not None}
        fields = None
        if self.fields and len(keys) == 1 and all(f is not None for f in self.fields):
            fields = {k: [f[k] for f in self.fields] for k in next(iter(keys))}
        return langs, fields


@dataclass
class SampleRecord:
    """One sample as the reader sees it: where its image is and its texts (no image bytes)."""

    shard: int  # position of its shard in the split's shard list
    key: str
    loc: str  # SHARD::KEY, for messages
    image_id: str
    member: str  # the image member's name
    offset: int
    size: int
    label: str  # wds://SHARD::MEMBER, SHARD relative to the shards' common folder
    texts: list[dict]


@dataclass
class SplitShards:
    """The shards of one split: as named (``shards``), as read (``plain``: decompressed copies of
    compressed shards), and their common folder ``root`` that labels are relative to."""

    shards: list[Path]
    plain: list[Path]
    root: Path


def split_shards(path: str | Path, split: str, shard_split: str = "none") -> SplitShards:
    """The shards ``path`` names for ``split`` (this process's with ``shard_split="rank"``),
    compressed ones decompressed into the cache (:func:`plain_shard`)."""
    shards = [s.absolute() for s in expand_shards(path, split)]
    if shard_split == "rank":
        from ..distributed import env_from_environ

        shards = rank_shards(shards, env_from_environ())
    root = Path(os.path.commonpath([str(s.parent) for s in shards]))
    return SplitShards(shards, [plain_shard(s) for s in shards], root)


def iter_records(found: SplitShards, *, image_ext: str | None = None, text_mode: str = "one",
                 max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES,
                 on_shard: Callable[[int], None] | None = None) -> Iterator[SampleRecord]:
    """Stream the samples of ``found``'s shards, one at a time, in the reader's order: member
    headers come from each shard's index, and only text members (``.json``, ``.txt``) are read.
    ``on_shard(s)`` is called after shard ``s``'s last sample."""
    files = _Files()
    try:
        for s, (shard, plain) in enumerate(zip(found.shards, found.plain)):
            idx = shard_index(plain, max_member_bytes, shard)
            rel = os.path.relpath(shard, found.root)
            read = lambda k, p=str(plain), i=idx: files.read(p, int(i.offsets[k]), int(i.sizes[k]))  # noqa: E731
            for key, members in group_samples(idx.names).items():
                img = pick_image(shard, key, members, image_ext)
                json_id, texts = sample_texts(read, shard, key, members, idx.names, text_mode)
                member = idx.names[img]
                yield SampleRecord(s, key, f"{shard}::{key}", json_id or key, member, int(idx.offsets[img]),
                                   int(idx.sizes[img]), f"{URI_SCHEME}{rel}::{member}", texts)
            if on_shard is not None:
                on_shard(s)
    finally:
        files.close()


def reader_options(image_ext: str | None = None, text: str = "one", max_member_bytes: Any = DEFAULT_MAX_MEMBER_BYTES,
                   max_pixels: Any = DEFAULT_MAX_PIXELS, shard_split: str = "none", **unknown: Any) -> dict:
    """The reader's options checked and normalised (an unknown or bad one is a ConfigError)."""
    check_options("webdataset", unknown, _OPTIONS)
    if text not in ("one", "lines"):
        raise ConfigError(f"dataset format 'webdataset': option text must be one or lines, got {text!r}")
    if shard_split not in ("none", "rank"):
        raise ConfigError(f"dataset format 'webdataset': option shard_split must be none or rank, got {shard_split!r}")
    return {"image_ext": str(image_ext).lower().lstrip(".") if image_ext else None, "text_mode": text,
            "max_member_bytes": int_option("webdataset", "max_member_bytes", max_member_bytes),
            "max_pixels": None if max_pixels in (None, 0) else int_option("webdataset", "max_pixels", max_pixels),
            "shard_split": shard_split}


def _dataset_name(path: str | Path) -> str:
    """``coco-wds`` for ``coco-wds/``, ``coco-wds/{split}/...`` or ``shards-{0..9}.tar`` -> ``shards``."""
    parts = [p for p in Path(str(path)).parts if p not in ("{split}",)]
    name = parts[-1] if parts else ""
    if "{" in name or name.endswith(".tar"):
        stem = name.split("{")[0].removesuffix(".tar").rstrip("-_.")
        name = stem or (parts[-2] if len(parts) > 1 else "")
    return name or "webdataset"


@DATASETS.register("webdataset")
def read(path: str | Path, split: str, **options: Any) -> CrossModalDataset:
    """Read the samples of WebDataset shards (see the module docstring).

    Options: ``image_ext`` (the member read as the image), ``text`` (``one`` or ``lines``),
    ``max_member_bytes``, ``max_pixels``, and ``shard_split="rank"``, which reads only this
    process's shards under ``torchrun`` (:func:`rank_shards`: contiguous, disjoint between
    ranks and nodes).
    """
    opts = reader_options(**options)
    found = split_shards(path, split, opts["shard_split"])
    b = _Builder()
    b.shards = [str(s) for s in found.shards]
    with progress_bar("reading shards", len(found.shards)) as advance:
        for rec in iter_records(found, image_ext=opts["image_ext"], text_mode=opts["text_mode"],
                                max_member_bytes=opts["max_member_bytes"], on_shard=lambda s: advance(1)):
            i = b.add_image(rec.image_id, rec.loc, (rec.shard, rec.offset, rec.size), rec.member, rec.label)
            for t in rec.texts:
                b.add_text(t, i, rec.loc)
    if not b.image_ids:
        raise DataError(f"{path}: the shards hold no samples")
    langs, fields = b.text_extras()
    shards = [str(s) for s in found.shards]
    return CrossModalDataset(
        name=_dataset_name(path), split=split,
        image_ids=b.image_ids, text_ids=b.text_ids, captions=b.captions, gt=b.ground_truth(),
        image_paths=b.labels, langs=langs, fields=fields, root=found.root,
        meta={"format": "webdataset", "source": str(path), "shards": shards,
              "pixels": TarImages([str(p) for p in found.plain], np.asarray(b.refs, np.int64), b.members,
                                  opts["max_pixels"], names=shards)},
    )


# writing ----------------------------------------------------------------------------------
_PIL_EXT = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp", "BMP": "bmp", "GIF": "gif", "TIFF": "tiff", "PPM": "ppm"}


def _sniff_ext(data: bytes, label: str) -> str:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as img:
            fmt = img.format
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise DataError(f"{label}: not a recognised image file ({exc})") from None
    if fmt not in _PIL_EXT:
        raise DataError(f"{label}: {fmt} images cannot go into a shard; use one of {', '.join(_PIL_EXT)}")
    return _PIL_EXT[fmt]


def image_payload(ds: CrossModalDataset, i: int) -> tuple[bytes, str]:
    """Image ``i``'s stored bytes and member extension: the file's own bytes (never re-encoded),
    a shard member's bytes, or a lossless PNG of a packaged pixel accessor's image."""
    pixels = ds.meta.get("pixels") if isinstance(ds.meta, dict) else None
    if isinstance(pixels, TarImages):
        return pixels.read_bytes(i), pixels.ext(i)
    if ds.image_paths is not None and ds.image_paths[i] is not None and pixels is None:
        path = ds.image_path(i)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise DataError(f"{path}: no such image file (image {ds.image_ids[i]!r})") from None
        except OSError as exc:
            raise DataError(f"{path}: cannot read the image file: {exc}") from None
        ext = path.suffix.lower().lstrip(".")
        return data, ext if ext in IMAGE_EXTS else _sniff_ext(data, str(path))
    if pixels is not None:
        buf = io.BytesIO()
        pixels[i].save(buf, format="PNG")
        return buf.getvalue(), "png"
    raise DataError(f"{ds.name}/{ds.split}: dataset holds feature rows only, no images to write into shards")


def _image_present(ds: CrossModalDataset) -> np.ndarray:
    """(N,) bool: images whose bytes can be read (files that exist; every pixel-accessor image)."""
    if ds.meta.get("pixels") is not None or ds.image_paths is None:
        return np.ones(ds.num_images, dtype=bool)
    return np.fromiter((p is not None and ds.image_path(i).is_file() for i, p in enumerate(ds.image_paths)),
                       dtype=bool, count=ds.num_images)


def _plan_texts(ds: CrossModalDataset, present: np.ndarray) -> tuple[list[list[int]], np.ndarray]:
    """Texts of each image's sample (a text goes with its lowest-indexed present image) and the
    texts left with no present image (they cannot be stored)."""
    per_image: list[list[int]] = [[] for _ in range(ds.num_images)]
    dropped = []
    for t in range(ds.num_texts):
        imgs = [int(i) for i in ds.gt.images_of(t) if present[i]]
        if imgs:
            per_image[imgs[0]].append(t)
        else:
            dropped.append(t)
    return per_image, np.asarray(dropped, dtype=np.int64)


def _sample(ds: CrossModalDataset, i: int, texts: list[int], present: np.ndarray) -> dict:
    entries = []
    for t in texts:
        e: dict[str, Any] = {"id": ds.text_ids[t], "caption": ds.captions[t]}
        if ds.langs is not None:
            e["lang"] = ds.langs[t]
        if ds.fields:
            e["fields"] = {k: v[t] for k, v in ds.fields.items()}
        also = [ds.image_ids[j] for j in ds.gt.images_of(t) if j != i and present[j]]
        if also:
            e["also"] = also
        entries.append(e)
    return {"image_id": ds.image_ids[i], "texts": entries}


def _write_one_shard(ds: CrossModalDataset, path: Path, images: range, per_image: list[list[int]],
                     present: np.ndarray) -> None:
    from webdataset import TarWriter

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            sink = TarWriter(f, encoder=False, mtime=0.0, user="xmodal", group="xmodal")
            for i in images:
                if not present[i]:
                    continue
                data, ext = image_payload(ds, i)
                obj = _sample(ds, i, per_image[i], present)
                sample = {"__key__": f"{i:09d}", ext: data,
                          "json": json.dumps(obj, ensure_ascii=False).encode("utf-8")}
                if obj["texts"]:
                    sample["txt"] = obj["texts"][0]["caption"].encode("utf-8")  # what OpenCLIP reads
                sink.write(sample)
            sink.close()

    atomic_write(path, write)


def _export_inputs(ds: CrossModalDataset, shard_size: int, present: np.ndarray, source: dict) -> dict:
    h = hashlib.sha256()
    for part in (ds.image_ids, ds.text_ids, ds.captions):
        for x in part:
            h.update(str(x).encode("utf-8", "surrogatepass") + b"\0")
    h.update(ds.gt.indptr.tobytes() + ds.gt.indices.tobytes())
    return {**source, "dataset": ds.name, "split": ds.split, "images": ds.num_images, "texts": ds.num_texts,
            "content_sha256": h.hexdigest(), "shard_size": shard_size, "missing_images": int((~present).sum())}


def _prepare_out(out_dir: Path, inputs: dict, overwrite: bool) -> dict | None:
    """The finished manifest when ``out_dir`` already holds this export; else clear what
    belongs to another export (``overwrite``) and record the inputs, so a rerun resumes."""
    state = out_dir / ".export.json"
    if state.is_file():
        try:
            old = json.loads(state.read_text(encoding="utf-8"))
        except ValueError:
            old = None
        if old != inputs:
            if not overwrite:
                raise DataError(f"{out_dir}: holds shards of another export ({state}); pass overwrite "
                                "(--overwrite) to replace them, or choose another folder")
            for p in [*out_dir.glob(f"{SHARD_PREFIX}-*.tar"), *out_dir.glob(f"{SHARD_PREFIX}-*.tar{INDEX_SUFFIX}"),
                      out_dir / MANIFEST]:
                p.unlink(missing_ok=True)
        elif (out_dir / MANIFEST).is_file():
            manifest = json.loads((out_dir / MANIFEST).read_text(encoding="utf-8"))
            if all((out_dir / name).is_file() for name in manifest.get("shards", [])):
                return {**manifest, "shards_written_this_run": 0}
    elif any(out_dir.glob("*.tar")):
        if not overwrite:
            raise DataError(f"{out_dir}: already holds .tar files not written by xmodal export; choose an empty "
                            "folder or pass overwrite (--overwrite)")
        for p in out_dir.glob(f"{SHARD_PREFIX}-*.tar"):
            p.unlink()
    atomic_write_json(state, inputs)
    (out_dir / MANIFEST).unlink(missing_ok=True)
    return None


def write_shards(ds: CrossModalDataset, out_dir: str | Path, *, shard_size: int = 1000, skip_missing: bool = False,
                 overwrite: bool = False, progress: bool = True, source: dict | None = None) -> dict:
    """Write one split into ``out_dir/shard-000000.tar, ...`` (``shard_size`` images each) and
    return the manifest (also ``out_dir/manifest.json``).

    Sample ``KEY`` (the image's 9-digit index) holds the image's own bytes (``KEY.jpg``, ...),
    ``KEY.txt`` (its first caption, for OpenCLIP-style training) and ``KEY.json`` (image id
    and every text placed with it: id, caption, language, fields, and ``also``, the other
    images it matches), so the ground truth reads back exactly. Each shard is written to a
    temporary file and renamed; a rerun skips finished shards (resumable).
    """
    shard_size = int_option("webdataset", "shard_size", shard_size)
    skip_missing = bool_option("webdataset", "skip_missing", skip_missing)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    present = _image_present(ds)
    if not skip_missing and not present.all():
        i = int(np.flatnonzero(~present)[0])
        raise DataError(f"{ds.image_path(i)}: no such image file (image {ds.image_ids[i]!r}; "
                        f"{int((~present).sum())} missing in all); pass skip_missing (--skip-missing) to leave them out")
    inputs = _export_inputs(ds, shard_size, present, source or {})
    done = _prepare_out(out_dir, inputs, overwrite)
    if done is not None:
        return done
    per_image, dropped = _plan_texts(ds, present)
    n = ds.num_images
    starts = range(0, n, shard_size)
    written = 0
    with progress_bar(f"writing {ds.name}/{ds.split} shards", len(starts)) if progress else _no_bar() as advance:
        for k, lo in enumerate(starts):
            path = out_dir / f"{SHARD_PREFIX}-{k:06d}.tar"
            if not path.is_file():  # finished shards of an interrupted run are kept
                _write_one_shard(ds, path, range(lo, min(lo + shard_size, n)), per_image, present)
                written += 1
            shard_index(path)  # the .idx sidecar, so readers need not scan
            advance(1)
    manifest = {"inputs": inputs, "shards": [f"{SHARD_PREFIX}-{k:06d}.tar" for k in range(len(starts))],
                "images": int(present.sum()), "texts": ds.num_texts - len(dropped),
                "skipped_images": [ds.image_ids[i] for i in np.flatnonzero(~present)],
                "dropped_texts": [ds.text_ids[t] for t in dropped], "shards_written_this_run": written}
    atomic_write_json(out_dir / MANIFEST, manifest)
    return manifest


class _no_bar:
    def __enter__(self):
        return lambda n=1: None

    def __exit__(self, *exc: Any) -> bool:
        return False


def iter_samples(shards: Sequence[str | Path]) -> Iterator[dict]:
    """Stream raw samples (``{"__key__", "__url__", ext: bytes}``) with the ``webdataset``
    library, shard after shard, nothing decoded (no pickle ever)."""
    import webdataset as wds

    urls = [str(s) for s in shards]
    yield from wds.WebDataset(urls, shardshuffle=False)
