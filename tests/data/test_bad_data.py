"""Bad data is a counted skip, never a crash: pixel bombs, any Pillow failure, damaged shards, unusable epochs.

Also: every format Pillow reads is accepted (TIFF included) and other files are counted by extension; shell
pipes need an opt-in; folders take a per-class subset; the default worker count follows the available cores.
"""

from __future__ import annotations

import importlib.util
import io
import os
import struct
import tarfile
import zlib
from collections import Counter
from pathlib import Path

import pytest
import torch
from PIL import Image, PngImagePlugin

import milan.data.sampling as sampling_module
from milan.data import (
    DAMAGED_SHARD,
    BadSample,
    DataError,
    ImageDecodeError,
    ShardImages,
    SkipReport,
    build_dataset,
    build_loader,
    describe_found,
    eval_transform,
    open_image,
    pretrain_transform,
)
from milan.data.device import EncodedImages
from milan.data.sampling import default_num_workers
from milan.errors import ConfigError

from .conftest import SIZE, encode, noisy_rgb, unpack

needs_webdataset = pytest.mark.skipif(importlib.util.find_spec("webdataset") is None, reason="optional extra")


def png_claiming(width: int, height: int) -> bytes:
    """A valid PNG header that claims ``width x height`` pixels, with almost no data (a decompression bomb)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
    )


BOMB_900MP = png_claiming(30_000, 30_000)  # 900 M pixels: above twice Pillow's limit, Pillow itself refuses it


def test_a_pixel_bomb_above_pillows_hard_limit_is_a_too_large_skip(tmp_path: Path) -> None:
    assert 2 * (Image.MAX_IMAGE_PIXELS or 0) < 30_000 * 30_000
    for limit in (None, 10**12):  # our limit off or above Pillow's: Pillow raises DecompressionBombError
        with pytest.raises(ImageDecodeError) as err:
            open_image(BOMB_900MP, max_pixels=limit)
        assert err.value.reason == "too large" and "900000000 pixels" in err.value.detail
    (tmp_path / "bomb.png").write_bytes(BOMB_900MP)
    (tmp_path / "good.png").write_bytes(encode(Image.new("RGB", (SIZE, SIZE), (1, 2, 3)), "PNG"))
    images = build_dataset(tmp_path, eval_transform(SIZE, crop_pct=1.0), max_pixels=None)
    items = [images[i] for i in range(len(images))]
    assert [type(item) is BadSample for item in items] == [True, False]
    encoded = EncodedImages(images)  # data.decode=device: the workers parse the header
    bad = encoded[0]
    assert isinstance(bad, BadSample) and bad.reason == "too large"


def test_any_exception_inside_pillow_is_classified(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "x.png").write_bytes(encode(noisy_rgb(8, 8), "PNG"))

    def broken_plugin(self: object) -> None:
        raise KeyError("a plugin bug or an exotic file")  # not one of the usual OSError/SyntaxError/...

    monkeypatch.setattr(PngImagePlugin.PngImageFile, "load", broken_plugin)
    bad = build_dataset(tmp_path, eval_transform(SIZE))[0]
    assert isinstance(bad, BadSample) and bad.reason == "corrupt" and "KeyError" in bad.detail


def test_tiff_and_every_pillow_format_are_read_and_other_files_are_counted(tmp_path: Path) -> None:
    colour = (200, 100, 50)
    img = Image.new("RGB", (SIZE, SIZE), colour)
    files = {
        "a/photo.tif": encode(img, "TIFF"),
        "a/photo16.tiff": encode(Image.new("I;16", (SIZE, SIZE), 51400), "TIFF"),  # 16-bit greyscale TIFF
        "b/anim.gif": encode(img.convert("P"), "GIF"),
        "b/raw.ppm": encode(img, "PPM"),
        "b/targa.tga": encode(img, "TGA"),
        "b/notes.txt": b"text",
        "b/meta.json": b"{}",
        "b/more.json": b"{}",
        "b/README": b"no extension",
    }
    for name, data in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(data)
    dataset = build_dataset(tmp_path, eval_transform(SIZE, crop_pct=1.0))
    assert len(dataset) == 5 and dataset.ignored == Counter({".json": 2, ".txt": 1, "(none)": 1})
    for i in range(len(dataset)):
        image, _ = unpack(dataset[i])
        assert image.shape == (3, SIZE, SIZE)
    line = describe_found(dataset, unit="3 steps per epoch")
    assert line == (
        f"found 5 images in {tmp_path} (ignored 4 files for their extension (.json 2, (none) 1, .txt 1)); "
        "3 steps per epoch"
    )
    labelled = build_dataset(tmp_path, eval_transform(SIZE), labelled=True)
    assert describe_found(labelled).startswith(f"found 5 images (2 classes) in {tmp_path} (ignored 4 files")


def test_folders_take_the_first_images_per_class_as_archives_do(tmp_path: Path) -> None:
    for cls in ("cat", "dog"):
        for i in (1, 2, 10, 3):
            (tmp_path / cls).mkdir(exist_ok=True)
            (tmp_path / cls / f"img_{i}.png").write_bytes(encode(Image.new("RGB", (4, 4)), "PNG"))
    subset = build_dataset(tmp_path, eval_transform(4), labelled=True, per_class=2)
    names = [(p.parent.name, p.name, label) for p, label in subset.samples]
    assert names == [("cat", "img_1.png", 0), ("cat", "img_2.png", 0), ("dog", "img_1.png", 1), ("dog", "img_2.png", 1)]
    assert len(build_dataset(tmp_path, eval_transform(4), labelled=True, per_class=3)) == 6  # 1, 2, 3 (not 10)
    with pytest.raises(ValueError, match="per_class"):
        build_dataset(tmp_path, eval_transform(4), labelled=True, per_class=0)


def test_default_workers_follow_the_available_cores(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    assert default_num_workers() == 2
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)), raising=False)
    assert default_num_workers() == 8
    monkeypatch.setattr(sampling_module, "default_num_workers", lambda: 0)  # None resolves when the loader is built
    loader = build_loader([], 2, num_workers=None)
    assert loader.num_workers == 0


# ---------------------------------------------------------------------------------------------------------------
# SkipReport: unusable epochs and the skip limit


def _bad(n: int, reason: str = "corrupt") -> list[BadSample]:
    return [BadSample(f"f{i}.jpg", reason, "detail") for i in range(n)]  # type: ignore[arg-type]


def test_an_epoch_without_a_usable_image_is_an_error() -> None:
    report = SkipReport(max_skip_fraction=1.0)
    report.add(_bad(3, "missing"))
    with pytest.raises(DataError, match=r"^epoch 1 had no usable image: skipped 3 of 3 images: 3 missing"):
        report.check("epoch 1")
    empty = SkipReport()
    with pytest.raises(DataError, match="no usable image: skipped 0 of 0 images"):
        empty.check()


def test_more_skips_than_the_limit_stop_with_the_report() -> None:
    report = SkipReport(max_skip_fraction=0.5)
    report.add(_bad(2), good=2)
    report.check("epoch 1")  # exactly half: allowed
    report.add(_bad(1))
    with pytest.raises(DataError) as err:
        report.check("epoch 2")
    message = str(err.value)
    assert message.startswith("epoch 2 skipped 60% of its images, more than data.max_skip_fraction=0.5: ")
    assert "skipped 3 of 5 images: 3 corrupt" in message and "raise data.max_skip_fraction" in message
    with pytest.raises(ValueError, match="max_skip_fraction"):
        SkipReport(max_skip_fraction=1.5)


def test_damaged_shards_are_counted_apart_from_images() -> None:
    report = SkipReport(expected=12)
    report.add([BadSample("s-1.tar", DAMAGED_SHARD, "unreadable after 2 samples (...)"), *_bad(1)], good=8)
    assert (report.seen, report.skipped, report.damaged_shards) == (9, 1, 1)
    assert report.summary().endswith(
        "; 1 damaged shard (s-1.tar: unreadable after 2 samples (...)); used 9 of the 12 samples expected"
    )
    assert report.as_dict()["damaged_shards"] == 1 and report.as_dict()["expected"] == 12
    total = SkipReport()
    total.merge(report)
    assert total.damaged_shards == 1 and total.shard_examples == report.shard_examples


# ---------------------------------------------------------------------------------------------------------------
# Tar shards: a truncated shard, shell pipes


def _shard(path: Path, first: int, n: int) -> bytes:
    with tarfile.open(path, "w") as tf:
        for i in range(first, first + n):
            data = encode(noisy_rgb(12, 10, seed=i), "JPEG", quality=90)
            info = tarfile.TarInfo(f"{i:06d}.jpg")
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path.read_bytes()


@needs_webdataset
@pytest.mark.parametrize("num_workers", [0, 2])
def test_a_truncated_shard_is_reported_and_the_rest_is_read(tmp_path: Path, num_workers: int) -> None:
    _shard(tmp_path / "s-0.tar", 0, 6)
    whole = _shard(tmp_path / "s-1.tar", 6, 6)
    _shard(tmp_path / "s-2.tar", 12, 6)
    with tarfile.open(tmp_path / "s-1.tar") as tf:
        members = tf.getmembers()
    cut = members[3].offset_data + 10  # inside the 4th image: 3 samples survive
    (tmp_path / "s-1.tar").write_bytes(whole[:cut])
    dataset = ShardImages(str(tmp_path / "s-{0..2}.tar"), eval_transform(8, crop_pct=1.0), num_samples=18)
    loader = build_loader(dataset, batch_size=4, num_workers=num_workers, persistent_workers=False)
    report = SkipReport(expected=18)
    for batch in loader:
        report.update(batch)
    assert (report.seen, report.skipped, report.damaged_shards) == (15, 0, 1)
    (damage,) = report.shard_examples
    assert damage.path == str(tmp_path / "s-1.tar") and damage.reason == DAMAGED_SHARD
    assert damage.detail.startswith("unreadable after 3 samples (ReadError: ")
    assert report.summary().endswith("the rest is lost); used 15 of the 18 samples expected")


@needs_webdataset
def test_shell_pipes_and_remote_urls_need_an_opt_in(tmp_path: Path) -> None:
    _shard(tmp_path / "s-0.tar", 0, 2)
    marker = tmp_path / "ran"
    command = f"pipe:touch {marker}; cat {tmp_path / 's-0.tar'}"
    for source in (command, "https://example.com/s-{0..9}.tar", ["a.tar", "gs://bucket/b.tar"]):
        with pytest.raises(ConfigError, match=r"data\.allow_shell_pipes=true"):
            build_dataset(source, pretrain_transform(8))
    assert not marker.exists()
    dataset = build_dataset(command, pretrain_transform(8), allow_shell_pipes=True)
    items = list(dataset)
    assert marker.exists() and len(items) == 2 and all(not isinstance(i, BadSample) for i in items)
    assert isinstance(items[0], tuple) and isinstance(items[0][0], torch.Tensor)
