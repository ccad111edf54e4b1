"""A grid of linear-probe heads trained in one pass over the frozen encoder (DINOv2's ``eval/linear.py`` idea).

Every head is the reference probe head, ``BatchNorm1d(affine=False) -> Linear``, on the same CLS feature. The
affine-free BatchNorm has no parameters and sees the same batch, so one BN is shared; each ``Linear`` sits in its
own optimizer group with its own ``lr_scale``. The training loss is the *sum* of the per-head losses, so each
head receives exactly the gradient it would get alone: training the grid equals training each probe separately
(same data order), for the price of one encoder forward.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers.weight_init import trunc_normal_

from milan.models.vit import VisionTransformer


class LinearProbeGrid(nn.Module):
    """Frozen encoder -> CLS after the final LayerNorm -> shared affine-free BN -> one Linear per lr.

    Args:
        encoder: Pretrained encoder (frozen here).
        lr_scales: One lr multiplier per head (e.g. ``[0.5, 1, 2]`` times the scheduled lr).
    """

    def __init__(self, encoder: VisionTransformer, num_classes: int, lr_scales: Sequence[float]) -> None:
        super().__init__()
        if not lr_scales or any(s <= 0 for s in lr_scales):
            raise ValueError(f"lr_scales must be a non-empty list of positive numbers, got {list(lr_scales)}")
        dim = encoder.embed_dim
        self.lr_scales = [float(s) for s in lr_scales]
        self.encoder = encoder.requires_grad_(False)
        self.num_classes = num_classes
        self.bn = nn.BatchNorm1d(dim, affine=False, eps=1e-6)
        fcs = [nn.Linear(dim, num_classes) for _ in self.lr_scales]
        for fc in fcs:  # the reference probe head's init
            trunc_normal_(fc.weight, std=0.01)
            nn.init.zeros_(fc.bias)
        self.fcs = nn.ModuleList(fcs)

    def train(self, mode: bool = True) -> LinearProbeGrid:
        """The frozen encoder always stays in eval mode."""
        super().train(mode)
        self.encoder.eval()
        return self

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (K, B, num_classes) logits of the K heads."""
        with torch.no_grad():
            feats = self.encoder.forward_features(images)[:, 0]  # (B, D) CLS after the final norm
        x = self.bn(feats)
        return torch.stack([fc(x) for fc in self.fcs])

    def probe_state_dict(self, index: int) -> dict[str, torch.Tensor]:
        """Head ``index`` as a :class:`~milan.models.classifier.LinearProbe` state dict (``encoder.*``, ``head.*``)."""
        sd: dict[str, torch.Tensor] = OrderedDict((f"encoder.{k}", v) for k, v in self.encoder.state_dict().items())
        sd.update((f"head.bn.{k}", v) for k, v in self.bn.state_dict().items())
        sd.update((f"head.fc.{k}", v) for k, v in self.fcs[index].state_dict().items())
        return sd


def grid_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Sum over heads of the mean cross-entropy: (K, B, C) logits, (B,) targets -> scalar.

    Summing (not averaging) keeps each head's gradient equal to the gradient of its own loss.
    """
    k, b, c = logits.shape
    per_sample = F.cross_entropy(logits.reshape(k * b, c), targets.repeat(k), reduction="none")  # (K * B,)
    return per_sample.view(k, b).mean(dim=1).sum()


def save_lr_grid_plot(history: Sequence[dict[str, Any]], out: str | os.PathLike[str]) -> Path:
    """Draws each head's validation top-1 against its lr, one line per evaluation, the winner marked.

    Args:
        history: The probe's evaluations in order, each with ``epoch``, ``best_head`` and ``heads`` (one
            ``{"lr", "top1", ...}`` per head).
        out: The PNG to write (returned).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    evals = [h for h in history if h.get("heads")]
    if not evals:
        raise ValueError("no evaluation of the lr grid to draw")
    fig, ax = plt.subplots(figsize=(6.4, 4.2), constrained_layout=True)
    cmap = plt.get_cmap("viridis")
    for i, record in enumerate(evals):
        lrs = [float(h["lr"]) for h in record["heads"]]
        top1 = [float(h["top1"]) for h in record["heads"]]
        last = i == len(evals) - 1
        ax.plot(lrs, top1, marker="o", color=cmap(i / max(1, len(evals) - 1)), lw=2.0 if last else 1.0,
                alpha=1.0 if last else 0.5, label=f"epoch {record.get('epoch', i + 1)}")  # fmt: skip
    final = evals[-1]
    best = final["heads"][int(final["best_head"])]
    ax.plot([best["lr"]], [best["top1"]], marker="*", ms=16, color="tab:red", ls="none",
            label=f"best: lr {float(best['lr']):.4g}, top-1 {float(best['top1']):.2f}")  # fmt: skip
    if len(final["heads"]) > 1:
        ax.set_xscale("log")
        ticks = [float(h["lr"]) for h in final["heads"]]
        ax.set_xticks(ticks, [f"{t:.4g}" for t in ticks])
        ax.minorticks_off()
    ax.set_xlabel("peak learning rate of the head")
    ax.set_ylabel("validation top-1 (%)")
    ax.set_title(f"linear probe: {len(final['heads'])} heads trained in one pass")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
