"""Folder scans, file lists, ImageFolder labels and the bundled sample images."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from PIL import Image

from milan.data import (
    BUILTIN_SAMPLES,
    BadSample,
    ImageDataset,
    build_dataset,
    build_loader,
    eval_transform,
    pretrain_transform,
)
from milan.data.sources import read_file_list, sample_images_dir, scan_images
from milan.errors import ConfigError

from .conftest import encode, unpack


def _jpg(path: Path, colour: tuple[int, int, int] = (128, 128, 128)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(encode(Image.new("RGB", (12, 10), colour), "JPEG"))
    return path


def test_scan_images_natural_order_and_symlink_cycles(tmp_path: Path) -> None:
    for name in ["img_10.jpg", "img_2.png", "a/img_1.webp", "b/c/img.bmp"]:
        _jpg(tmp_path / name)
    os.symlink(tmp_path, tmp_path / "b" / "loop")  # a cycle must not hang or duplicate
    names = [p.relative_to(tmp_path).as_posix() for p in scan_images(tmp_path).paths]
    assert names == ["a/img_1.webp", "b/c/img.bmp", "img_2.png", "img_10.jpg"]


def test_file_list_resolves_relative_paths_and_reports_missing_and_non_images(tmp_path: Path) -> None:
    good_rel = _jpg(tmp_path / "imgs" / "one.jpg", (250, 0, 0))
    good_abs = _jpg(tmp_path / "elsewhere" / "two.png", (0, 250, 0))
    (tmp_path / "lists").mkdir()
    (tmp_path / "lists" / "notes.txt").write_text("hello")
    listing = tmp_path / "lists" / "train.txt"
    listing.write_text(f"# comment\n\n../imgs/one.jpg\n  {good_abs}  \nnotes.txt\nmissing.jpg\n")
    assert read_file_list(listing) == [
        tmp_path / "lists" / "../imgs/one.jpg",
        good_abs,
        tmp_path / "lists" / "notes.txt",
        tmp_path / "lists" / "missing.jpg",
    ]
    assert good_rel.exists()
    dataset = build_dataset(listing, pretrain_transform(8))
    assert isinstance(dataset, ImageDataset)
    items = [dataset[i] for i in range(4)]
    assert [type(item) is BadSample for item in items] == [False, False, True, True]
    assert [item.reason for item in items[2:] if isinstance(item, BadSample)] == ["not an image", "missing"]


def test_image_folder_labels(tmp_path: Path) -> None:
    colours = {"zebra": (255, 255, 255), "ant": (0, 0, 0), "bee": (255, 0, 0)}
    for name, colour in colours.items():
        for i in range(2 if name != "bee" else 1):
            _jpg(tmp_path / "train" / name / f"sub/{i}.jpg", colour)
    (tmp_path / "train" / "empty_class").mkdir()
    dataset = build_dataset(tmp_path / "train", eval_transform(8), labelled=True)
    assert dataset.classes == ["ant", "bee", "empty_class", "zebra"]
    assert dataset.classes.index("zebra") == 3
    batch = next(iter(build_loader(dataset, batch_size=8)))
    assert batch.labels.tolist() == [0, 0, 1, 3, 3]
    brightness = batch.images.mean(dim=(1, 2, 3))
    assert brightness[0] < brightness[2] < brightness[3]  # black ant < red bee < white zebra
    fixed = build_dataset(tmp_path / "train", eval_transform(8), labelled=True, classes=["zebra", "ant"])
    assert [label for _, label in fixed.samples] == [0, 0, 1, 1]


def test_labelled_sources_need_class_folders(tmp_path: Path) -> None:
    _jpg(tmp_path / "flat" / "x.jpg")
    with pytest.raises(ConfigError, match="class subfolders"):
        build_dataset(tmp_path / "flat", eval_transform(8), labelled=True)
    listing = tmp_path / "list.txt"
    listing.write_text("flat/x.jpg\n")
    with pytest.raises(ConfigError, match="ImageFolder"):
        build_dataset(listing, eval_transform(8), key="data.val", labelled=True)
    assert len(build_dataset(listing, eval_transform(8))) == 1


def test_pretraining_ignores_class_folders_and_concatenates_sources(tmp_path: Path) -> None:
    _jpg(tmp_path / "a" / "cls1" / "x.jpg")
    _jpg(tmp_path / "a" / "cls2" / "y.jpg")
    _jpg(tmp_path / "b" / "z.jpg")
    dataset = build_dataset([tmp_path / "a", tmp_path / "b"], pretrain_transform(8))
    assert isinstance(dataset, ImageDataset) and len(dataset) == 3
    assert all(unpack(dataset[i])[1] == -1 for i in range(3))


def test_bundled_samples() -> None:
    folder = sample_images_dir()
    files = sorted(folder.glob("*.jpg"))
    assert 30 <= len(files) <= 40
    assert sum(f.stat().st_size for f in files) < 150_000
    dataset = build_dataset(BUILTIN_SAMPLES, pretrain_transform(32))
    assert isinstance(dataset, ImageDataset) and len(dataset) == len(files)
    batch = next(iter(build_loader(dataset, batch_size=len(files))))
    assert batch.images.shape == (len(files), 3, 32, 32) and not batch.skipped
    with pytest.raises(ConfigError, match="builtin:samples"):
        build_dataset("builtin:nothing", pretrain_transform(32))
