"""Batches that carry their skipped samples, and the per-epoch :class:`SkipReport`.

How bad images reach the training loop: a dataset returns a :class:`BadSample` instead of ``(image, label)``;
:func:`collate_images` (in the DataLoader worker) drops it from the tensors and keeps it in
:attr:`Batch.skipped`, so the reasons travel to the main process with the batch. The loop feeds each batch to
a :class:`SkipReport` and skips a batch whose images were all bad::

    report = SkipReport()
    for batch in loader:
        report.update(batch)
        if batch.empty:  # every image of it was unreadable
            continue     # (distributed: decide together, e.g. all-reduce a flag, so no rank waits alone)
        loss = model(batch.images.to(device, non_blocking=True)).loss
        ...
    print(report.summary())  # "skipped 5 of 1000 images: 2 corrupt, 1 truncated, ..."
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import default_collate

from milan.data.decode import SKIP_REASONS, BadSample


@dataclass
class Batch:
    """A collated batch of good samples plus the samples that were dropped from it.

    Attributes:
        images: ``(B, 3, H, W)`` float tensor; ``B`` may be smaller than the loader's batch size, and is 0
            (``images`` of shape ``(0, 3, 0, 0)``) when every sample of the batch was bad.
        labels: ``(B,)`` int64 labels, ``-1`` for unlabelled images.
        skipped: The bad samples of this batch.
    """

    images: torch.Tensor
    labels: torch.Tensor
    skipped: tuple[BadSample, ...] = ()

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def empty(self) -> bool:
        """True when the batch has no images (all of its samples were skipped)."""
        return len(self) == 0

    def to(self, device: torch.device | str, *, non_blocking: bool = False) -> Batch:
        """The batch with its tensors moved to ``device``."""
        return dataclasses.replace(
            self,
            images=self.images.to(device, non_blocking=non_blocking),
            labels=self.labels.to(device, non_blocking=non_blocking),
        )

    def pin_memory(self) -> Batch:
        """The batch in page-locked memory (called by the DataLoader when ``pin_memory=True``)."""
        return dataclasses.replace(self, images=self.images.pin_memory(), labels=self.labels.pin_memory())


def collate_images(items: Sequence[tuple[torch.Tensor, int] | BadSample]) -> Batch:
    """DataLoader ``collate_fn``: stacks the good ``(image, label)`` items and keeps the bad ones aside.

    Args:
        items: Dataset items (see :mod:`milan.data.datasets`).

    Returns:
        The :class:`Batch`; never ``None``, possibly empty.
    """
    bad = tuple(item for item in items if isinstance(item, BadSample))
    good = [item for item in items if not isinstance(item, BadSample)]
    if not good:
        return Batch(images=torch.empty(0, 3, 0, 0), labels=torch.empty(0, dtype=torch.long), skipped=bad)
    # default_collate writes straight into shared memory inside worker processes (no extra copy).
    images = default_collate([image for image, _ in good])  # (B, 3, H, W)
    labels = torch.tensor([label for _, label in good], dtype=torch.long)  # (B,)
    return Batch(images=images, labels=labels, skipped=bad)


class SkipReport:
    """Counts the images seen and skipped over an epoch (or a whole run) and summarises why.

    Args:
        max_examples: How many skipped samples to remember (the first ones).
    """

    def __init__(self, max_examples: int = 10) -> None:
        self.max_examples = max_examples
        self.seen = 0
        self.counts: Counter[str] = Counter()
        self.examples: list[BadSample] = []

    @property
    def skipped(self) -> int:
        """Number of skipped images."""
        return sum(self.counts.values())

    def add(self, bad: Iterable[BadSample], good: int = 0) -> None:
        """Records skipped samples and ``good`` usable ones."""
        self.seen += good
        for sample in bad:
            self.seen += 1
            self.counts[sample.reason] += 1
            if len(self.examples) < self.max_examples:
                self.examples.append(sample)

    def update(self, batch: Batch) -> None:
        """Records one batch."""
        self.add(batch.skipped, good=len(batch))

    def filter(self, batches: Iterable[Batch]) -> Iterator[Batch]:
        """Records every batch and yields the non-empty ones (single process; see the module docstring)."""
        for batch in batches:
            self.update(batch)
            if not batch.empty:
                yield batch

    def reset(self) -> None:
        """Clears all counts (e.g. at the start of an epoch)."""
        self.seen = 0
        self.counts.clear()
        self.examples.clear()

    def merge(self, other: SkipReport) -> None:
        """Adds another report's counts (e.g. one epoch's into a run total)."""
        self.seen += other.seen
        self.counts.update(other.counts)
        room = self.max_examples - len(self.examples)
        self.examples.extend(other.examples[: max(room, 0)])

    def all_reduce(self, device: torch.device | None = None) -> None:
        """Sums the counts over all ranks in place (no-op unless ``torch.distributed`` is initialised).

        Args:
            device: Where the reduction tensor lives (must be a CUDA device for the NCCL backend).
        """
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return
        values = torch.tensor([self.seen, *(self.counts[r] for r in SKIP_REASONS)], dtype=torch.long, device=device)
        torch.distributed.all_reduce(values)
        self.seen = int(values[0])
        self.counts = Counter({r: int(v) for r, v in zip(SKIP_REASONS, values[1:].tolist(), strict=True) if v})

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready counts: ``{"seen", "skipped", "reasons": {reason: n}, "examples": [[path, reason, detail]]}``."""
        return {
            "seen": self.seen,
            "skipped": self.skipped,
            "reasons": dict(self.counts),
            "examples": [list(example) for example in self.examples],
        }

    def summary(self) -> str:
        """One line of counts, most frequent reason first, and the first skipped file.

        Example: ``skipped 5 of 1000 images: 2 corrupt, 1 truncated, 1 empty, 1 not an image (first: a/b.jpg:
        corrupt, SyntaxError: broken PNG file)``.
        """
        if not self.skipped:
            return f"skipped 0 of {self.seen} images"
        order: dict[str, int] = {reason: i for i, reason in enumerate(SKIP_REASONS)}
        reasons = sorted(self.counts.items(), key=lambda kv: (-kv[1], order.get(kv[0], len(order))))
        parts = ", ".join(f"{n} {reason}" for reason, n in reasons)
        text = f"skipped {self.skipped} of {self.seen} images: {parts}"
        if self.examples:
            first = self.examples[0]
            text += f" (first: {first.path}: {first.reason}, {first.detail})"
        return text

    def __repr__(self) -> str:
        return f"SkipReport({self.summary()!r})"
