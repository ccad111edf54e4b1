"""Losses as pure functions; each returns a scalar fp32 loss (or per-token distances)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def cosine_distance(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(..., D) pairs -> (...,) ``2 - 2 * cos(pred, target)`` in [0, 4] (= squared distance of the unit vectors).

    The normalisation runs in fp32 even under autocast: ``F.normalize`` in fp16 is a known NaN source.
    """
    p = F.normalize(pred.float(), dim=-1)
    t = F.normalize(target.float(), dim=-1)
    return 2.0 - 2.0 * (p * t).sum(dim=-1)


def _weighted_mean(per_token: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    if weight is None:
        return per_token.mean()
    weight = weight.float()
    return (per_token * weight).sum() / weight.sum().clamp_min(1.0)


def cosine_loss(pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """MILAN's feature loss: mean of ``2 - 2 cos`` over (B, N, D) tokens.

    Args:
        pred: (B, N, D) predicted features.
        target: (B, N, D) teacher features.
        weight: Optional (B, N) token weights (e.g. 1 on masked tokens); ``None`` averages every token, as
            the references do (cls, visible and masked alike).
    """
    return _weighted_mean(cosine_distance(pred, target), weight)  # (B, N) -> scalar


def pixel_mse_loss(
    pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None, norm_pix: bool = True
) -> torch.Tensor:
    """MAE's pixel loss: per-patch MSE of (B, N, P) patches, optionally on per-patch normalised pixels.

    Args:
        pred: (B, N, P) predicted patch pixels.
        target: (B, N, P) patchified image.
        weight: Optional (B, N) token weights (MAE uses 1 on masked patches only).
        norm_pix: Normalise each target patch to zero mean, unit variance (MAE's ``norm_pix_loss``).
    """
    target = target.float()
    if norm_pix:
        target = normalize_patches(target)
    return _weighted_mean((pred.float() - target).pow(2).mean(dim=-1), weight)  # (B, N) -> scalar


def normalize_patches(patches: torch.Tensor) -> torch.Tensor:
    """Each (..., P) patch to zero mean and unit variance: MAE's ``norm_pix_loss`` target."""
    mean = patches.mean(dim=-1, keepdim=True)
    var = patches.var(dim=-1, keepdim=True)
    return (patches - mean) / (var + 1.0e-6) ** 0.5
