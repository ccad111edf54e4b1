"""Good images in every mode come out as RGB tensors; every kind of bad file is skipped, counted and reported."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import torch
from timm.data.constants import IMAGENET_DEFAULT_MEAN as IMAGENET_MEAN
from timm.data.constants import IMAGENET_DEFAULT_STD as IMAGENET_STD

import milan.data.decode as decode_module
from milan.data import (
    BadSample,
    ImageDataset,
    SkipReport,
    build_dataset,
    build_loader,
    eval_batches,
    eval_transform,
    pretrain_transform,
)
from milan.data.sources import scan_images
from milan.errors import ConfigError

from .conftest import BOMB_LIMIT, SIZE, bad_images, good_images, unpack


def _unnormalise(images: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (images * std + mean) * 255  # (B, 3, H, W) in 0..255


def test_scan_finds_images_at_any_depth_case_insensitive_and_ignores_the_rest(mixed_folder: Path) -> None:
    names = {p.relative_to(mixed_folder).as_posix() for p in scan_images(mixed_folder).paths}
    assert names == set(good_images()) | set(bad_images())  # no .txt, no hidden files


@pytest.mark.parametrize("num_workers", [0, 2])
def test_loader_yields_exactly_the_good_images_and_reports_each_bad_kind(mixed_folder: Path, num_workers: int) -> None:
    dataset = build_dataset(mixed_folder, eval_transform(SIZE, crop_pct=1.0), max_pixels=BOMB_LIMIT)
    loader = build_loader(dataset, batch_size=4, num_workers=num_workers, persistent_workers=False)
    report = SkipReport()
    images, paths = [], []
    batches = 0
    for batch in loader:
        batches += 1
        report.update(batch)
        if batch.empty:
            continue
        assert batch.images.dtype == torch.float32 and batch.images.shape[1:] == (3, SIZE, SIZE)
        assert batch.labels.tolist() == [-1] * len(batch)
        images.append(batch.images)
    assert batches == -(-len(dataset) // 4)

    # Order is preserved (no shuffle), so the good images appear in scan order.
    paths = [p.relative_to(mixed_folder).as_posix() for p, _ in dataset.samples]
    good = good_images()
    expected = [good[name] for name in paths if name in good]
    decoded = _unnormalise(torch.cat(images))
    assert decoded.shape[0] == len(expected) == len(good)
    for img, (_, colour, tol) in zip(decoded, expected, strict=True):
        target = torch.tensor(colour, dtype=torch.float32).view(3, 1, 1).expand_as(img)
        assert (img - target).abs().max().item() <= tol + 0.01, (colour, img.mean((1, 2)))

    bad = bad_images()
    assert report.seen == len(dataset)
    assert report.skipped == len(bad)
    assert dict(report.counts) == dict(Counter(reason for _, reason in bad.values()))
    assert {Path(e.path).name: e.reason for e in report.examples} == {name: r for name, (_, r) in bad.items()}
    summary = report.summary()
    assert summary.startswith(f"skipped {len(bad)} of {len(dataset)} images: 2 corrupt, 1 truncated, 1 empty")
    assert "1 not an image" in summary and "1 too large" in summary and "(first: " in summary


def test_without_a_pixel_limit_the_bomb_decodes(mixed_folder: Path) -> None:
    dataset = build_dataset([mixed_folder / "bomb.png"], eval_transform(SIZE), max_pixels=None)
    image, label = unpack(dataset[0])
    assert image.shape == (3, SIZE, SIZE) and label == -1


def test_all_bad_batch_is_empty_and_filtered_but_counted(mixed_folder: Path) -> None:
    names = ["zero.jpg", "text.jpg", "rgb.jpg", "truncated.jpg"]
    dataset = build_dataset([mixed_folder / n for n in names], eval_transform(SIZE))
    loader = build_loader(dataset, batch_size=2)
    batches = list(loader)
    assert [len(b) for b in batches] == [0, 1]
    assert batches[0].empty and batches[0].images.shape == (0, 3, 0, 0) and len(batches[0].skipped) == 2
    report = SkipReport()
    kept = list(eval_batches(batches, torch.device("cpu"), report=report))
    assert len(kept) == 1 and report.seen == 4 and report.skipped == 3
    assert report.summary().startswith("skipped 3 of 4 images: 1 truncated, 1 empty, 1 not an image (first: ")


def test_pretrain_dataset_over_the_mixed_folder(mixed_folder: Path) -> None:
    dataset = build_dataset(mixed_folder, pretrain_transform(8), max_pixels=BOMB_LIMIT)
    assert isinstance(dataset, ImageDataset)
    items = [dataset[i] for i in range(len(dataset))]
    good = [item for item in items if not isinstance(item, BadSample)]
    assert len(good) == len(good_images())
    assert all(img.shape == (3, 8, 8) and label == -1 for img, label in good)


def test_empty_folder_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "readme.txt").write_text("no images here")
    with pytest.raises(ConfigError) as err:
        build_dataset(tmp_path / "empty", pretrain_transform(8))
    message = str(err.value)
    assert str(tmp_path / "empty") in message and "ignored 1 file for its extension (.txt 1)" in message
    assert all(ext in message for ext in (".jpg", ".png", ".tif"))


def test_missing_source_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        build_dataset(tmp_path / "nope", pretrain_transform(8))


def test_oversized_files_are_skipped_unread(mixed_folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(decode_module, "MAX_FILE_BYTES", 100)
    dataset = build_dataset([mixed_folder / "rgb.jpg"], eval_transform(SIZE))
    item = dataset[0]
    assert isinstance(item, BadSample) and item.reason == "too large" and "bytes" in item.detail


def test_unreadable_files_are_skipped(mixed_folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def denied(self: Path) -> bytes:
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "read_bytes", denied)  # chmod 0 would not stop root
    item = build_dataset([mixed_folder / "rgb.bmp"], eval_transform(SIZE))[0]
    assert isinstance(item, BadSample) and item.reason == "unreadable" and "Permission denied" in item.detail
