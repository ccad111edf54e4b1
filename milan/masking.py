"""Patch masking as pure functions over tensors, all returning one index contract.

``ids_shuffle`` is a per-sample permutation of the ``L`` patch indices; its first ``num_keep`` entries are the
visible patches (in the order the encoder sees them) and the rest are masked. ``ids_restore`` is its inverse
permutation, so ``gather(shuffled, ids_restore)`` puts tokens back in spatial (row-major) order.

One source of randomness: every draw is a function of a (B, L) uniform ``noise`` tensor, one row per sample.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class MaskIndices(NamedTuple):
    """Which patches are visible and which are masked, per sample.

    Attributes:
        ids_shuffle: (B, L) permutation; visible patches first.
        ids_restore: (B, L) inverse permutation of ``ids_shuffle``.
        num_keep: Number of visible patches per sample.
    """

    ids_shuffle: torch.Tensor
    ids_restore: torch.Tensor
    num_keep: int

    @property
    def ids_keep(self) -> torch.Tensor:
        """(B, num_keep) indices of the visible patches."""
        return self.ids_shuffle[:, : self.num_keep]

    @property
    def ids_mask(self) -> torch.Tensor:
        """(B, L - num_keep) indices of the masked patches."""
        return self.ids_shuffle[:, self.num_keep :]

    def binary_mask(self) -> torch.Tensor:
        """(B, L) float mask in spatial order: 0 = visible, 1 = masked (MAE convention)."""
        mask = torch.ones(self.ids_shuffle.shape, device=self.ids_shuffle.device)
        mask[:, : self.num_keep] = 0.0
        return torch.gather(mask, 1, self.ids_restore)


def num_visible(num_patches: int, mask_ratio: float) -> int:
    """``int(L * (1 - ratio))`` visible patches, as in the references (196 at 0.75 -> 49)."""
    if not 0.0 <= mask_ratio < 1.0:
        raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
    return int(num_patches * (1 - mask_ratio))


def from_permutation(ids_shuffle: torch.Tensor, mask_ratio: float) -> MaskIndices:
    """Builds the contract from a given (B, L) permutation (e.g. one drawn elsewhere)."""
    num_keep = num_visible(ids_shuffle.shape[1], mask_ratio)
    return MaskIndices(ids_shuffle, torch.argsort(ids_shuffle, dim=1), num_keep)


def attention_masking(importance: torch.Tensor, mask_ratio: float, noise: torch.Tensor) -> MaskIndices:
    """MILAN's semantic-aware masking: patches the teacher attends to are more likely to stay visible.

    The permutation is the references' ``torch.multinomial(importance, L, replacement=False)`` draw (each next patch
    with probability proportional to its weight among those not yet drawn, i.e. Plackett-Luce), realised as
    exponential races ``argsort(-log(u) / w)`` so that each sample's mask depends only on its own noise row: a batch
    split across processes draws the same masks. The first ``int(L * (1 - mask_ratio))`` drawn are kept. The
    importance is used unnormalised and untempered, as in the original code and mmpretrain.

    Args:
        importance: (B, L) non-negative weights, e.g. the teacher's CLS-to-patch attention.
        mask_ratio: Fraction of patches to mask.
        noise: (B, L) uniform [0, 1) noise (draw it with a generator for reproducible masks).
    """
    if importance.ndim != 2:
        raise ValueError(f"importance must be (B, L), got shape {tuple(importance.shape)}")
    # Clamping at the smallest normal float leaves every positive weight unchanged but keeps a teacher's exact zeros
    # from dividing by zero (they are drawn last).
    weights = importance.detach().float().clamp_min(torch.finfo(torch.float32).tiny)
    arrival = -torch.log(noise.to(weights.device, torch.float32).clamp_min(1e-30)) / weights  # (B, L)
    return from_permutation(torch.argsort(arrival, dim=1, stable=True), mask_ratio)


def random_masking(noise: torch.Tensor, mask_ratio: float) -> MaskIndices:
    """Uniformly random masking (MAE): ``argsort`` of (B, L) uniform noise."""
    return from_permutation(torch.argsort(noise, dim=1), mask_ratio)


def gather_tokens(x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """(B, L, D) tokens, (B, K) indices into L -> (B, K, D) the selected tokens, in the order of ``ids``."""
    return torch.gather(x, 1, ids.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def restore_order(x: torch.Tensor, mask: MaskIndices) -> torch.Tensor:
    """(B, 1 + L, D) tokens in mask order ``[cls, ids_shuffle...]`` -> spatial order ``[cls, 0..L-1]``."""
    return torch.cat([x[:, :1], gather_tokens(x[:, 1:], mask.ids_restore)], dim=1)


def to_mask_order(x: torch.Tensor, mask: MaskIndices) -> torch.Tensor:
    """(B, 1 + L, D) tokens in spatial order -> mask order ``[cls, visible..., masked...]``."""
    return torch.cat([x[:, :1], gather_tokens(x[:, 1:], mask.ids_shuffle)], dim=1)
