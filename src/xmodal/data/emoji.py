"""The embedded emoji dataset: xmodal's default, offline data for ``xmodal demo``.

1,911 emoji concepts, each drawn in two styles (Google Noto, Twitter Twemoji; 64x64 RGB on
white) and named in 28 languages (emojibase labels and tags). Split by concept into fixed
train / val / test sets (1,411 / 250 / 250). Built by ``scripts/build_emoji_dataset.py``; see
``docs/emoji_dataset.md`` and ``assets/emoji/ATTRIBUTION.md``.

Files (in :func:`default_path`): ``metadata.json.gz`` (concepts, split, captions) and
``images.npy.xz`` (one ``(2 * C, 64, 64, 3)`` uint8 array, style-major). Both are read
without pickle; pixels are decompressed on first use and shared by every split.

Images have no files: ``image_paths`` hold virtual ids ``emoji://<style>/<unified lower>``
(readable with :func:`open_uri`) and pixels come from ``dataset.meta["pixels"]`` (an
:class:`EmojiPixels`) or :func:`load_image`.
"""
from __future__ import annotations

import gzip
import hashlib
import io
import json
import logging
import lzma
import threading
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from ..errors import DataError, where
from .base import DATASETS, CrossModalDataset, GroundTruth

log = logging.getLogger(__name__)

METADATA_FILE = "metadata.json.gz"
SPLITS = ("train", "val", "test")
CAPTION_MODES = ("label", "label+tags", "all")
URI_SCHEME = "emoji://"
FORMAT_VERSION = 1


def default_path() -> Path:
    """The packaged asset folder (``xmodal/assets/emoji``)."""
    return Path(str(resources.files("xmodal") / "assets" / "emoji"))


# the packed files ------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class EmojiPack:
    """The decoded ``metadata.json.gz`` of one asset folder; pixels are loaded lazily."""

    root: Path
    meta: dict

    @property
    def styles(self) -> list[str]:
        return self.meta["styles"]

    @property
    def languages(self) -> list[str]:
        return self.meta["languages"]

    @property
    def unified(self) -> list[str]:
        return self.meta["concepts"]["unified"]

    @property
    def num_concepts(self) -> int:
        return len(self.unified)

    def row(self, style: str, unified: str) -> int:
        """Row of the image array holding ``unified`` drawn in ``style``."""
        try:
            s = self.styles.index(style)
        except ValueError:
            raise DataError(f"{where(self.root / METADATA_FILE, field='styles')}unknown style {style!r}; "
                            f"choose from: {', '.join(self.styles)}") from None
        try:
            c = _concept_index(self)[unified.upper()]
        except KeyError:
            raise DataError(f"{where(self.root / METADATA_FILE, field='concepts')}no emoji {unified!r}") from None
        return s * self.num_concepts + c

    def images(self) -> np.ndarray:
        """(S * C, 64, 64, 3) uint8, read-only; decompressed once per process and folder."""
        return _image_array(self)


_ARRAY_LOCK = threading.Lock()


@lru_cache(maxsize=8)
def _concept_index(pack: EmojiPack) -> dict[str, int]:
    return {u: k for k, u in enumerate(pack.unified)}


@lru_cache(maxsize=2)
def _image_array_cached(root: Path, sha256: str, shape: tuple[int, ...]) -> np.ndarray:
    path = root / "images.npy.xz"
    try:
        blob = path.read_bytes()
    except OSError as exc:
        raise DataError(f"{path}: cannot read emoji images ({exc.strerror or exc})") from None
    if hashlib.sha256(blob).hexdigest() != sha256:
        raise DataError(f"{path}: checksum does not match {METADATA_FILE}; the file is corrupt or "
                        "from another build (rebuild with scripts/build_emoji_dataset.py)")
    try:
        raw = lzma.decompress(blob)
    except lzma.LZMAError as exc:
        raise DataError(f"{path}: not a valid .xz stream ({exc})") from None
    f = io.BytesIO(raw)
    try:
        version = np.lib.format.read_magic(f)
        header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                  else np.lib.format.read_array_header_2_0)(f)
    except ValueError as exc:
        raise DataError(f"{path}: not a .npy array inside the .xz stream ({exc})") from None
    got_shape, fortran, dtype = header
    if tuple(got_shape) != shape or dtype != np.uint8 or fortran:
        raise DataError(f"{path}: array is {dtype}{tuple(got_shape)}, metadata says uint8{shape}")
    # A zero-copy view of the decompressed bytes; read-only, so the shared cache stays intact.
    return np.frombuffer(raw, dtype=np.uint8, offset=f.tell()).reshape(shape)  # (S*C, 64, 64, 3)


def _image_array(pack: EmojiPack) -> np.ndarray:
    info = pack.meta["images"]
    with _ARRAY_LOCK:
        return _image_array_cached(pack.root, info["sha256"], tuple(info["shape"]))


def _resolve(path: str | Path) -> Path:
    """``"emoji"`` (or a missing path of that name) means the packaged folder; a metadata file
    means its folder."""
    p = Path(path)
    if str(path) == "emoji" and not p.exists():
        return default_path()
    if p.is_file() and p.name == METADATA_FILE:
        return p.parent
    return p


def open_pack(path: str | Path = "emoji") -> EmojiPack:
    """Read (and cache) the metadata of an emoji asset folder."""
    root = _resolve(path).resolve()
    file = root / METADATA_FILE
    try:
        st = file.stat()
    except OSError:
        raise DataError(f"{file}: no emoji metadata here (expected {METADATA_FILE}, built by "
                        "scripts/build_emoji_dataset.py)") from None
    return _open_pack_cached(root, st.st_mtime_ns, st.st_size)


@lru_cache(maxsize=4)
def _open_pack_cached(root: Path, _mtime_ns: int, _size: int) -> EmojiPack:
    file = root / METADATA_FILE
    try:
        meta = json.loads(gzip.decompress(file.read_bytes()).decode("utf-8"))
    except (OSError, EOFError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{file}: unreadable emoji metadata ({exc})") from None
    if meta.get("format") != "xmodal-emoji":
        raise DataError(f"{where(file, field='format')}expected 'xmodal-emoji', got {meta.get('format')!r}")
    if meta.get("format_version") != FORMAT_VERSION:
        raise DataError(f"{where(file, field='format_version')}version {meta.get('format_version')!r} "
                        f"is not supported (this xmodal reads {FORMAT_VERSION})")
    n = len(meta["concepts"]["unified"])
    for lang in meta["languages"]:
        t = meta["text"].get(lang)
        if t is None or len(t["label"]) != n or len(t["tags"]) != n:
            raise DataError(f"{where(file, field=f'text.{lang}')}expected label and tags for {n} concepts")
    if len(meta["concepts"]["split"]) != n:
        raise DataError(f"{where(file, field='concepts.split')}expected {n} entries")
    return EmojiPack(root, meta)


# pixels ---------------------------------------------------------------------------------
class EmojiPixels:
    """Lazy pixel access for the images of one dataset, in the dataset's image order.

    ``pixels[i]`` is a 64x64 RGB :class:`PIL.Image.Image`; :meth:`load_pixels` returns a
    ``(k, 64, 64, 3)`` uint8 array at once. Positions refer to the dataset as read: after
    ``select_images`` use :func:`load_image` or :meth:`load_ids`, which go by image id.
    """

    def __init__(self, pack: EmojiPack, image_ids: Sequence[str]) -> None:
        self.pack = pack
        self.image_ids = list(image_ids)
        self.rows = np.asarray([_row_of_id(pack, i) for i in self.image_ids], dtype=np.int64)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> Image.Image:
        return Image.fromarray(self.pack.images()[self.rows[i]])

    def load_pixels(self, indices: Sequence[int] | np.ndarray | None = None) -> np.ndarray:
        """(k, 64, 64, 3) uint8 copy of the given images (all when ``indices`` is None)."""
        rows = self.rows if indices is None else self.rows[np.asarray(indices, dtype=np.int64)]
        return self.pack.images()[rows]  # (k, 64, 64, 3)

    def load_ids(self, image_ids: Sequence[str]) -> np.ndarray:
        """(k, 64, 64, 3) uint8 for images named by id (``"google/1F600"``)."""
        rows = np.asarray([_row_of_id(self.pack, i) for i in image_ids], dtype=np.int64)
        return self.pack.images()[rows]  # (k, 64, 64, 3)

    def select(self, keep: Sequence[int] | np.ndarray) -> "EmojiPixels":
        """The accessor matching ``dataset.select_images(keep)``."""
        return EmojiPixels(self.pack, [self.image_ids[int(k)] for k in np.asarray(keep, dtype=np.int64)])

    def __repr__(self) -> str:
        return f"EmojiPixels({len(self)} images from {self.pack.root})"


def _row_of_id(pack: EmojiPack, image_id: str) -> int:
    style, sep, unified = image_id.partition("/")
    if not sep:
        raise DataError(f"emoji image id {image_id!r}: expected '<style>/<unified>', e.g. 'google/1F600'")
    return pack.row(style, unified)


def load_image(dataset: CrossModalDataset, i: int) -> Image.Image:
    """Image ``i`` of an emoji dataset (or any view of one) as a 64x64 RGB PIL image."""
    pixels = dataset.meta.get("pixels")
    if not isinstance(pixels, EmojiPixels):
        raise DataError(f"{dataset.name}/{dataset.split}: not an emoji dataset (no meta['pixels'])")
    row = _row_of_id(pixels.pack, dataset.image_ids[i])
    return Image.fromarray(pixels.pack.images()[row])


def open_uri(uri: str, path: str | Path = "emoji") -> Image.Image:
    """Open a virtual image path ``emoji://<style>/<unified>`` as a 64x64 RGB PIL image."""
    if not uri.startswith(URI_SCHEME):
        raise DataError(f"{uri!r}: not an emoji image uri (expected {URI_SCHEME}<style>/<unified>)")
    pack = open_pack(path)
    row = _row_of_id(pack, uri[len(URI_SCHEME):])
    return Image.fromarray(pack.images()[row])


# captions -------------------------------------------------------------------------------
def _captions_of(mode: str, label: str, tags: list[str]) -> list[tuple[str, str]]:
    """(kind, caption) pairs one concept contributes in one language."""
    items = [("label", label)]
    if mode == "label+tags" and tags:
        items.append(("tags", ", ".join(tags)))
    elif mode == "all":
        items.extend(("tag", t) for t in tags)
    return items


def _texts(pack: EmojiPack, concepts: np.ndarray, langs: list[str], mode: str, n_styles: int):
    """Texts of one split and their ground truth.

    Identical caption strings within a language become one text whose positives are all the
    images of every concept in the split that the string describes (e.g. the tag "cat" is
    true of both 🐈 and 🐱); otherwise a tag shared by many concepts would be scored as
    pointing at just one of them.
    """
    unified = pack.unified
    text_ids: list[str] = []
    captions: list[str] = []
    text_langs: list[str] = []
    indptr = [0]
    indices: list[int] = []
    styles = np.arange(n_styles)
    for lang in langs:
        labels, tags = pack.meta["text"][lang]["label"], pack.meta["text"][lang]["tags"]
        owners: dict[str, list[int]] = {}
        first_kind: dict[str, str] = {}
        label_of: dict[str, int] = {}
        for p, c in enumerate(concepts):
            for kind, cap in _captions_of(mode, labels[c], tags[c]):
                own = owners.setdefault(cap, [])
                if not own:
                    first_kind[cap] = kind
                if not own or own[-1] != p:
                    own.append(p)
                if kind == "label":
                    label_of.setdefault(cap, p)
        for cap, own in owners.items():
            if cap in label_of:
                tid = f"{unified[concepts[label_of[cap]]]}/{lang}/label"
            elif first_kind[cap] == "tags" and len(own) == 1:
                tid = f"{unified[concepts[own[0]]]}/{lang}/tags"
            else:
                tid = f"{lang}/{first_kind[cap]}/{cap}"
            text_ids.append(tid)
            captions.append(cap)
            text_langs.append(lang)
            imgs = (np.asarray(own, dtype=np.int64)[:, None] * n_styles + styles).ravel()  # (owners * S,)
            indices.extend(imgs.tolist())
            indptr.append(len(indices))
    return text_ids, captions, text_langs, np.asarray(indptr), np.asarray(indices, dtype=np.int64)


def _parse_langs(lang: str | Sequence[str], pack: EmojiPack) -> list[str]:
    have = pack.languages
    if isinstance(lang, str):
        if lang in ("all", "any"):
            return list(have)
        wanted = [x.strip() for x in lang.split(",") if x.strip()]
    else:
        wanted = list(lang)
    bad = [x for x in wanted if x not in have]
    if bad or not wanted:
        raise DataError(f"{where(pack.root / METADATA_FILE, field='lang')}unknown language "
                        f"{(bad[0] if bad else lang)!r}; choose one of: {', '.join(have)}, all, any "
                        "(or several, comma-separated)")
    return list(dict.fromkeys(wanted))


@DATASETS.register("emoji")
def read(path: str | Path, split: str, *, lang: str | Sequence[str] = "en", captions: str = "label",
         styles: Sequence[str] = ("google", "twitter")) -> CrossModalDataset:
    """Read one split of the emoji dataset.

    ``path``: the asset folder (see :func:`default_path`) or the string ``"emoji"``.
    ``lang``: a language code, several (comma-separated or a list), or ``"all"``/``"any"``.
    ``captions``: ``"label"`` (one label per concept and language), ``"label+tags"`` (plus one
    caption joining its tags, ``"cat, pet"``) or ``"all"`` (the label plus every tag alone).
    ``styles``: which drawings to include; each concept has one image per style, and every
    caption's positives are all the images of the concepts it describes.
    """
    pack = open_pack(path)
    file = pack.root / METADATA_FILE
    if split not in SPLITS:
        raise DataError(f"{where(file, field='split')}unknown split {split!r}; choose one of: {', '.join(SPLITS)}")
    if captions not in CAPTION_MODES:
        raise DataError(f"{where(file, field='captions')}unknown caption mode {captions!r}; "
                        f"choose one of: {', '.join(CAPTION_MODES)}")
    if isinstance(styles, str):
        styles = [s.strip() for s in styles.split(",") if s.strip()]
    styles = list(dict.fromkeys(styles))
    bad = [s for s in styles if s not in pack.styles]
    if bad or not styles:
        raise DataError(f"{where(file, field='styles')}unknown style {(bad[0] if bad else '(none)')!r}; "
                        f"choose from: {', '.join(pack.styles)}")
    langs = _parse_langs(lang, pack)

    concepts = np.flatnonzero(np.asarray(pack.meta["concepts"]["split"]) == split)  # (C_split,)
    unified = pack.unified
    image_ids = [f"{s}/{unified[c]}" for c in concepts for s in styles]  # concept-major
    image_paths = [f"{URI_SCHEME}{s}/{unified[c].lower()}" for c in concepts for s in styles]
    text_ids, caps, text_langs, indptr, indices = _texts(pack, concepts, langs, captions, len(styles))
    gt = GroundTruth(indptr, indices, len(image_ids))
    ds = CrossModalDataset(
        name="emoji",
        split=split,
        image_ids=image_ids,
        text_ids=text_ids,
        captions=caps,
        gt=gt,
        image_paths=image_paths,
        langs=text_langs,
        root=pack.root,
        meta={
            "pixels": EmojiPixels(pack, image_ids),
            "image_size": pack.meta["image_size"],
            "styles": styles,
            "languages": langs,
            "captions": captions,
            "concepts": [unified[c] for c in concepts],
            "emoji": [pack.meta["concepts"]["emoji"][c] for c in concepts],
        },
    )
    log.debug("%s", ds.summary())
    return ds
