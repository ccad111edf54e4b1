"""Semantic-segmentation metrics as pure functions: per-class pixel areas, then mIoU, mAcc, aAcc.

As mmsegmentation's ``IoUMetric``: pixels whose ground truth is the ignore index are left out entirely (also from
the predicted areas). Over the whole evaluation set (areas summed over images, and over processes):

* IoU of class c = intersect / union, with union = predicted + labelled - intersect;
* Acc of class c = intersect / labelled;
* aAcc = all intersects / all labelled pixels.

A class with a zero union (absent from both prediction and ground truth) has no IoU (``NaN``) and is left out of
mIoU; a class absent from the ground truth has no Acc and is left out of mAcc (mmsegmentation's ``nanmean``). A
class that is predicted but never labelled keeps IoU 0 and counts in mIoU. Areas are exact int64 counts, so summing
them over processes gives the same numbers as one process.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch


def area_counts(pred: torch.Tensor, label: torch.Tensor, num_classes: int, ignore_index: int) -> torch.Tensor:
    """(4, K) int64 intersect, union, predicted and labelled pixel counts of one image (or a batch).

    ``pred``: predicted classes in ``[0, K)``; ``label``: the same shape, classes or ``ignore_index``.
    """
    if pred.shape != label.shape:
        raise ValueError(f"prediction {tuple(pred.shape)} and label {tuple(label.shape)} differ in shape")
    keep = label != ignore_index
    p, t = pred[keep].long(), label[keep].long()
    if t.numel() and (int(t.min()) < 0 or int(t.max()) >= num_classes):
        raise ValueError(f"label values must be in [0, {num_classes}) or {ignore_index}")
    intersect = torch.bincount(p[p == t], minlength=num_classes)[:num_classes]
    predicted = torch.bincount(p, minlength=num_classes)[:num_classes]
    labelled = torch.bincount(t, minlength=num_classes)[:num_classes]
    return torch.stack([intersect, predicted + labelled - intersect, predicted, labelled])


def segmentation_scores(areas: torch.Tensor, class_names: Sequence[str] | None = None) -> dict[str, Any]:
    """mIoU, mAcc, aAcc (percent) and per-class IoU / Acc from (4, K) summed :func:`area_counts`.

    Returns:
        ``{"mIoU", "mAcc", "aAcc", "IoU": {name: % or None}, "Acc": {name: % or None}, "classes_present"}``;
        ``None`` marks a class without a value (left out of the mean); the means are ``NaN`` when no class has
        one. Names default to ``"0"``, ``"1"``, ...
    """
    intersect, union, _, labelled = (row.double() for row in areas)
    names = list(class_names) if class_names is not None else [str(i) for i in range(areas.shape[1])]
    if len(names) != areas.shape[1]:
        raise ValueError(f"{len(names)} class names for {areas.shape[1]} classes")
    iou = 100 * intersect / union  # NaN where union == 0
    acc = 100 * intersect / labelled  # NaN where labelled == 0
    total = float(labelled.sum())
    return {
        "mIoU": _nanmean(iou),
        "mAcc": _nanmean(acc),
        "aAcc": 100 * float(intersect.sum()) / total if total else math.nan,
        "IoU": {n: _value(v) for n, v in zip(names, iou.tolist(), strict=True)},
        "Acc": {n: _value(v) for n, v in zip(names, acc.tolist(), strict=True)},
        "classes_present": int((union > 0).sum()),
    }


def _nanmean(values: torch.Tensor) -> float:
    valid = values[~values.isnan()]
    return float(valid.mean()) if valid.numel() else math.nan


def _value(v: float) -> float | None:
    return None if math.isnan(v) else v
