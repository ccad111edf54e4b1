"""Top-k accuracy, accumulated over batches (and ranks) as exact integer counts."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def topk_correct(logits: torch.Tensor, targets: torch.Tensor, ks: Sequence[int] = (1, 5)) -> torch.Tensor:
    """Number of samples whose target is among the ``k`` highest scores, for each ``k``.

    ``k`` larger than the number of classes counts every sample (as torchmetrics/timm do).

    Args:
        logits: (B, C) scores.
        targets: (B,) int class indices.
        ks: The ``k`` values.

    Returns:
        (len(ks),) int64 counts.
    """
    if logits.ndim != 2 or targets.shape != logits.shape[:1]:
        raise ValueError(
            f"topk_correct: expected (B, C) logits and (B,) targets, got {tuple(logits.shape)} and "
            f"{tuple(targets.shape)}"
        )
    kmax = min(max(ks), logits.shape[1])
    top = logits.topk(kmax, dim=1).indices  # (B, kmax)
    hit = top == targets.view(-1, 1)  # (B, kmax), at most one True per row
    return torch.stack([hit[:, : min(k, kmax)].any(dim=1).sum() for k in ks]).long()


class TopKAccuracy:
    """Accumulates top-k counts over batches.

    Args:
        ks: The ``k`` values (default top-1 and top-5).
    """

    def __init__(self, ks: Sequence[int] = (1, 5)) -> None:
        self.ks = tuple(ks)
        self.correct = torch.zeros(len(self.ks), dtype=torch.long)
        self.count = 0

    def update(self, logits: torch.Tensor, targets: torch.Tensor) -> None:
        """Adds a batch of (B, C) logits and (B,) targets."""
        self.correct += topk_correct(logits.detach(), targets, self.ks).cpu()
        self.count += int(targets.shape[0])

    def counts(self) -> torch.Tensor:
        """(len(ks) + 1,) int64: correct counts per k, then the sample count (to sum across ranks)."""
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
