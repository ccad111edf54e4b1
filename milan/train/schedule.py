"""Learning-rate schedules as pure functions of the optimizer step: warm-up + cosine, warm-up + poly."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Schedule:
    """A learning rate per optimizer step (:meth:`__call__`, 0-based) that :meth:`apply` sets."""

    base_lr: float  # peak
    total_steps: int  # optimizer steps of the whole schedule
    warmup_steps: int = 0
    min_lr: float = 0.0  # final

    def __call__(self, step: int) -> float:
        """The learning rate used by optimizer step ``step``."""
        raise NotImplementedError

    def apply(self, optimizer: torch.optim.Optimizer, step: int) -> float:
        """Sets every param group's lr for ``step`` (times the group's ``lr_scale``, e.g. layer decay).

        Returns:
            The unscaled learning rate.
        """
        lr = self(step)
        for group in optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        return lr

    def _progress(self, step: int) -> float:
        """How far past the warm-up ``step`` is, in [0, 1]."""
        return min(1.0, (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps))


@dataclass(frozen=True)
class CosineSchedule(Schedule):
    """Per-iteration linear warm-up from 0 to ``base_lr``, then a half-cycle cosine down to ``min_lr``.

    This is MAE's / the original MILAN's ``adjust_learning_rate`` expressed in optimizer steps rather than
    fractional epochs: ``lr(s) = base_lr * s / warmup_steps`` for ``s < warmup_steps``, then
    ``min_lr + (base_lr - min_lr) * (1 + cos(pi * (s - warmup_steps) / (total_steps - warmup_steps))) / 2``.

    Examples:
        >>> s = CosineSchedule(base_lr=1.0, total_steps=10, warmup_steps=2)
        >>> [round(s(i), 3) for i in (0, 1, 2, 6, 10)]
        [0.0, 0.5, 1.0, 0.5, 0.0]
    """

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.base_lr * step / self.warmup_steps
        return self.min_lr + (self.base_lr - self.min_lr) * 0.5 * (1.0 + math.cos(math.pi * self._progress(step)))


@dataclass(frozen=True)
class PolySchedule(Schedule):
    """Linear warm-up from ``warmup_ratio x base_lr``, then poly decay to ``min_lr`` (mmengine LinearLR + PolyLR).

    ``lr(s) = base_lr * (r + (1 - r) * s / warmup_steps)`` during the warm-up, then
    ``min_lr + (base_lr - min_lr) * (1 - (s - warmup_steps) / (total_steps - warmup_steps)) ** power``; mmengine's
    recursive PolyLR telescopes to this closed form.

    Examples:
        >>> s = PolySchedule(base_lr=1.0, total_steps=10, warmup_steps=2, warmup_ratio=0.0)
        >>> [round(s(i), 3) for i in (0, 1, 2, 6, 10)]
        [0.0, 0.5, 1.0, 0.5, 0.0]
    """

    warmup_ratio: float = 0.0
    power: float = 1.0

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            r = self.warmup_ratio
            return self.base_lr * (r + (1 - r) * step / self.warmup_steps)
        return self.min_lr + (self.base_lr - self.min_lr) * float((1.0 - self._progress(step)) ** self.power)
