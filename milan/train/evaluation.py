"""Top-k accuracy of classifier heads, and segmentation areas, over a (sharded) evaluation loader, counted exactly."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from timm.utils.metrics import accuracy

from milan import distributed as dist
from milan.data import Batch, SkipReport, eval_batches
from milan.data.segmentation import check_labels
from milan.models.segmentation import SegmentationModel, slide_inference
from milan.seg_metrics import area_counts
from milan.train.loop import autocast_context


class TopKAccuracy:
    """Top-k accuracy accumulated as integer counts, so that sums over batches and processes are exact.

    A batch's counts come from :func:`timm.utils.accuracy` (a percentage of the batch, turned back into a count);
    ``k`` larger than the number of classes counts every sample.
    """

    def __init__(self, ks: Sequence[int] = (1, 5)) -> None:
        self.ks = tuple(ks)
        self.correct = torch.zeros(len(self.ks), dtype=torch.long)
        self.count = 0

    def update(self, logits: torch.Tensor, targets: torch.Tensor) -> None:
        """Adds a batch of (B, C) logits and (B,) targets."""
        if logits.ndim != 2 or targets.shape != logits.shape[:1]:
            raise ValueError(
                f"expected (B, C) logits and (B,) targets, got {tuple(logits.shape)} and {tuple(targets.shape)}"
            )
        n = int(targets.shape[0])
        percents = accuracy(logits.detach(), targets, topk=self.ks)  # type: ignore[no-untyped-call]
        self.correct += torch.tensor([round(float(p) * n / 100) for p in percents], dtype=torch.long)
        self.count += n

    def counts(self) -> torch.Tensor:
        """(len(ks) + 1,) int64: correct counts per k, then the sample count (to sum across processes)."""
        return torch.cat([self.correct, torch.tensor([self.count])])

    def load_counts(self, counts: torch.Tensor) -> None:
        """Replaces the state with summed :meth:`counts` (e.g. after an all-reduce)."""
        self.correct = counts[:-1].long().cpu()
        self.count = int(counts[-1])

    def compute(self) -> dict[str, float]:
        """``{"top1": %, "top5": %, ...}`` in percent; NaN when empty."""
        n = max(self.count, 1)
        return {
            f"top{k}": (100.0 * float(c) / n if self.count else float("nan"))
            for k, c in zip(self.ks, self.correct.tolist(), strict=True)
        }


@torch.no_grad()
def evaluate_heads(
    forward: Callable[[torch.Tensor], torch.Tensor],
    loader: Iterable[Batch],
    device: torch.device,
    dtype: torch.dtype = torch.float32,
    *,
    num_heads: int = 1,
    report: SkipReport | None = None,
    progress: bool = False,
    desc: str = "eval",
) -> list[dict[str, float]]:
    """Runs ``forward`` over the loader and returns each head's top-k accuracy, summed over processes.

    ``forward``: images (B, 3, H, W) -> logits (B, C), or (K, B, C) for ``K = num_heads`` heads (put the model in eval
    mode first), under autocast on CUDA for a reduced ``dtype``; ``loader``: this process's shard of
    :class:`~milan.data.Batch` objects (:func:`milan.data.eval_loader`); unreadable files go to ``report``.

    Returns:
        One ``{"top1": %, "top5": %, "count": n}`` per head (counts over all processes).
    """
    meters = [TopKAccuracy() for _ in range(num_heads)]
    for images, batch in eval_batches(loader, device, report=report, progress=progress, desc=desc):
        with autocast_context(device, dtype):
            logits = forward(images)
        if logits.ndim == 2:
            logits = logits.unsqueeze(0)  # (1, B, C)
        for meter, head_logits in zip(meters, logits.float(), strict=True):  # as many heads as num_heads
            meter.update(head_logits, batch.labels.to(device))
    counts = dist.all_reduce_sum(torch.stack([m.counts() for m in meters]).to(device)).cpu()  # (K, len(ks) + 1)
    for meter, row in zip(meters, counts, strict=True):
        meter.load_counts(row)
    return [{**m.compute(), "count": float(m.count)} for m in meters]


@torch.no_grad()
def segmentation_areas(
    model: SegmentationModel,
    loader: Iterable[Batch],
    device: torch.device,
    dtype: torch.dtype = torch.float32,
    *,
    mode: Literal["slide", "whole"],
    crop: int,
    stride: int,
    ignore_index: int,
    report: SkipReport | None = None,
    progress: bool = False,
) -> tuple[torch.Tensor, int]:
    """Per-class areas (:func:`~milan.seg_metrics.area_counts`) over a loader of single images, summed over processes.

    Each image's logits (sliding window or whole image, at the resized scale) are resized bilinearly to its label
    map's size and arg-maxed (mmsegmentation's ``postprocess_result``); autocast on CUDA for a reduced ``dtype``. Put
    the model in eval mode first.

    Returns:
        ``((4, K) int64 areas, images evaluated over all processes)``.

    Raises:
        milan.data.segmentation.LabelError: A label map holds a value that is neither a class nor the ignore index.
    """
    k = model.num_classes
    areas = torch.zeros(4, k, dtype=torch.long)
    count = 0
    for images, batch in eval_batches(map(check_labels, loader), device, report=report, progress=progress):
        with autocast_context(device, dtype):
            if mode == "slide":
                logits = slide_inference(model.predict, images, k, crop=crop, stride=stride)
            else:
                logits = model.predict(images)
        logits = F.interpolate(logits.float(), size=batch.labels.shape[1:], mode="bilinear", align_corners=False)
        areas += area_counts(logits.argmax(dim=1).cpu(), batch.labels, k, ignore_index)
        count += len(batch)
    totals = dist.all_reduce_sum(torch.cat([areas.flatten(), torch.tensor([count])]).to(device)).cpu()
    return totals[:-1].view(4, k), int(totals[-1])
