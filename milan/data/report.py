"""Batches that carry their skipped samples, the :class:`SkipReport` that counts them, and :class:`DataError`.

A dataset returns a :class:`~milan.data.decode.BadSample` instead of ``(image, label)``; :func:`collate_images`
(in the DataLoader worker) leaves it out of the tensors and keeps it in :attr:`Batch.skipped`, so the reasons travel
to the main process with the batch. The loop feeds each batch to a :class:`SkipReport`, skips a batch whose images
were all bad (distributed: decided together, so that no rank waits alone), and checks the report at the end of the
epoch (:meth:`SkipReport.check`: no usable image, or more skipped than ``data.max_skip_fraction``). A tar shard that
cannot be read to its end arrives as a ``"damaged shard"`` sample and is counted apart from the images.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import default_collate

from milan import distributed as dist
from milan.data.decode import DAMAGED_SHARD, SKIP_REASONS, BadSample
from milan.errors import UserError

DEFAULT_MAX_SKIP_FRACTION = 0.5
"""Default of ``data.max_skip_fraction``: a run stops when more than half of an epoch's images were skipped."""


class DataError(UserError, RuntimeError):
    """The data cannot train or evaluate anything useful: no usable image, or too many skipped (one line)."""


@dataclass
class Batch:
    """The good samples of a batch, collated, plus the bad samples dropped from it."""

    images: torch.Tensor  # (B, 3, H, W) float; (0, 3, 0, 0) when every sample was bad
    labels: torch.Tensor  # (B,) int64, -1 for unlabelled images
    skipped: tuple[BadSample, ...] = ()

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def empty(self) -> bool:
        """True when every sample of the batch was skipped."""
        return len(self) == 0

    def pin_memory(self) -> Batch:
        """The batch in page-locked memory (called by the DataLoader when ``pin_memory=True``)."""
        return dataclasses.replace(self, images=self.images.pin_memory(), labels=self.labels.pin_memory())


def collate_images(items: Sequence[tuple[torch.Tensor, int | torch.Tensor] | BadSample]) -> Batch:
    """DataLoader ``collate_fn``: stacks the good ``(image, label)`` items and keeps the bad ones aside."""
    bad = tuple(item for item in items if isinstance(item, BadSample))
    good = [item for item in items if not isinstance(item, BadSample)]
    if not good:
        return Batch(images=torch.empty(0, 3, 0, 0), labels=torch.empty(0, dtype=torch.long), skipped=bad)
    # default_collate writes straight into shared memory inside worker processes (no extra copy).
    images, labels = default_collate(good)  # (B, 3, H, W), (B,) int64 (or the label maps stacked)
    return Batch(images=images, labels=labels, skipped=bad)


class SkipReport:
    """Counts the images seen and skipped over an epoch (or a whole run) and summarises why.

    Args:
        max_examples: How many skipped samples (and damaged shards) to remember, the first ones.
        max_skip_fraction: :meth:`check` fails above this share of skipped images (``data.max_skip_fraction``;
            1.0: only an epoch without any usable image fails).
        expected: Samples the epoch should hold (a stream's ``data.num_samples``, whole batches), if known: the
            summary then says how many were not read (a damaged shard's lost samples).
    """

    def __init__(
        self,
        max_examples: int = 10,
        *,
        max_skip_fraction: float = DEFAULT_MAX_SKIP_FRACTION,
        expected: int | None = None,
    ) -> None:
        if not 0.0 <= max_skip_fraction <= 1.0:
            raise ValueError(f"max_skip_fraction must be in [0, 1], got {max_skip_fraction}")
        self.max_examples = max_examples
        self.max_skip_fraction = max_skip_fraction
        self.expected = expected
        self.reset()

    def reset(self) -> None:
        """Clears all counts (e.g. at the start of an epoch)."""
        self.seen = 0
        self.counts: Counter[str] = Counter()
        self.examples: list[BadSample] = []
        self.damaged_shards = 0
        self.shard_examples: list[BadSample] = []

    @property
    def skipped(self) -> int:
        return sum(self.counts.values())

    def add(self, bad: Iterable[BadSample], good: int = 0) -> None:
        """Records skipped samples and ``good`` usable ones."""
        self.seen += good
        for sample in bad:
            if sample.reason == DAMAGED_SHARD:
                self.damaged_shards += 1
                if len(self.shard_examples) < self.max_examples:
                    self.shard_examples.append(sample)
                continue
            self.seen += 1
            self.counts[sample.reason] += 1
            if len(self.examples) < self.max_examples:
                self.examples.append(sample)

    def update(self, batch: Batch) -> None:
        self.add(batch.skipped, good=len(batch))

    def merge(self, other: SkipReport) -> None:
        """Adds another report's counts (e.g. one epoch's into a run total)."""
        self.seen += other.seen
        self.counts.update(other.counts)
        self.examples.extend(other.examples[: max(self.max_examples - len(self.examples), 0)])
        self.damaged_shards += other.damaged_shards
        self.shard_examples.extend(other.shard_examples[: max(self.max_examples - len(self.shard_examples), 0)])
        if other.expected is not None:
            self.expected = (self.expected or 0) + other.expected

    def all_reduce(self, device: torch.device | None = None) -> None:
        """Sums the counts over all ranks in place (no-op without a process group; NCCL needs a CUDA ``device``)."""
        counts = [self.counts[r] for r in SKIP_REASONS]
        values = torch.tensor([self.seen, self.damaged_shards, *counts], dtype=torch.long, device=device)
        self.seen, self.damaged_shards, *totals = dist.all_reduce_sum(values).tolist()
        self.counts = Counter({r: v for r, v in zip(SKIP_REASONS, totals, strict=True) if v})

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready counts: ``{"seen", "skipped", "reasons": {reason: n}, "examples": [[path, reason, detail]]}``.

        Streams add ``"damaged_shards"`` and ``"shard_examples"`` (when a shard was damaged) and ``"expected"``.
        """
        out: dict[str, Any] = {
            "seen": self.seen,
            "skipped": self.skipped,
            "reasons": dict(self.counts),
            "examples": [list(example) for example in self.examples],
        }
        if self.damaged_shards or self.shard_examples:
            out["damaged_shards"] = self.damaged_shards
            out["shard_examples"] = [list(example) for example in self.shard_examples]
        if self.expected is not None:
            out["expected"] = self.expected
        return out

    def summary(self) -> str:
        """One line, most frequent reason first, and the first skipped file.

        Example: ``skipped 5 of 1000 images: 2 corrupt, 1 truncated, 1 empty, 1 not an image (first: a/b.jpg:
        corrupt, SyntaxError: broken PNG file)``; streams also ``; 1 damaged shard (a-0003.tar: unreadable after
        7 samples, ...); used 995 of the 1000 samples expected``.
        """
        if not self.skipped:
            text = f"skipped 0 of {self.seen} images"
        else:
            order: dict[str, int] = {reason: i for i, reason in enumerate(SKIP_REASONS)}
            reasons = sorted(self.counts.items(), key=lambda kv: (-kv[1], order.get(kv[0], len(order))))
            text = f"skipped {self.skipped} of {self.seen} images: " + ", ".join(f"{n} {r}" for r, n in reasons)
            if self.examples:
                first = self.examples[0]
                text += f" (first: {first.path}: {first.reason}, {first.detail})"
        if self.damaged_shards:
            shards = "; ".join(f"{s.path}: {s.detail}" for s in self.shard_examples[:3])
            more = ", ..." if self.damaged_shards > len(self.shard_examples[:3]) else ""
            text += f"; {self.damaged_shards} damaged shard{'s' if self.damaged_shards != 1 else ''}"
            text += f" ({shards}{more})" if shards else ""
        if self.expected is not None and self.seen < self.expected:
            text += f"; used {self.seen} of the {self.expected} samples expected"
        return text

    def check(self, what: str = "the epoch") -> None:
        """Raises :class:`DataError` if ``what`` (``"epoch 3"``) had no usable image or skipped too many.

        Call it after :meth:`all_reduce`.
        """
        if self.seen == self.skipped:
            raise DataError(f"{what} had no usable image: {self.summary()}")
        share = self.skipped / self.seen
        if share > self.max_skip_fraction:
            raise DataError(
                f"{what} skipped {share:.0%} of its images, more than data.max_skip_fraction="
                f"{self.max_skip_fraction:g}: {self.summary()}. Repair or remove the files, or raise "
                "data.max_skip_fraction"
            )

    def __repr__(self) -> str:
        return f"SkipReport({self.summary()!r})"
