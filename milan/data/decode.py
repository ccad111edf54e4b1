"""Decoding image bytes into RGB Pillow images, with every failure classified instead of raised.

Decoding is split in two so that JPEG draft mode can be used (see :mod:`milan.data.transforms`):

1. :func:`open_image` parses only the header: it rejects empty files, non-images and decompression bombs.
2. :func:`load_rgb` decodes the pixels (possibly at a reduced draft scale chosen in between) and converts any
   mode to 8-bit RGB.

Both raise :class:`ImageDecodeError` carrying a :data:`SkipReason`; the datasets turn it into a
:class:`BadSample` so that one bad file never stops a run. Every exception Pillow raises while parsing or decoding
one file is classified (a decompression bomb above Pillow's own hard limit is ``"too large"``, like one above
``max_pixels``); only errors outside Pillow's parsing and decoding propagate.

Mode conversion rules (:func:`to_rgb`):

* ``L``, ``1``, ``CMYK``, ``YCbCr`` ... use Pillow's own conversion.
* Transparency (``RGBA``, ``LA``, ``PA``, ``P`` or ``L``/``RGB`` with a ``transparency`` entry) is composited
  onto a **white** background, the usual convention for web images and icons drawn on transparent canvases.
* 16-bit and 32-bit integer greyscale (``I;16*``, ``I``) are scaled from the 0..65535 range to 0..255
  (``v * 255 / 65535``, rounded); Pillow's own ``convert`` clips them instead, which turns most pixels white.
* Animated files give their first frame. EXIF orientation is not applied (as in torchvision's ImageFolder and
  the MAE/MILAN references).
"""

from __future__ import annotations

import io
import warnings
from typing import Literal, NamedTuple

import numpy as np
from PIL import Image, UnidentifiedImageError

SkipReason = Literal[
    "empty", "not an image", "corrupt", "truncated", "too large", "missing", "unreadable", "damaged shard"
]
"""Why a sample was skipped. ``missing``/``unreadable`` come from the file system (listed file absent, no
permission); ``damaged shard`` marks a tar shard that could not be read to its end (it counts shards, not images);
the others come from the bytes themselves."""

SKIP_REASONS: tuple[SkipReason, ...] = (
    "corrupt",
    "truncated",
    "empty",
    "not an image",
    "too large",
    "missing",
    "unreadable",
)
"""The reasons an *image* is skipped (``damaged shard`` is counted apart, see :class:`milan.data.SkipReport`)."""

DAMAGED_SHARD: SkipReason = "damaged shard"

DEFAULT_MAX_PIXELS = Image.MAX_IMAGE_PIXELS or 89_478_485
"""Largest accepted ``width * height``; Pillow's own warning threshold (~89.5 M pixels, 0.25 GiB as RGB)."""

WHITE = (255, 255, 255)
"""Background that transparent pixels are composited onto."""

# Errors Pillow raises (directly or from its codecs) for damaged data: OSError, SyntaxError (PNG chunk errors),
# ValueError (bad header fields), EOFError, struct.error, zlib.error, IndexError (truncated palettes), its
# DecompressionBombError, and whatever a less common plugin raises. Inside Pillow's parsing and decoding of one
# file, any Exception is that file's problem: it becomes a skip, never a crash of the run.
_DECODE_ERRORS: tuple[type[BaseException], ...] = (Exception,)


class BadSample(NamedTuple):
    """A sample that could not be used, returned by the datasets in place of ``(image, label)``.

    Attributes:
        path: File path (or shard key) of the sample.
        reason: One of :data:`SKIP_REASONS`.
        detail: The underlying error message, for the report.
    """

    path: str
    reason: SkipReason
    detail: str


class ImageDecodeError(Exception):
    """An image could not be decoded; :attr:`reason` says why."""

    def __init__(self, reason: SkipReason, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason: SkipReason = reason
        self.detail = detail


# File signatures of common formats: a file that starts like one of them but does not open is corrupt.
_SIGNATURES: tuple[bytes, ...] = (
    b"\xff\xd8\xff",  # JPEG
    b"\x89PNG\r\n\x1a\n",
    b"BM",
    b"II*\x00",  # TIFF, little- and big-endian
    b"MM\x00*",
)


def _has_image_signature(data: bytes) -> bool:
    return data.startswith(_SIGNATURES) or (data[:4] == b"RIFF" and data[8:12] == b"WEBP")


def _classify(err: BaseException, data: bytes = b"") -> ImageDecodeError:
    if isinstance(err, Image.DecompressionBombError | MemoryError):
        return ImageDecodeError("too large", str(err) or type(err).__name__)
    if isinstance(err, UnidentifiedImageError):
        if _has_image_signature(data):
            return ImageDecodeError("corrupt", "broken header of a JPEG/PNG/WebP/BMP/TIFF file")
        return ImageDecodeError("not an image", "not a recognised image format")
    message = str(err) or type(err).__name__
    if "truncated" in message.lower() or isinstance(err, EOFError):
        return ImageDecodeError("truncated", message)
    return ImageDecodeError("corrupt", f"{type(err).__name__}: {message}")


def open_image(data: bytes, *, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Parses an image header without decoding the pixels.

    Args:
        data: The encoded file contents.
        max_pixels: Reject images with more than this many pixels as ``"too large"`` (``None``: no limit of
            ours; Pillow still refuses more than ``2 * PIL.Image.MAX_IMAGE_PIXELS``, also as ``"too large"``).

    Returns:
        A lazily loaded Pillow image; call :func:`load_rgb` (optionally after ``draft``) to decode it.

    Raises:
        ImageDecodeError: Empty data, an unknown format, a broken header or too many pixels.
    """
    if not data:
        raise ImageDecodeError("empty", "0 bytes")
    try:
        with warnings.catch_warnings():
            # We apply our own (configurable) limit below; Pillow's warning would only add noise.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
    except _DECODE_ERRORS as err:
        raise _classify(err, data) from None
    width, height = img.size
    if width < 1 or height < 1:
        raise ImageDecodeError("corrupt", f"image size {width}x{height}")
    if max_pixels is not None and width * height > max_pixels:
        raise ImageDecodeError("too large", f"{width}x{height} = {width * height} pixels > max_pixels {max_pixels}")
    return img


def load_rgb(img: Image.Image) -> Image.Image:
    """Decodes the pixels of an opened image and converts them to 8-bit RGB.

    Args:
        img: An image from :func:`open_image` (``draft`` may have been applied).

    Returns:
        An ``RGB`` image of the (possibly drafted) size.

    Raises:
        ImageDecodeError: Corrupt or truncated pixel data.
    """
    try:
        img.load()
        return to_rgb(img)
    except _DECODE_ERRORS as err:
        raise _classify(err) from None


def _scale_to_uint8(img: Image.Image) -> Image.Image:
    # (H, W) uint16 or int32 holding 16-bit samples -> 8-bit, rounding to nearest.
    values = np.asarray(img).astype(np.int64)
    values = np.clip(values, 0, 65535)
    return Image.fromarray(((values * 255 + 32767) // 65535).astype(np.uint8), mode="L")


def to_rgb(img: Image.Image) -> Image.Image:
    """Converts a decoded image of any Pillow mode to 8-bit RGB (rules in the module docstring).

    Args:
        img: A loaded image.

    Returns:
        The image in mode ``RGB`` (the same object when it already is).
    """
    mode = img.mode
    if mode == "RGB" and "transparency" not in img.info:
        return img
    if mode.startswith("I;16") or mode == "I":
        return _scale_to_uint8(img).convert("RGB")
    has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode in ("P", "L", "RGB") and "transparency" in img.info)
    if has_alpha:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (*WHITE, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def decode_rgb(data: bytes, *, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Fully decodes image bytes to RGB (:func:`open_image` then :func:`load_rgb`).

    Args:
        data: The encoded file contents.
        max_pixels: See :func:`open_image`.

    Returns:
        The RGB image.

    Raises:
        ImageDecodeError: See :func:`open_image` and :func:`load_rgb`.
    """
    return load_rgb(open_image(data, max_pixels=max_pixels))
