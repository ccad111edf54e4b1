"""mIoU / mAcc / aAcc against a naive per-class computation, with an ignore index and absent classes."""

from __future__ import annotations

import math

import pytest
import torch

from milan.seg_metrics import area_counts, segmentation_scores


def naive_scores(preds: list[torch.Tensor], labels: list[torch.Tensor], k: int, ignore: int) -> dict[str, object]:
    """Pixel by pixel, class by class, as mmsegmentation's IoUMetric defines them."""
    inter, pred_n, label_n = [0] * k, [0] * k, [0] * k
    correct = labelled = 0
    for pred, label in zip(preds, labels, strict=True):
        for p, t in zip(pred.flatten().tolist(), label.flatten().tolist(), strict=True):
            if t == ignore:
                continue
            labelled += 1
            label_n[t] += 1
            pred_n[p] += 1
            if p == t:
                inter[t] += 1
                correct += 1
    ious = [100 * inter[c] / (pred_n[c] + label_n[c] - inter[c]) for c in range(k) if pred_n[c] + label_n[c] > 0]
    accs = [100 * inter[c] / label_n[c] for c in range(k) if label_n[c] > 0]
    return {"mIoU": sum(ious) / len(ious), "mAcc": sum(accs) / len(accs), "aAcc": 100 * correct / labelled}


def test_scores_match_a_naive_per_class_computation() -> None:
    g = torch.Generator().manual_seed(0)
    k, ignore = 6, 255
    preds, labels = [], []
    for shape in ((7, 9), (5, 4), (8, 8)):
        label = torch.randint(0, 4, shape, generator=g)  # classes 4 and 5 never labelled
        label[torch.rand(shape, generator=g) < 0.2] = ignore
        pred = torch.randint(0, 5, shape, generator=g)  # class 4 predicted but never labelled; 5 absent from both
        pred[label == ignore] = 4  # predictions on ignored pixels must not count
        preds.append(pred)
        labels.append(label)
    areas = sum(area_counts(p, t, k, ignore) for p, t in zip(preds, labels, strict=True))
    assert isinstance(areas, torch.Tensor) and areas.dtype == torch.long and areas.shape == (4, k)
    got = segmentation_scores(areas, [f"c{i}" for i in range(k)])
    want = naive_scores(preds, labels, k, ignore)
    for key in ("mIoU", "mAcc", "aAcc"):
        assert got[key] == pytest.approx(want[key], rel=1e-12)
    assert got["IoU"]["c5"] is None and got["Acc"]["c5"] is None  # absent from both: left out of both means
    assert got["IoU"]["c4"] is not None and got["Acc"]["c4"] is None  # predicted only: IoU 0 counts in mIoU
    assert got["classes_present"] == 5


def test_ignore_index_inside_the_class_range_and_perfect_prediction() -> None:
    label = torch.tensor([[0, 1, 2], [2, 3, 3]])  # CamVid-style: the ignore index is the value after the classes
    scores = segmentation_scores(area_counts(label.clone(), label, 3, ignore_index=3))
    assert scores["mIoU"] == scores["mAcc"] == scores["aAcc"] == 100.0
    assert scores["IoU"] == {"0": 100.0, "1": 100.0, "2": 100.0}


def test_empty_and_bad_inputs() -> None:
    empty = segmentation_scores(torch.zeros(4, 3, dtype=torch.long))
    assert math.isnan(empty["mIoU"]) and math.isnan(empty["aAcc"])
    with pytest.raises(ValueError, match="differ in shape"):
        area_counts(torch.zeros(2, 2), torch.zeros(2, 3), 3, 255)
    with pytest.raises(ValueError, match="label values"):
        area_counts(torch.zeros(2, 2), torch.full((2, 2), 7), 3, 255)
    with pytest.raises(ValueError, match="2 class names for 3"):
        segmentation_scores(torch.zeros(4, 3, dtype=torch.long), ["a", "b"])


def test_summed_areas_equal_one_pass_over_all_pixels() -> None:
    g = torch.Generator().manual_seed(1)
    pred, label = torch.randint(0, 4, (2, 10, 10), generator=g), torch.randint(0, 5, (2, 10, 10), generator=g)
    parts = area_counts(pred[0], label[0], 4, 4) + area_counts(pred[1], label[1], 4, 4)  # e.g. two processes
    assert torch.equal(parts, area_counts(pred, label, 4, 4))
