#!/usr/bin/env python3
"""Build xmodal's embedded emoji dataset (``src/xmodal/assets/emoji``) from pinned npm packages.

Sources, pinned by version and by the sha512 ``integrity`` the npm registry publishes:

* ``emoji-datasource-google`` 16.0.0 and ``emoji-datasource-twitter`` 16.0.0 (emoji-data by
  Cal Henderson, MIT): ``emoji.json`` and the 64 px images ``img/<style>/64/*.png``. Google
  (Noto Emoji, Apache-2.0) and Twitter (Twemoji, CC-BY-4.0) only: the Apple and Facebook
  images in the same project are not licensed for redistribution.
* ``emojibase-data`` 17.0.0 (Miles Johnson, MIT): ``<lang>/data.json`` labels and tags in
  every language that ships one.

One concept per ``emoji.json`` entry that has both a Google and a Twitter image (skin-tone
variants live in ``skin_variations`` and are left out). ``unified`` is joined to emojibase's
``hexcode``, dropping ``-FE0F`` when there is no exact match. Images are alpha-composited on
white with integer arithmetic (exact, library independent) and stored as one uint8 array,
``.npy`` inside ``.xz``. Captions and metadata go into one gzip'd JSON. The output is
byte-for-byte reproducible from the same inputs.

Usage::

    python scripts/build_emoji_dataset.py                       # npm pack into a temp folder
    python scripts/build_emoji_dataset.py --npm-dir ~/.cache/xmodal-npm   # fetch once, reuse
    python scripts/build_emoji_dataset.py --npm-dir DIR --limit 20 --test 4 --val 4 --out /tmp/tiny

``--npm-dir`` may hold the tarballs (``<name>-<version>.tgz``, verified against the pinned
sha512) or unpacked folders (``<name>-<version>/package``, used as they are, with a warning
that they cannot be verified); missing tarballs are fetched there with ``npm pack``.
"""
from __future__ import annotations

import argparse
import base64
import gzip
import hashlib
import io
import json
import logging
import lzma
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import Iterable

import numpy as np
from PIL import Image

log = logging.getLogger("build_emoji_dataset")

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "src" / "xmodal" / "assets" / "emoji"

#: name -> (version, npm ``dist.integrity``), from ``npm view <name>@<version> dist.integrity``.
PACKAGES: dict[str, tuple[str, str]] = {
    "emoji-datasource-google": (
        "16.0.0",
        "sha512-ZRexfzs7MVoLnmzZmNsO4TKhnAJp5D++Vm6PpUpH/jEQQlemp3l88CjZ+DoZ2faM9R4QxZkOPJCoT8DlPhfQ3A==",
    ),
    "emoji-datasource-twitter": (
        "16.0.0",
        "sha512-7F+uCuHH+7Qnrc15P5tnbvKkg9E6tlzi4MnT2uW1RlN4pLYTza6cP/dstIfSDMtpjFLWuZewWg8jBbuL2eyELQ==",
    ),
    "emojibase-data": (
        "17.0.0",
        "sha512-Yvgb5AWoHViHV/gq1qr5ZAarcBip+B27/ZLRsUJkbgAEaLlZ/fof9g882LTpmEpyhBNEC0m2SEmItljHsTygjA==",
    ),
}
STYLES = ("google", "twitter")
IMAGE_SIZE = 64
#: Salt of the split hash. Changing it reshuffles every split: never change it for a release.
SPLIT_KEY = "xmodal-emoji-split-v1"
FORMAT_VERSION = 1
IMAGES_FILE = "images.npy.xz"
METADATA_FILE = "metadata.json.gz"
#: Full license texts kept in the repository (not in the npm packages); copied when --out differs.
STATIC_LICENSES = ("Apache-2.0.txt", "CC-BY-4.0.txt")


class BuildError(Exception):
    """A problem with the inputs; printed without a traceback."""


# sources -------------------------------------------------------------------------------
class Source:
    """The files of one npm package, read from a verified tarball or an unpacked folder."""

    def __init__(self, name: str, files: dict[str, bytes], origin: str) -> None:
        self.name = name
        self.files = files  # path relative to the package root -> bytes
        self.origin = origin

    def read(self, rel: str) -> bytes:
        try:
            return self.files[rel]
        except KeyError:
            raise BuildError(f"{self.origin}: package {self.name} has no file {rel!r}") from None

    def json(self, rel: str):
        return json.loads(self.read(rel).decode("utf-8"))


def _wanted(rel: str) -> bool:
    """Which package files the build reads (so a tarball is held in memory only in part)."""
    parts = rel.split("/")
    if len(parts) == 1:
        return True  # emoji.json, LICENSE, README.md, package.json, ...
    if len(parts) == 2 and parts[1] == "data.json":
        return True  # emojibase-data/<lang>/data.json
    return len(parts) == 4 and parts[0] == "img" and parts[2] == str(IMAGE_SIZE) and parts[3].endswith(".png")


def _integrity(path: Path) -> str:
    h = hashlib.sha512()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return "sha512-" + base64.b64encode(h.digest()).decode("ascii")


def _from_tarball(name: str, tgz: Path) -> Source:
    version, expected = PACKAGES[name]
    got = _integrity(tgz)
    if got != expected:
        raise BuildError(f"{tgz}: sha512 integrity mismatch for {name}@{version}\n  expected {expected}\n  got      {got}")
    files: dict[str, bytes] = {}
    with tarfile.open(tgz, "r:gz") as tar:
        for member in tar:
            if not member.isfile() or not member.name.startswith("package/"):
                continue
            rel = member.name[len("package/"):]
            if _wanted(rel):
                f = tar.extractfile(member)
                assert f is not None
                files[rel] = f.read()
    log.info("%s@%s: %s (sha512 verified, %d files read)", name, version, tgz, len(files))
    return Source(name, files, str(tgz))


def _from_folder(name: str, root: Path) -> Source:
    version, _ = PACKAGES[name]
    files: dict[str, bytes] = {}
    for dirpath, _dirs, names in os.walk(root):
        for fn in names:
            full = Path(dirpath) / fn
            rel = full.relative_to(root).as_posix()
            if _wanted(rel):
                files[rel] = full.read_bytes()
    got = json.loads(files.get("package.json", b"{}")).get("version")
    if got != version:
        raise BuildError(f"{root}/package.json: {name} version is {got!r}, expected {version}")
    log.warning("%s@%s: using unpacked folder %s; its integrity cannot be verified "
                "(put the .tgz beside it to verify)", name, version, root)
    return Source(name, files, str(root))


def _npm_pack(name: str, dest: Path) -> Path:
    version, _ = PACKAGES[name]
    npm = shutil.which("npm")
    if npm is None:
        raise BuildError(f"{name}@{version} not found in {dest} and npm is not installed; "
                         "download the tarball with `npm pack` elsewhere and pass --npm-dir")
    dest.mkdir(parents=True, exist_ok=True)
    log.info("npm pack %s@%s into %s", name, version, dest)
    proc = subprocess.run([npm, "pack", f"{name}@{version}", "--ignore-scripts", "--silent"],
                          cwd=dest, capture_output=True, text=True)
    tgz = dest / f"{name}-{version}.tgz"
    if proc.returncode != 0 or not tgz.exists():
        raise BuildError(f"npm pack {name}@{version} failed (exit {proc.returncode}): {proc.stderr.strip()}")
    return tgz


def open_sources(npm_dir: Path) -> dict[str, Source]:
    """Find (or fetch) every pinned package in ``npm_dir``; tarballs are verified."""
    out: dict[str, Source] = {}
    for name, (version, _) in PACKAGES.items():
        tgz = npm_dir / f"{name}-{version}.tgz"
        folder = npm_dir / f"{name}-{version}"
        if tgz.exists():
            out[name] = _from_tarball(name, tgz)
        elif (folder / "package" / "package.json").exists():
            out[name] = _from_folder(name, folder / "package")
        elif (folder / "package.json").exists():
            out[name] = _from_folder(name, folder)
        else:
            out[name] = _from_tarball(name, _npm_pack(name, npm_dir))
    return out


# concepts ------------------------------------------------------------------------------
def select_concepts(sources: dict[str, Source], limit: int | None) -> list[dict]:
    """One concept per base ``emoji.json`` entry with both a Google and a Twitter image, in sort order."""
    by_style = {s: {e["unified"]: e for e in sources[f"emoji-datasource-{s}"].json("emoji.json")} for s in STYLES}
    first = by_style[STYLES[0]]
    concepts = []
    for unified, entry in first.items():
        if all(unified in by_style[s] and by_style[s][unified].get(f"has_img_{s}") for s in STYLES):
            concepts.append(entry)
    concepts.sort(key=lambda e: (e["sort_order"], e["unified"]))
    if limit is not None:
        concepts = concepts[:limit]
    log.info("%d concepts with both %s images", len(concepts), " and ".join(STYLES))
    return concepts


def languages(emojibase: Source) -> list[str]:
    return sorted(rel.split("/")[0] for rel in emojibase.files if rel.endswith("/data.json") and rel.count("/") == 1)


def join_text(concepts: list[dict], emojibase: Source, langs: list[str]) -> tuple[list[str], dict]:
    """Emojibase hexcode of every concept, and per language its label and tags."""
    hexcodes: list[str] = []
    text: dict[str, dict[str, list]] = {}
    for lang in langs:
        rel = f"{lang}/data.json"
        entries = {e["hexcode"]: e for e in emojibase.json(rel)}
        labels: list[str] = []
        tags: list[list[str]] = []
        for k, c in enumerate(concepts):
            u = c["unified"]
            hx = u if u in entries else u.replace("-FE0F", "")
            if hx not in entries:
                raise BuildError(f"{emojibase.origin}/{rel}: no entry for {u} ({c['short_name']}) "
                                 f"nor {hx}")
            if lang == langs[0]:
                hexcodes.append(hx)
            elif hexcodes[k] != hx:
                raise BuildError(f"{emojibase.origin}/{rel}: {u} joins hexcode {hx}, "
                                 f"but {hexcodes[k]} in {langs[0]}")
            e = entries[hx]
            label = (e.get("label") or "").strip()
            if not label:
                raise BuildError(f"{emojibase.origin}/{rel} [{hx}]: empty label")
            seen: dict[str, None] = {}
            for t in e.get("tags") or []:
                t = t.strip()
                if t:
                    seen.setdefault(t, None)
            labels.append(label)
            tags.append(list(seen))
        text[lang] = {"label": labels, "tags": tags}
    return hexcodes, text


def assign_splits(unified: list[str], n_test: int, n_val: int) -> list[str]:
    """Fixed split: order concepts by a salted SHA-256 of their code points, cut test / val / train.

    A hash, not an RNG, so the assignment is independent of numpy / Python versions and of
    which other concepts exist.
    """
    if n_test < 1 or n_val < 1 or n_test + n_val >= len(unified):
        raise BuildError(f"--test {n_test} / --val {n_val} leave no training concepts out of {len(unified)}")
    order = sorted(range(len(unified)),
                   key=lambda k: hashlib.sha256(f"{SPLIT_KEY}:{unified[k]}".encode()).hexdigest())
    split = ["train"] * len(unified)
    for rank, k in enumerate(order):
        if rank < n_test:
            split[k] = "test"
        elif rank < n_test + n_val:
            split[k] = "val"
    return split


# images --------------------------------------------------------------------------------
def composite_on_white(png: bytes, origin: str) -> np.ndarray:
    """(64, 64, 3) uint8: ``round(rgb * a + 255 * (1 - a))`` in exact integer arithmetic."""
    with Image.open(io.BytesIO(png)) as im:
        if im.size != (IMAGE_SIZE, IMAGE_SIZE):
            raise BuildError(f"{origin}: image is {im.size}, expected {IMAGE_SIZE}x{IMAGE_SIZE}")
        rgba = np.asarray(im.convert("RGBA"), dtype=np.uint32)  # (64, 64, 4)
    rgb, alpha = rgba[..., :3], rgba[..., 3:]
    out = (rgb * alpha + 255 * (255 - alpha) + 127) // 255  # (64, 64, 3), rounds half up
    return out.astype(np.uint8)


def _progress(items: list, description: str) -> Iterable:
    try:
        from rich.progress import track
    except ImportError:  # the build needs only numpy + pillow
        return items
    return track(items, description=description, disable=not sys.stderr.isatty())


def pack_images(sources: dict[str, Source], concepts: list[dict]) -> np.ndarray:
    """(S * C, 64, 64, 3) uint8, style-major: row ``s * C + c`` is concept ``c`` in style ``s``."""
    rows = []
    for s in STYLES:
        src = sources[f"emoji-datasource-{s}"]
        for c in _progress(concepts, f"compositing {s}"):
            rel = f"img/{s}/{IMAGE_SIZE}/{c['image']}"
            rows.append(composite_on_white(src.read(rel), f"{src.origin}:{rel}"))
    return np.stack(rows)  # (S * C, 64, 64, 3)


def encode_images(array: np.ndarray) -> bytes:
    """``.npy`` bytes inside an ``.xz`` stream: stdlib-only to read, pickle-free, smallest of the
    layouts measured (PNG blobs, npz, WebP, PNG sheets; see docs/emoji_dataset.md)."""
    buf = io.BytesIO()
    np.lib.format.write_array(buf, np.ascontiguousarray(array), version=(1, 0), allow_pickle=False)
    return lzma.compress(buf.getvalue(), format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC64,
                         preset=9 | lzma.PRESET_EXTREME)


# output --------------------------------------------------------------------------------
def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def attribution(concepts: int, langs: list[str]) -> str:
    v = {name: ver for name, (ver, _) in PACKAGES.items()}
    return f"""# Emoji dataset: attribution and licenses

This folder is xmodal's embedded emoji dataset ({concepts} concepts x {len(STYLES)} images,
captions in {len(langs)} languages), generated by `scripts/build_emoji_dataset.py` from the npm
packages below. It contains third-party material under the licenses listed here; xmodal's own
Apache-2.0 license does not apply to it.

## Images

`{IMAGES_FILE}` holds 64x64 emoji images in two styles. Modifications, applied to every image:
alpha-composited onto an opaque white background, stored as 8-bit RGB, and repacked
(all images in one array). Nothing else was changed.

* **Google style: Noto Emoji**, Copyright Google Inc., licensed under the Apache License,
  Version 2.0 (`LICENSES/Apache-2.0.txt`, https://www.apache.org/licenses/LICENSE-2.0).
  Source: https://github.com/googlefonts/noto-emoji (v2.048, as shipped in
  `emoji-datasource-google` {v['emoji-datasource-google']}). Noto's README states that its flag images
  (third_party/region-flags) are in the public domain or otherwise exempt from copyright.
* **Twitter style: Twemoji**, Copyright 2019 Twitter, Inc and other contributors (now
  maintained by the jdecked/twemoji fork and its contributors). Graphics licensed under the
  Creative Commons Attribution 4.0 International license (CC-BY-4.0,
  `LICENSES/CC-BY-4.0.txt`, https://creativecommons.org/licenses/by/4.0/).
  Source: https://github.com/jdecked/twemoji (v16.0.1, as shipped in `emoji-datasource-twitter`
  {v['emoji-datasource-twitter']}). The images are provided as-is, without warranties (see section 5 of the license).

Apple and Facebook images from the same project are deliberately not included: their
licenses do not allow redistribution.

## Data

* **emoji-data** (`emoji-datasource-google` / `emoji-datasource-twitter` {v['emoji-datasource-google']}),
  Copyright (c) 2013 Cal Henderson, MIT license (`LICENSES/emoji-datasource-google.LICENSE`,
  `LICENSES/emoji-datasource-twitter.LICENSE`). https://github.com/iamcal/emoji-data
  Used: the emoji list, names, categories and image selection.
* **Emojibase** (`emojibase-data` {v['emojibase-data']}), Copyright (c) 2017-2019 Miles Johnson,
  MIT license (`LICENSES/emojibase-data.LICENSE`). https://github.com/milesj/emojibase
  Used: labels and tags in {len(langs)} languages ({", ".join(langs)}), themselves derived from
  the Unicode CLDR annotations (Copyright Unicode, Inc., Unicode License v3,
  https://www.unicode.org/license.txt).

## Package integrity

The build verifies each npm tarball against these sha512 digests:

""" + "".join(f"* `{name}@{ver}`: `{integ}`\n" for name, (ver, integ) in PACKAGES.items())


def build(sources: dict[str, Source], out: Path, *, limit: int | None, n_test: int, n_val: int) -> dict:
    """Write the dataset into ``out``; returns the metadata."""
    concepts = select_concepts(sources, limit)
    emojibase = sources["emojibase-data"]
    langs = languages(emojibase)
    if not langs:
        raise BuildError(f"{emojibase.origin}: no <lang>/data.json found")
    unified = [c["unified"] for c in concepts]
    hexcodes, text = join_text(concepts, emojibase, langs)
    split = assign_splits(unified, n_test, n_val)
    array = pack_images(sources, concepts)
    blob = encode_images(array)
    meta = {
        "format": "xmodal-emoji",
        "format_version": FORMAT_VERSION,
        "styles": list(STYLES),
        "image_size": IMAGE_SIZE,
        "background": [255, 255, 255],
        "images": {
            "file": IMAGES_FILE,
            "sha256": hashlib.sha256(blob).hexdigest(),
            "shape": list(array.shape),
            "dtype": "uint8",
            "layout": "row = style_index * num_concepts + concept_index",
        },
        "languages": langs,
        "split_key": SPLIT_KEY,
        "split_sizes": {s: split.count(s) for s in ("train", "val", "test")},
        "sources": {name: {"version": ver, "integrity": integ} for name, (ver, integ) in PACKAGES.items()},
        "concepts": {
            "unified": unified,
            "hexcode": hexcodes,
            "emoji": ["".join(chr(int(cp, 16)) for cp in u.split("-")) for u in unified],
            "name": [c["name"] or c["short_name"] for c in concepts],
            "short_name": [c["short_name"] for c in concepts],
            "group": [c["category"] for c in concepts],
            "subgroup": [c["subcategory"] for c in concepts],
            "split": split,
        },
        "text": text,
    }
    payload = json.dumps(meta, ensure_ascii=False, sort_keys=True, separators=(",", ":")).encode("utf-8")
    _write_atomic(out / IMAGES_FILE, blob)
    _write_atomic(out / METADATA_FILE, gzip.compress(payload, compresslevel=9, mtime=0))
    for name in PACKAGES:
        _write_atomic(out / "LICENSES" / f"{name}.LICENSE", sources[name].read("LICENSE"))
    for fn in STATIC_LICENSES:
        src = DEFAULT_OUT / "LICENSES" / fn
        dst = out / "LICENSES" / fn
        if src.resolve() != dst.resolve():
            if not src.exists():
                raise BuildError(f"{src}: license text missing from the repository")
            _write_atomic(dst, src.read_bytes())
    _write_atomic(out / "ATTRIBUTION.md", attribution(len(concepts), langs).encode("utf-8"))
    log.info("wrote %s: %d concepts, %d images (%.2f MB), metadata %.2f MB, splits %s",
             out, len(concepts), len(array), len(blob) / 1e6, (out / METADATA_FILE).stat().st_size / 1e6,
             meta["split_sizes"])
    return meta


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--npm-dir", type=Path, default=None,
                   help="folder with the npm tarballs or unpacked packages; missing ones are fetched "
                        "there with `npm pack` (default: a temporary folder)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output folder (default: {DEFAULT_OUT})")
    p.add_argument("--limit", type=int, default=None, help="keep only the first N concepts (for tests)")
    p.add_argument("--test", type=int, default=250, help="concepts in the test split (default 250)")
    p.add_argument("--val", type=int, default=250, help="concepts in the val split (default 250)")
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s")
    try:
        if args.npm_dir is not None:
            build(open_sources(args.npm_dir), args.out, limit=args.limit, n_test=args.test, n_val=args.val)
        else:
            with tempfile.TemporaryDirectory(prefix="xmodal-emoji-npm-") as tmp:
                build(open_sources(Path(tmp)), args.out, limit=args.limit, n_test=args.test, n_val=args.val)
    except BuildError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
