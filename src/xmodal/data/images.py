"""Safe image loading: every failure becomes one clear :class:`ImageLoadError` naming the file.

:func:`open_image` refuses, before decoding a single pixel, files that are missing, are not
images in an allowed format, or whose header announces more than ``max_pixels`` pixels (a
decompression bomb: a few kilobytes of PNG can claim 20,000 x 20,000 pixels). It then forces
a full decode, so a truncated or corrupt file fails here rather than later as grey pixels or
a traceback inside a data loader. Transparent images are composited onto white, the usual
convention for retrieval datasets (icons, emoji, product photos on white).
"""
from __future__ import annotations

import io
import logging
import struct
import threading
import warnings
import zlib
from pathlib import Path

from PIL import Image, ImageFile, UnidentifiedImageError

from ..errors import DataError, where

log = logging.getLogger(__name__)

#: Default pixel budget: about 8,000 x 8,000. Larger images are refused unless the caller raises it.
DEFAULT_MAX_PIXELS = 64_000_000

#: Formats :func:`open_image` will decode. Deliberately excludes formats whose plugins run
#: external programs or interpreters (EPS/PDF via Ghostscript) or that are rarely photos.
SAFE_FORMATS: tuple[str, ...] = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF", "PPM", "ICO", "MPO", "AVIF")

# ``warnings.catch_warnings`` swaps module-global state; serialise it so that decoder
# threads (see xmodal.data.features) cannot leave each other's filters installed.
_WARN_LOCK = threading.Lock()

# Pillow errors that mean "the bytes are bad", as opposed to a bug in our code.
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, IndexError, struct.error, zlib.error)


class ImageLoadError(DataError):
    """An image file that cannot be used; ``path`` names it and ``reason`` says why."""

    def __init__(self, path: str | Path, reason: str) -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{where(path)}{reason}")

    def __reduce__(self):  # keep the two-argument form picklable across processes
        return (type(self), (self.path, self.reason))


def _allowed_formats(formats: tuple[str, ...] | list[str] | None) -> list[str]:
    Image.init()  # registers every plugin, so availability below is accurate
    wanted = SAFE_FORMATS if formats is None else tuple(f.upper() for f in formats)
    return [f for f in wanted if f in Image.OPEN]


def _composite_on_white(img: Image.Image) -> Image.Image:
    """Flatten transparency onto a white background; returns an RGBA-free image."""
    rgba = img.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def _has_transparency(img: Image.Image) -> bool:
    if img.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        return True
    # palette, grey and RGB images can mark one colour transparent (PNG tRNS, GIF)
    return "transparency" in img.info


def _to_8bit(img: Image.Image) -> Image.Image:
    """Map 16/32-bit integer and float grey images to 8 bits (``convert`` would clip them)."""
    if img.mode.startswith("I;16") or img.mode == "I":
        # 16-bit samples span 0..65535; 65535 / 257 = 255
        return img.point(lambda v: v * (1 / 257)).convert("L")
    if img.mode == "F":
        lo, hi = img.getextrema()
        scale = 255.0 / (hi - lo) if hi > lo else 0.0
        return img.point(lambda v: (v - lo) * scale).convert("L")
    return img


def read_image_size(path: str | Path, *, formats: tuple[str, ...] | list[str] | None = None) -> tuple[int, int]:
    """``(width, height)`` from the header alone, without decoding; raises :class:`ImageLoadError`."""
    path = Path(path)
    _check_file(path)
    try:
        with _WARN_LOCK, warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path, formats=_allowed_formats(formats)) as img:
                return img.size
    except Image.DecompressionBombError as exc:
        raise ImageLoadError(path, f"oversized image refused before decoding: {exc}") from None
    except UnidentifiedImageError:
        raise ImageLoadError(path, _not_an_image(formats)) from None
    except _DECODE_ERRORS as exc:
        raise ImageLoadError(path, f"corrupt image header: {exc}") from None


def _check_file(path: Path) -> None:
    if not path.exists():
        raise ImageLoadError(path, "no such file")
    if path.is_dir():
        raise ImageLoadError(path, "is a folder, not an image file")


def _not_an_image(formats) -> str:
    return "not a recognised image file (allowed formats: " + ", ".join(_allowed_formats(formats)) + ")"


def open_image(path: str | Path, *, max_pixels: int | None = DEFAULT_MAX_PIXELS, mode: str = "RGB",
               formats: tuple[str, ...] | list[str] | None = None, data: bytes | None = None) -> Image.Image:
    """Open, check and fully decode one image; returns a new in-memory image in ``mode``.

    ``max_pixels`` (None = no limit of ours) is checked against the header's width x height
    before any pixel is decoded. Pillow's own guard (``PIL.Image.MAX_IMAGE_PIXELS``, refusing
    above twice that value) still applies on top. For modes without alpha ("RGB", "L"),
    transparent images are composited onto white. Raises :class:`ImageLoadError` (a
    :class:`~xmodal.errors.DataError`) for missing, unreadable, unrecognised, oversized,
    truncated or corrupt files. ``data``: the image's bytes when they come from elsewhere than a
    file (a member of a tar shard); ``path`` then only names the image in messages.
    """
    path = Path(path)
    if data is None:
        _check_file(path)
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        # Someone switched Pillow to silently pad truncated files with grey; say so once.
        log.warning("PIL.ImageFile.LOAD_TRUNCATED_IMAGES is set: truncated images will not be detected")
    try:
        # Image.open is lazy: it parses the header only, so the size check below is cheap.
        with _WARN_LOCK, warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", Image.DecompressionBombWarning)
            img = Image.open(path if data is None else io.BytesIO(data), formats=_allowed_formats(formats))
        for w in caught:
            if issubclass(w.category, Image.DecompressionBombWarning):
                log.debug("%s: %s", path, w.message)
            else:  # not ours to swallow
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    except Image.DecompressionBombError as exc:
        raise ImageLoadError(path, f"oversized image refused before decoding (Pillow's decompression-bomb "
                                   f"guard, PIL.Image.MAX_IMAGE_PIXELS): {exc}") from None
    except UnidentifiedImageError:
        raise ImageLoadError(path, _not_an_image(formats)) from None
    except PermissionError:
        raise ImageLoadError(path, "cannot read the file: permission denied") from None
    except _DECODE_ERRORS as exc:
        raise ImageLoadError(path, f"corrupt image header: {exc}") from None

    with img:
        width, height = img.size
        if max_pixels is not None and width * height > max_pixels:
            raise ImageLoadError(
                path,
                f"oversized image refused before decoding: {width}x{height} = {width * height:,} pixels, "
                f"above the limit of {max_pixels:,} (raise max_pixels to allow it)",
            )
        if width < 1 or height < 1:
            raise ImageLoadError(path, f"image has an empty size {width}x{height}")
        try:
            img.load()  # the full decode: truncated data raises here
            if mode in ("RGB", "L") and _has_transparency(img):
                out = _composite_on_white(img)
                return out if mode == "RGB" else out.convert(mode)
            return _to_8bit(img).convert(mode) if mode in ("RGB", "L") else img.convert(mode)
        except Image.DecompressionBombError as exc:  # e.g. a later GIF frame larger than the first
            raise ImageLoadError(path, f"oversized image refused: {exc}") from None
        except _DECODE_ERRORS as exc:
            reason = str(exc) or type(exc).__name__
            if "truncated" in reason:
                raise ImageLoadError(path, f"truncated image file ({reason})") from None
            raise ImageLoadError(path, f"corrupt image data: {reason}") from None
