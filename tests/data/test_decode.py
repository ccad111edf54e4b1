"""Mode conversion to 8-bit RGB and classification of undecodable bytes."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from milan.data.decode import ImageDecodeError, decode_rgb, open_image, to_rgb

from .conftest import encode, noisy_rgb


def test_16_bit_greyscale_is_scaled_not_clipped() -> None:
    values = np.array([[0, 257, 1000, 32896, 51400, 65535]], dtype=np.uint16)
    expected = np.round(values.astype(np.float64) * 255 / 65535).astype(np.uint8)  # [0, 1, 4, 128, 200, 255]
    for img in (Image.fromarray(values), Image.fromarray(values.astype(np.int32))):  # I;16 and I
        rgb = to_rgb(img)
        assert rgb.mode == "RGB"
        assert np.array_equal(np.asarray(rgb)[..., 0], expected) and np.array_equal(np.asarray(rgb)[..., 2], expected)
    big_endian = Image.frombytes("I;16B", (6, 1), values.astype(">u2").tobytes())
    assert np.array_equal(np.asarray(to_rgb(big_endian))[..., 1], expected)


def test_16_bit_png_file_round_trip() -> None:
    ramp = (np.arange(256, dtype=np.uint32) * 257).astype(np.uint16).reshape(16, 16)  # 0, 257, ..., 65535
    rgb = decode_rgb(encode(Image.fromarray(ramp), "PNG"))
    assert np.array_equal(np.asarray(rgb)[..., 0].ravel(), np.arange(256))


def test_transparency_is_composited_on_white() -> None:
    rgba = Image.new("RGBA", (2, 1), (0, 0, 0, 0))
    rgba.putpixel((1, 0), (10, 20, 30, 255))
    assert [to_rgb(rgba).getpixel((x, 0)) for x in range(2)] == [(255, 255, 255), (10, 20, 30)]
    la = Image.new("LA", (1, 1), (0, 128))
    assert to_rgb(la).getpixel((0, 0)) == (127, 127, 127)
    palette = Image.new("P", (2, 1), 0)
    palette.putpalette([50, 60, 70, 1, 2, 3] + [0] * 762)
    palette.putpixel((1, 0), 1)
    palette.info["transparency"] = 0
    assert [to_rgb(palette).getpixel((x, 0)) for x in range(2)] == [(255, 255, 255), (1, 2, 3)]
    rgb_trns = decode_rgb(encode(Image.new("RGB", (1, 1), (9, 9, 9)), "PNG", transparency=(9, 9, 9)))
    assert rgb_trns.getpixel((0, 0)) == (255, 255, 255)


def test_other_modes() -> None:
    assert to_rgb(Image.new("L", (1, 1), 42)).getpixel((0, 0)) == (42, 42, 42)
    assert to_rgb(Image.new("1", (1, 1), 1)).getpixel((0, 0)) == (255, 255, 255)
    cmyk = Image.new("RGB", (1, 1), (10, 200, 30)).convert("CMYK")
    assert to_rgb(cmyk).getpixel((0, 0)) == (10, 200, 30)
    rgb = Image.new("RGB", (1, 1))
    assert to_rgb(rgb) is rgb


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "empty"),
        (b"GIF89a but really just text", "not an image"),
        (b"%PDF-1.4 a document", "not an image"),
        (b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, "corrupt"),
    ],
)
def test_open_classifies_bad_bytes(data: bytes, reason: str) -> None:
    with pytest.raises(ImageDecodeError) as err:
        decode_rgb(data)
    assert err.value.reason == reason


def test_truncated_and_corrupt_pixel_data_fail_at_load_not_at_open() -> None:
    jpg = encode(noisy_rgb(64, 64), "JPEG", quality=90)
    img = open_image(jpg[: len(jpg) // 2])  # the header is intact
    assert img.size == (64, 64)
    with pytest.raises(ImageDecodeError) as err:
        decode_rgb(jpg[: len(jpg) // 2])
    assert err.value.reason == "truncated"


def test_pixel_limit_is_checked_from_the_header() -> None:
    data = encode(Image.new("L", (300, 200)), "PNG")
    assert open_image(data, max_pixels=60_000).size == (300, 200)
    with pytest.raises(ImageDecodeError) as err:
        open_image(data, max_pixels=59_999)
    assert err.value.reason == "too large" and "300x200" in err.value.detail
