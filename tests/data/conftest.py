"""Image factories shared by the data tests: files with known content in every mode, and broken files."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from milan.data import BadSample, Item

SIZE = 16  # every good test image is SIZE x SIZE, so batches stack without resizing


def unpack(item: Item) -> tuple[torch.Tensor, int]:
    """The (image, label) of a good item; fails the test on a BadSample."""
    assert not isinstance(item, BadSample), item
    return item


def encode(img: Image.Image, fmt: str, **kwargs: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kwargs)
    return buf.getvalue()


def noisy_rgb(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def good_images() -> dict[str, tuple[bytes, tuple[int, int, int], int]]:
    """name -> (file bytes, expected RGB colour after decoding, tolerance). Solid colours, SIZE x SIZE."""
    s = (SIZE, SIZE)
    p_img = Image.new("P", s, 1)
    p_img.putpalette([0, 0, 0, 0, 0, 255] + [0] * 762)
    p_transparent = Image.new("P", s, 0)  # index 0 is transparent -> white background
    p_transparent.putpalette([0, 0, 0, 0, 0, 255] + [0] * 762)
    i16 = Image.fromarray(np.full(s, 51400, dtype=np.uint16))  # 51400 / 257 = 200.0
    assert i16.mode == "I;16"
    return {
        "rgb.jpg": (encode(Image.new("RGB", s, (200, 30, 60)), "JPEG", quality=95), (200, 30, 60), 4),
        "upper.JPEG": (encode(Image.new("RGB", s, (30, 60, 200)), "JPEG", quality=95), (30, 60, 200), 4),
        "grey.jpeg": (encode(Image.new("L", s, 100), "JPEG", quality=95), (100, 100, 100), 2),
        "cmyk.jpg": (encode(Image.new("RGB", s, (10, 200, 30)).convert("CMYK"), "JPEG", quality=95), (10, 200, 30), 4),
        "rgba.png": (encode(Image.new("RGBA", s, (255, 0, 0, 128)), "PNG"), (255, 127, 127), 1),
        "la.png": (encode(Image.new("LA", s, (0, 64)), "PNG"), (191, 191, 191), 1),
        "palette.png": (encode(p_img, "PNG"), (0, 0, 255), 0),
        "palette_transparent.png": (encode(p_transparent, "PNG", transparency=0), (255, 255, 255), 0),
        "sixteen.png": (encode(i16, "PNG"), (200, 200, 200), 0),
        "lossless.webp": (encode(Image.new("RGB", s, (20, 120, 220)), "WEBP", lossless=True), (20, 120, 220), 0),
        "alpha.webp": (encode(Image.new("RGBA", s, (0, 0, 0, 0)), "WEBP", lossless=True), (255, 255, 255), 0),
        "rgb.bmp": (encode(Image.new("RGB", s, (90, 180, 45)), "BMP"), (90, 180, 45), 0),
        "grey.BMP": (encode(Image.new("L", s, 77), "BMP"), (77, 77, 77), 0),
        "sub/deeper/nested.png": (encode(Image.new("RGB", s, (1, 2, 3)), "PNG"), (1, 2, 3), 0),
    }


BOMB_LIMIT = 1_000_000  # max_pixels used with the "bomb" file below (3000 x 3000 = 9 M pixels)


def bad_images() -> dict[str, tuple[bytes, str]]:
    """name -> (file bytes, expected skip reason)."""
    png = encode(noisy_rgb(64, 64), "PNG")
    idat = png.find(b"IDAT")
    corrupt_png = bytearray(png)
    corrupt_png[idat + 100 : idat + 140] = bytes(40)
    jpg = encode(noisy_rgb(64, 64, seed=1), "JPEG", quality=90)
    # A JPEG signature followed by junk (this seed's junk has no parsable marker).
    broken_header = b"\xff\xd8\xff" + np.random.default_rng(0).integers(0, 256, 500, dtype=np.uint8).tobytes()
    return {
        "corrupt.png": (bytes(corrupt_png), "corrupt"),
        "broken_header.jpg": (broken_header, "corrupt"),
        "truncated.jpg": (jpg[: len(jpg) // 2], "truncated"),
        "zero.jpg": (b"", "empty"),
        "text.jpg": (b"this is a text file with a .jpg extension\n", "not an image"),
        "bomb.png": (encode(Image.new("L", (3000, 3000)), "PNG"), "too large"),
    }


def write_files(root: Path, files: dict[str, bytes]) -> None:
    for name, data in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)


@pytest.fixture()
def mixed_folder(tmp_path: Path) -> Path:
    """Good images in every mode/format, each kind of bad file, and non-image files that must be ignored."""
    root = tmp_path / "mixed"
    write_files(root, {name: data for name, (data, _, _) in good_images().items()})
    write_files(root, {name: data for name, (data, _) in bad_images().items()})
    write_files(root, {"notes.txt": b"not an image", ".hidden/x.jpg": b"", "._resource.jpg": b"\x00\x05"})
    return root
