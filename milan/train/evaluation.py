"""Top-k accuracy of one or several classifier heads over a (sharded) evaluation loader."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch

from milan import distributed as dist
from milan.data import Batch, SkipReport, eval_batches
from milan.train.metrics import TopKAccuracy


@torch.no_grad()
def evaluate_heads(
    forward: Callable[[torch.Tensor], torch.Tensor],
    loader: Iterable[Batch],
    device: torch.device,
    *,
    num_heads: int = 1,
    ks: Sequence[int] = (1, 5),
    ctx: Callable[[], AbstractContextManager[Any]] = nullcontext,
    report: SkipReport | None = None,
    progress: bool = False,
    desc: str = "eval",
) -> list[dict[str, float]]:
    """Runs ``forward`` over the loader and returns each head's top-k accuracy, summed over processes.

    Args:
        forward: Images (B, 3, H, W) -> logits (B, C), or (K, B, C) for ``K = num_heads`` heads. Put the model
            in eval mode first.
        loader: Yields :class:`~milan.data.Batch` objects (every process its own shard, see
            :func:`milan.data.eval_loader`).
        device: Where to run.
        num_heads: Number of heads ``forward`` returns.
        ks: The ``k`` values.
        ctx: Autocast context factory.
        report: Receives unreadable files.
        progress: Show a progress bar.
        desc: Its label.

    Returns:
        One ``{"top1": %, "top5": %, "count": n}`` per head (counts over all processes).
    """
    meters = [TopKAccuracy(ks) for _ in range(num_heads)]
    for images, batch in eval_batches(loader, device, report=report, progress=progress, desc=desc):
        with ctx():
            logits = forward(images)
        if logits.ndim == 2:
            logits = logits.unsqueeze(0)  # (1, B, C)
        if logits.shape[0] != num_heads:
            raise ValueError(f"forward returned {logits.shape[0]} heads, expected {num_heads}")
        for meter, head_logits in zip(meters, logits.float(), strict=True):
            meter.update(head_logits, batch.labels.to(device))
    counts = torch.stack([m.counts() for m in meters]).to(device)  # (K, len(ks) + 1)
    counts = dist.all_reduce_sum(counts).cpu()
    for meter, row in zip(meters, counts, strict=True):
        meter.load_counts(row)
    return [{**m.compute(), "count": float(m.count)} for m in meters]
