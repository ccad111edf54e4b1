"""Segmentation data: pairing, label mapping (reduce_zero_label), bad pairs, the training and evaluation views."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from milan.data import SkipReport
from milan.data.segmentation import (
    EvalTransform,
    LabelError,
    LabelProblem,
    LabelSpec,
    SegmentationDataset,
    TrainTransform,
    check_labels,
    collate_segmentation,
    find_pairs,
    photometric_distortion,
    rescale_size,
)
from tests.segment.conftest import write_pairs


def test_reduce_zero_label_maps_other_to_ignore_and_shifts_classes() -> None:
    raw = np.array([[0, 1, 2], [150, 255, 3]], dtype=np.uint8)
    ade = LabelSpec(num_classes=150, ignore_index=255, reduce_zero_label=True)
    assert ade.convert(raw).tolist() == [[255, 0, 1], [149, 255, 2]]  # mmseg: 0 -> 255, v -> v - 1, 255 stays
    assert ade.invalid(ade.convert(raw)) == []
    assert ade.invalid(ade.convert(np.array([[151]], dtype=np.uint8))) == [150]  # one past the last class
    plain = LabelSpec(num_classes=11, ignore_index=11)
    assert plain.convert(raw[:, :2]).tolist() == [[0, 1], [150, 255]]
    assert plain.invalid(np.array([[0, 10, 11, 12, 255]])) == [12, 255]


def make_dataset(root: Path, spec: LabelSpec, transform: object | None = None) -> SegmentationDataset:
    pairs = find_pairs(root / "images", root / "labels")
    return SegmentationDataset(pairs, transform or EvalTransform((64, 48)), spec)  # type: ignore[arg-type]


def test_pairs_by_stem_and_bad_pairs_are_counted_skips(tmp_path: Path) -> None:
    stems = write_pairs(tmp_path / "images", tmp_path / "labels", 5, size=(40, 30), values=3)
    labels = tmp_path / "labels"
    (labels / f"{stems[1]}.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")  # corrupt label map
    Image.new("L", (20, 30)).save(labels / f"{stems[2]}.png")  # wrong size
    (labels / f"{stems[3]}.png").unlink()  # missing
    pairs = find_pairs(tmp_path / "images", labels)
    assert [p[0].stem for p in pairs] == stems and all(p[1].parent == labels for p in pairs)
    ds = make_dataset(tmp_path, LabelSpec(3, 255))
    batches = [collate_segmentation([ds[i]]) for i in range(len(ds))]
    report = SkipReport()
    for b in batches:
        report.update(b)
    assert report.seen == 5 and report.skipped == 3
    assert report.counts == {"corrupt": 1, "mismatched": 1, "missing": 1}
    assert "label 20x30 but image 40x30" in next(e.detail for e in report.examples if e.reason == "mismatched")
    good = batches[0]
    assert good.images.shape == (1, 3, 48, 64) and good.labels.shape == (1, 30, 40)  # labels stay at full size
    assert good.labels.dtype == torch.long


def test_a_label_value_outside_the_classes_stops_the_run_naming_file_and_value(tmp_path: Path) -> None:
    stems = write_pairs(tmp_path / "images", tmp_path / "labels", 2, size=(40, 30), values=3)
    Image.fromarray(np.full((30, 40), 7, dtype=np.uint8), mode="L").save(tmp_path / "labels" / f"{stems[1]}.png")
    ds = make_dataset(tmp_path, LabelSpec(3, 255))
    item = ds[1]
    assert isinstance(item, LabelProblem)
    batch = collate_segmentation([ds[0], item])
    assert len(batch) == 1 and batch.label_errors
    with pytest.raises(LabelError, match=rf"{stems[1]}\.png: label value 7 .* neither a class \(0\.\.2\)"):
        check_labels(batch)
    Image.new("RGB", (40, 30)).save(tmp_path / "labels" / f"{stems[0]}.png")  # a colour-coded map
    assert "not a single-channel label map" in ds[0].message  # type: ignore[union-attr]


def test_rescale_size_is_mmcv_keep_ratio() -> None:
    assert rescale_size(683, 512, (2048, 512)) == (683, 512)
    assert rescale_size(480, 360, (2048, 512)) == (683, 512)  # short side bound: 512 / 360
    assert rescale_size(3000, 500, (2048, 512)) == (2048, 341)  # long side bound: 2048 / 3000
    assert rescale_size(480, 360, (1024, 256)) == (341, 256)


def test_train_view_crops_pads_and_keeps_pixels_and_labels_aligned(tmp_path: Path) -> None:
    write_pairs(tmp_path / "images", tmp_path / "labels", 3, size=(60, 40), values=4)
    tf = TrainTransform(
        crop_size=64,
        scale=(96, 64),
        ratio_range=(0.5, 0.5),
        cat_max_ratio=0.75,
        hflip=0.5,
        photometric=False,
        ignore_index=9,
    )
    ds = make_dataset(tmp_path, LabelSpec(4, 9), tf)
    random.seed(0)
    x, y = ds[0]  # type: ignore[misc]
    assert x.shape == (3, 64, 64) and y.shape == (64, 64)
    # ratio 0.5: the image is resized to fit (48, 32) -> 48 x 32, so the crop is padded: image 0, labels ignore
    assert torch.all(y[32:] == 9) and torch.all(y[:, 48:] == 9) and torch.all(x[:, 32:] == 0)
    assert set(y[:32, :48].unique().tolist()) <= {0, 1, 2, 3}
    random.seed(0)
    x2, y2 = ds[0]  # type: ignore[misc]
    assert torch.equal(x, x2) and torch.equal(y, y2)  # all draws come from Python's seeded `random`


def test_cat_max_ratio_redraws_crops_dominated_by_one_class() -> None:
    labels = np.zeros((100, 100), dtype=np.int64)
    labels[:, 90:] = 1  # one class fills 90 % of the image
    tf = TrainTransform(crop_size=20, cat_max_ratio=0.75)
    random.seed(3)
    boxes = [tf.crop_box(labels) for _ in range(30)]
    mixed = [b for b in boxes if b[3] > 90 and b[2] < 90]
    assert len(mixed) > 20  # mostly boxes showing both classes (a uniform draw would rarely do so: 1 in 4)
    tf_off = TrainTransform(crop_size=20, cat_max_ratio=1.0)
    random.seed(3)
    assert sum(1 for _ in range(30) if (b := tf_off.crop_box(labels))[3] > 90 and b[2] < 90) < 15


def test_photometric_distortion_keeps_shape_and_range() -> None:
    image = (np.arange(8 * 8 * 3).reshape(8, 8, 3) * 3 % 256).astype(np.uint8)
    random.seed(1)
    out = [photometric_distortion(image) for _ in range(8)]
    assert all(o.shape == image.shape and o.dtype == np.uint8 for o in out)
    assert any(not np.array_equal(o, image) for o in out)
    random.seed(1)
    assert all(np.array_equal(a, photometric_distortion(image)) for a in out[:1])
