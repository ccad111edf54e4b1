"""Bytes to RGB Pillow images, with every failure classified (a :class:`BadSample`) instead of raised.

Decoding is split in two so that JPEG draft mode can be chosen in between (:mod:`milan.data.transforms`):
:func:`open_image` parses only the header (empty files, non-images, decompression bombs), :func:`load_rgb` decodes
the pixels and converts any mode to 8-bit RGB. Every exception Pillow raises while parsing or decoding one file is
that file's problem: it becomes an :class:`ImageDecodeError` with a :data:`SkipReason`, never a crash of the run.

Mode conversion (:func:`to_rgb`): Pillow's own conversion for ``L``, ``1``, ``CMYK``, ``YCbCr`` ...; transparency
(``RGBA``, ``LA``, ``PA``, or ``P``/``L``/``RGB`` with a ``transparency`` entry) is composited onto white, the usual
convention for web images; 16- and 32-bit greyscale (``I;16*``, ``I``) is scaled from 0..65535 to 0..255 (Pillow's
``convert`` clips it, which turns most pixels white). Animated files give their first frame; EXIF orientation is not
applied (as torchvision's ImageFolder and the MAE/MILAN references).
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path
from typing import Literal, NamedTuple, get_args

import numpy as np
from PIL import Image, UnidentifiedImageError

SkipReason = Literal[
    "corrupt", "truncated", "empty", "not an image", "too large", "missing", "unreadable", "mismatched", "damaged shard"
]
"""Why a sample was skipped: ``missing``/``unreadable`` come from the file system, ``mismatched``: an image and its
label map (segmentation) differ in size, ``damaged shard`` marks a tar shard that could not be read to its end (it
counts shards, not images), the others come from the bytes."""

SKIP_REASONS: tuple[SkipReason, ...] = get_args(SkipReason)[:-1]
"""The reasons an *image* is skipped, in the order reports list them (``damaged shard`` is counted apart)."""

DAMAGED_SHARD: SkipReason = "damaged shard"

DEFAULT_MAX_PIXELS = Image.MAX_IMAGE_PIXELS or 89_478_485
"""Largest accepted ``width * height``; Pillow's own warning threshold (~89.5 M pixels, 0.25 GiB as RGB)."""

MAX_FILE_BYTES = 1 << 30
"""Files larger than this (1 GiB) are skipped as ``"too large"`` without being read."""

# File signatures of common formats: a file that starts like one of them but does not open is corrupt.
_SIGNATURES = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"BM", b"II*\x00", b"MM\x00*")  # JPEG, PNG, BMP, TIFF (LE, BE)


class BadSample(NamedTuple):
    """A sample that could not be used, returned by the datasets in place of ``(image, label)``."""

    path: str  # file path or shard key
    reason: SkipReason
    detail: str  # the underlying error, for the report


class ImageDecodeError(Exception):
    """An image could not be decoded; :attr:`reason` says why."""

    def __init__(self, reason: SkipReason, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason: SkipReason = reason
        self.detail = detail

    def skip(self, path: str | Path) -> BadSample:
        """This error as the skipped sample ``path``."""
        return BadSample(str(path), self.reason, self.detail)


def _classify(err: BaseException, data: bytes = b"") -> ImageDecodeError:
    if isinstance(err, Image.DecompressionBombError | MemoryError):
        return ImageDecodeError("too large", str(err) or type(err).__name__)
    if isinstance(err, UnidentifiedImageError):
        if data.startswith(_SIGNATURES) or (data[:4] == b"RIFF" and data[8:12] == b"WEBP"):
            return ImageDecodeError("corrupt", "broken header of a JPEG/PNG/WebP/BMP/TIFF file")
        return ImageDecodeError("not an image", "not a recognised image format")
    message = str(err) or type(err).__name__
    if "truncated" in message.lower() or isinstance(err, EOFError):
        return ImageDecodeError("truncated", message)
    return ImageDecodeError("corrupt", f"{type(err).__name__}: {message}")


def read_file(path: Path) -> bytes | BadSample:
    """A file's bytes, or why it cannot be read (missing, a folder, no permission, over :data:`MAX_FILE_BYTES`)."""
    try:
        size = path.stat().st_size
        if size > MAX_FILE_BYTES:
            return BadSample(str(path), "too large", f"{size} bytes > {MAX_FILE_BYTES}")
        return path.read_bytes()
    except FileNotFoundError:
        return BadSample(str(path), "missing", "file not found")
    except IsADirectoryError:
        return BadSample(str(path), "not an image", "is a folder")
    except OSError as err:  # permissions, I/O errors
        return BadSample(str(path), "unreadable", f"{type(err).__name__}: {err.strerror or err}")


def open_file(path: Path, max_pixels: int | None) -> tuple[bytes, Image.Image] | BadSample:
    """A file's bytes and its parsed header (:func:`read_file`, then :func:`open_image`), or why it cannot be used."""
    data = read_file(path)
    if isinstance(data, BadSample):
        return data
    try:
        return data, open_image(data, max_pixels=max_pixels)
    except ImageDecodeError as err:
        return err.skip(path)


def open_image(data: bytes, *, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Parses an image header without decoding the pixels (call :func:`load_rgb` next, optionally after ``draft``).

    Args:
        data: The encoded file.
        max_pixels: More pixels are ``"too large"``. ``None``: no limit of ours; Pillow still refuses more than
            ``2 * PIL.Image.MAX_IMAGE_PIXELS``, also as ``"too large"``.

    Raises:
        ImageDecodeError: Empty data, an unknown format, a broken header or too many pixels.
    """
    if not data:
        raise ImageDecodeError("empty", "0 bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own limit follows
            img = Image.open(io.BytesIO(data))
    except Exception as err:
        raise _classify(err, data) from None
    width, height = img.size
    if width < 1 or height < 1:
        raise ImageDecodeError("corrupt", f"image size {width}x{height}")
    if max_pixels is not None and width * height > max_pixels:
        raise ImageDecodeError("too large", f"{width}x{height} = {width * height} pixels > max_pixels {max_pixels}")
    return img


def load_rgb(img: Image.Image) -> Image.Image:
    """Decodes the pixels of an opened (possibly drafted) image to 8-bit RGB; raises :class:`ImageDecodeError`."""
    try:
        img.load()
        return to_rgb(img)
    except Exception as err:
        raise _classify(err) from None


def to_rgb(img: Image.Image) -> Image.Image:
    """A loaded image of any mode as 8-bit RGB (rules in the module docstring; the same object if already RGB)."""
    mode = img.mode
    if mode == "RGB" and "transparency" not in img.info:
        return img
    if mode.startswith("I;16") or mode == "I":
        values = np.clip(np.asarray(img).astype(np.int64), 0, 65535)  # (H, W) 16-bit samples -> 8 bit, rounded
        return Image.fromarray(((values * 255 + 32767) // 65535).astype(np.uint8), mode="L").convert("RGB")
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode in ("P", "L", "RGB") and "transparency" in img.info):
        rgba = img.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return img.convert("RGB")


def decode_rgb(data: bytes, *, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Fully decodes image bytes to RGB (:func:`open_image` then :func:`load_rgb`)."""
    return load_rgb(open_image(data, max_pixels=max_pixels))
