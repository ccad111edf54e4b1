"""Learning-rate schedule as a pure function of the optimizer step."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class CosineSchedule:
    """Per-iteration linear warm-up from 0 to ``base_lr``, then a half-cycle cosine down to ``min_lr``.

    This is MAE's / the original MILAN's ``adjust_learning_rate`` expressed in optimizer steps rather than
    fractional epochs: ``lr(s) = base_lr * s / warmup_steps`` for ``s < warmup_steps``, then
    ``min_lr + (base_lr - min_lr) * (1 + cos(pi * (s - warmup_steps) / (total_steps - warmup_steps))) / 2``.

    Args:
        base_lr: Peak learning rate.
        total_steps: Optimizer steps of the whole schedule.
        warmup_steps: Linear warm-up steps.
        min_lr: Final learning rate.

    Examples:
        >>> s = CosineSchedule(base_lr=1.0, total_steps=10, warmup_steps=2)
        >>> [round(s(i), 3) for i in (0, 1, 2, 6, 10)]
        [0.0, 0.5, 1.0, 0.5, 0.0]
    """

    base_lr: float
    total_steps: int
    warmup_steps: int = 0
    min_lr: float = 0.0

    def __call__(self, step: int) -> float:
        """The learning rate used by optimizer step ``step`` (0-based)."""
        if step < self.warmup_steps:
            return self.base_lr * step / self.warmup_steps
        decay_steps = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / decay_steps)
        return self.min_lr + (self.base_lr - self.min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))

    def apply(self, optimizer: torch.optim.Optimizer, step: int) -> float:
        """Sets every param group's lr for ``step`` (times the group's ``lr_scale``, e.g. layer decay).

        Returns:
            The unscaled learning rate.
        """
        lr = self(step)
        for group in optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        return lr
