"""WebDataset tar shards: the layout img2dataset writes and OpenCLIP trains on.

A shard is an uncompressed POSIX tar whose members are grouped into samples by key: the
member name up to the first dot of its base name (``000000123.jpg``, ``000000123.txt`` and
``000000123.json`` are one sample). ``path`` is one ``.tar``, a brace pattern
(``shards-{000000..000099}.tar``, expanded with ``braceexpand`` as the ``webdataset``
library does; ``{split}`` is replaced by the split name first), or a folder of shards
(``DIR/{split}/*.tar`` when that folder exists, else ``DIR/*.tar``).

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
members larger than ``max_member_bytes`` and compressed shards are refused with an error
naming the shard and member; members with other extensions (``.pyd``, ``.pickle``, ``.npy``
...) are never read, let alone unpickled.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import tarfile
import threading
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Iterator, Sequence

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
        shards = sorted(folder.glob("*.tar"))
        if not shards:
            have = sorted(d.name for d in p.iterdir() if d.is_dir() and any(d.glob("*.tar")))
            hint = f"; splits present: {', '.join(have)}" if have else ""
            raise DataError(f"{p}: no .tar shards in {folder}{hint}")
        return shards
    shards = [Path(s).expanduser() for s in braceexpand(text)]
    missing = [s for s in shards if not s.is_file()]
    if missing:
        raise DataError(f"{missing[0]}: no such shard ({len(missing)} of the {len(shards)} shards "
                        f"{text!r} names are missing)")
    for s in shards:
        if not s.name.endswith(".tar"):
            raise DataError(f"{s}: not a .tar shard (xmodal reads uncompressed tar files)")
    return shards


def splits(path: str | Path) -> list[str]:
    """Split folders holding shards (``DIR/{split}/*.tar``), else ``["all"]``."""
    p = Path(path)
    if p.is_dir():
        found = sorted(d.name for d in p.iterdir() if d.is_dir() and any(d.glob("*.tar")))
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


def scan_shard(shard: Path, max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES) -> ShardIndex:
    """Read every member header of ``shard`` (no member data) and check it."""
    with open(shard, "rb") as f:
        head = f.read(6)
    for magic, kind in _COMPRESSED.items():
        if head.startswith(magic):
            raise DataError(f"{shard}: {kind}-compressed shard; xmodal reads uncompressed .tar shards "
                            "(random access by offset): decompress it first")
    names: list[str] = []
    offsets: list[int] = []
    sizes: list[int] = []
    try:
        with tarfile.open(shard, "r:") as tf:
            while (m := tf.next()) is not None:  # headers only: member data is skipped, not read
                tf.members.clear()  # keep memory flat on large shards
                if m.isdir():
                    continue
                _check_member(shard, m, max_member_bytes)
                names.append(m.name)
                offsets.append(m.offset_data)
                sizes.append(m.size)
    except tarfile.TarError as exc:
        raise DataError(f"{shard}: not a readable tar file: {exc}") from None
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


def shard_index(shard: Path, max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES) -> ShardIndex:
    """The member index of ``shard``: its ``.idx`` sidecar when current, else a scan that writes one."""
    stamp = _stamp(shard)
    idx = _load_index(shard, stamp)
    if idx is not None:
        too_big = np.flatnonzero(idx.sizes > max_member_bytes)
        if len(too_big):
            k = int(too_big[0])
            raise DataError(f"{shard}: member {idx.names[k]!r} is {int(idx.sizes[k]):,} bytes, "
                            f"above max_member_bytes={max_member_bytes:,}")
        return idx
    idx = scan_shard(shard, max_member_bytes)
    blob = json.dumps({**stamp, "names": idx.names, "offsets": idx.offsets.tolist(), "sizes": idx.sizes.tolist()})
    for loc in _index_locations(shard):
        try:
            atomic_write_text(loc, blob)
            break
        except OSError as exc:  # a read-only shard folder: the cache copy
            logger.debug("cannot write %s (%s)", loc, exc)
    return idx


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
    """

    def __init__(self, shards: Sequence[str], refs: np.ndarray, members: Sequence[str],
                 max_pixels: int | None = DEFAULT_MAX_PIXELS) -> None:
        self.shards = [str(s) for s in shards]
        self.refs = np.asarray(refs, dtype=np.int64).reshape(-1, 3)  # (N, 3): shard, offset, size
        self.members = list(members)
        self.max_pixels = max_pixels
        self._files = _Files()
        self._read: set[int] = set()

    def __len__(self) -> int:
        return len(self.members)

    def label(self, i: int) -> str:
        return f"{self.shards[int(self.refs[i, 0])]}::{self.members[i]}"

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
        return TarImages(self.shards, self.refs[keep], [self.members[k] for k in keep], self.max_pixels)

    def shards_read(self) -> list[str]:
        return [self.shards[s] for s in sorted(self._read)]

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


def _pick_image(shard: Path, key: str, members: dict[str, int], image_ext: str | None) -> int:
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


def _read_shard(b: _Builder, s: int, idx: ShardIndex, root: Path, files: _Files, image_ext: str | None,
                text_mode: str) -> None:
    shard = idx.path
    b.shards.append(str(shard))
    rel = os.path.relpath(shard.absolute(), root)
    read = lambda k: files.read(str(shard), int(idx.offsets[k]), int(idx.sizes[k]))  # noqa: E731
    for key, members in group_samples(idx.names).items():
        img = _pick_image(shard, key, members, image_ext)
        json_id, texts = sample_texts(read, shard, key, members, idx.names, text_mode)
        loc = f"{shard}::{key}"
        i = b.add_image(json_id or key, loc, (s, int(idx.offsets[img]), int(idx.sizes[img])), idx.names[img],
                        f"{URI_SCHEME}{rel}::{idx.names[img]}")
        for t in texts:
            b.add_text(t, i, loc)


def _dataset_name(path: str | Path) -> str:
    """``coco-wds`` for ``coco-wds/``, ``coco-wds/{split}/...`` or ``shards-{0..9}.tar`` -> ``shards``."""
    parts = [p for p in Path(str(path)).parts if p not in ("{split}",)]
    name = parts[-1] if parts else ""
    if "{" in name or name.endswith(".tar"):
        stem = name.split("{")[0].removesuffix(".tar").rstrip("-_.")
        name = stem or (parts[-2] if len(parts) > 1 else "")
    return name or "webdataset"


@DATASETS.register("webdataset")
def read(path: str | Path, split: str, *, image_ext: str | None = None, text: str = "one",
         max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES, max_pixels: int | None = DEFAULT_MAX_PIXELS,
         shard_split: str = "none", **unknown: Any) -> CrossModalDataset:
    """Read the samples of WebDataset shards (see the module docstring).

    ``shard_split="rank"`` reads only this process's shards under ``torchrun``
    (:func:`rank_shards`: contiguous, disjoint between ranks and nodes).
    """
    check_options("webdataset", unknown, _OPTIONS)
    if text not in ("one", "lines"):
        raise ConfigError(f"dataset format 'webdataset': option text must be one or lines, got {text!r}")
    if shard_split not in ("none", "rank"):
        raise ConfigError(f"dataset format 'webdataset': option shard_split must be none or rank, got {shard_split!r}")
    max_member_bytes = int_option("webdataset", "max_member_bytes", max_member_bytes)
    max_pixels = None if max_pixels in (None, 0) else int_option("webdataset", "max_pixels", max_pixels)
    image_ext = str(image_ext).lower().lstrip(".") if image_ext else None
    shards = [s.absolute() for s in expand_shards(path, split)]
    if shard_split == "rank":
        from ..distributed import env_from_environ

        shards = rank_shards(shards, env_from_environ())
    root = Path(os.path.commonpath([str(s.parent) for s in shards]))
    b, files = _Builder(), _Files()
    try:
        with progress_bar("reading shards", len(shards)) as advance:
            for s, shard in enumerate(shards):
                _read_shard(b, s, shard_index(shard, max_member_bytes), root, files, image_ext, text)
                advance(1)
    finally:
        files.close()
    if not b.image_ids:
        raise DataError(f"{path}: the shards hold no samples")
    langs, fields = b.text_extras()
    return CrossModalDataset(
        name=_dataset_name(path), split=split,
        image_ids=b.image_ids, text_ids=b.text_ids, captions=b.captions, gt=b.ground_truth(),
        image_paths=b.labels, langs=langs, fields=fields, root=root,
        meta={"format": "webdataset", "source": str(path), "shards": [str(s) for s in shards],
              "pixels": TarImages([str(s) for s in shards], np.asarray(b.refs, np.int64), b.members, max_pixels)},
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
