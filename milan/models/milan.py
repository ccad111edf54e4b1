"""MILAN: a masked student regresses a frozen teacher's features, with teacher-guided masking.

One step, for a batch of ImageNet-normalised images:

1. ``targets``: the teacher gives per-token targets (B, 1 + L, D_out) and the CLS-to-patch attention (B, L);
2. ``draw_mask``: semantic-aware masking draws a permutation with probability proportional to that attention and
   keeps the first 25 % visible (or uniformly random masking, for ablations);
3. the student: the encoder sees only the visible patches; the decoder predicts every token's target;
4. ``loss``: the mean of ``2 - 2 cos(pred, target)`` over all tokens (or the masked ones only).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn as nn

from milan.losses import cosine_loss, pixel_mse_loss
from milan.masking import MaskIndices, attention_masking, num_visible, random_masking, restore_order, to_mask_order
from milan.models.decoder import MAEDecoder, PromptingDecoder
from milan.models.teacher import Teacher
from milan.models.vit import VisionTransformer

Masking = Literal["attention", "random"]
LossOn = Literal["all", "masked"]


@dataclass
class MILANOutput:
    """Everything one forward pass produced.

    Attributes:
        loss: Scalar fp32 loss.
        pred: (B, 1 + L, D) predictions in spatial order (cls first).
        target: (B, 1 + L, D) targets in spatial order (teacher features, or patch pixels with a zero cls row).
        mask: The mask indices used.
        importance: (B, L) the teacher's CLS attention (``None`` without a teacher).
    """

    loss: torch.Tensor
    pred: torch.Tensor
    target: torch.Tensor
    mask: MaskIndices
    importance: torch.Tensor | None


def patchify(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, L, p * p * C) patches in row-major order, pixels ordered (p, p, C) as in MAE."""
    b, c, h, w = images.shape
    gh, gw = h // patch_size, w // patch_size
    x = images.reshape(b, c, gh, patch_size, gw, patch_size)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(b, gh * gw, patch_size * patch_size * c)


class MaskedStudent(nn.Module):
    """The trainable part: encoder on visible patches, then decoder on every token.

    This is the module to wrap in DDP/FSDP; the teacher stays outside.
    """

    def __init__(self, encoder: VisionTransformer, decoder: PromptingDecoder | MAEDecoder) -> None:
        super().__init__()
        self.encoder = encoder
        self.decoder = decoder

    def forward(self, images: torch.Tensor, mask: MaskIndices) -> torch.Tensor:
        """(B, 3, H, W) normalised images -> (B, 1 + L, D) predictions in mask order ``[cls, visible, masked]``."""
        latent = self.encoder.forward_masked(images, mask.ids_keep)  # (B, 1 + K, E)
        pred: torch.Tensor = self.decoder(latent, mask)
        return pred


class MILAN(nn.Module):
    """The MILAN pretraining model, as named stages a training step calls in order.

    ``targets`` (the frozen teacher), ``draw_mask`` (from per-sample noise), the student (``self.student``, or the
    DDP/FSDP wrapper a job puts around it) and ``loss``; :meth:`forward` composes them with ``self.student``.

    Args:
        decoder: Prompting decoder (MILAN) or MAE decoder (ablation).
        teacher: Frozen teacher; ``None`` means pixel targets (MAE, for ablations; needs random masking).
        mask_ratio: Fraction of patches masked (0.75).
        masking: ``"attention"`` (semantic-aware, MILAN) or ``"random"``.
        loss_on: ``"all"`` tokens (the references) or only the ``"masked"`` ones. Pixel targets never count cls.
    """

    def __init__(
        self,
        encoder: VisionTransformer,
        decoder: PromptingDecoder | MAEDecoder,
        teacher: Teacher | None,
        mask_ratio: float = 0.75,
        masking: Masking = "attention",
        loss_on: LossOn = "all",
    ) -> None:
        super().__init__()
        if masking not in ("attention", "random"):
            raise ValueError(f"masking must be 'attention' or 'random', got {masking!r}")
        if loss_on not in ("all", "masked"):
            raise ValueError(f"loss_on must be 'all' or 'masked', got {loss_on!r}")
        if teacher is None and masking == "attention":
            raise ValueError("attention masking needs a teacher; use masking='random' for pixel targets")
        if teacher is not None:
            if teacher.grid_size != encoder.grid_size:
                raise ValueError(
                    f"teacher patch grid {teacher.grid_size} != student patch grid {encoder.grid_size}; "
                    "choose a teacher image size / patch size giving the same grid"
                )
            if teacher.out_dim != decoder.out_dim:
                raise ValueError(f"decoder predicts {decoder.out_dim} dims but the teacher gives {teacher.out_dim}")
        elif decoder.out_dim != encoder.patch_size**2 * 3:
            raise ValueError(f"pixel targets need decoder out_dim {encoder.patch_size**2 * 3}, got {decoder.out_dim}")
        num_visible(encoder.num_patches, mask_ratio)  # validates the ratio
        self.student = MaskedStudent(encoder, decoder)
        self.teacher = teacher
        self.mask_ratio = mask_ratio
        self.masking: Masking = masking
        self.loss_on: LossOn = loss_on

    @property
    def encoder(self) -> VisionTransformer:
        return self.student.encoder

    @property
    def decoder(self) -> PromptingDecoder | MAEDecoder:
        return self.student.decoder

    def targets(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(B, 1 + L, D) targets in spatial order and the (B, L) masking importance (``None`` for pixel targets).

        The teacher's features and CLS attention; pixel targets are the patches with a zero cls row.
        """
        if self.teacher is not None:
            out = self.teacher(images)
            return out.features, out.cls_attention
        pixels = patchify(images, self.encoder.patch_size)  # (B, L, P)
        return torch.cat([pixels.new_zeros(pixels.shape[0], 1, pixels.shape[2]), pixels], dim=1), None

    def draw_mask(self, importance: torch.Tensor | None, noise: torch.Tensor) -> MaskIndices:
        """The mask by the configured rule, from (B, L) uniform noise (the importance is used by attention masking)."""
        if self.masking == "random":
            return random_masking(noise, self.mask_ratio)
        if importance is None:
            raise ValueError("attention masking needs the teacher's importance")
        return attention_masking(importance, self.mask_ratio, noise)

    def loss(self, pred: torch.Tensor, target: torch.Tensor, mask: MaskIndices) -> torch.Tensor:
        """Scalar fp32 loss of (B, 1 + L, D) predictions in mask order against (B, 1 + L, D) targets in spatial order.

        Computed in mask order: the target is gathered once instead of un-shuffling the predictions (the same value;
        tests/models/test_milan.py checks it against a naive spatial-order loss).
        """
        target = to_mask_order(target, mask)
        weight = None  # a plain mean over every token (the references' feature loss)
        if self.teacher is None or self.loss_on == "masked":
            ids = mask.ids_shuffle
            patches = torch.ones(ids.shape, device=ids.device)  # (B, L) in mask order
            if self.loss_on == "masked":
                patches[:, : mask.num_keep] = 0.0
            weight = torch.cat([torch.zeros_like(patches[:, :1]), patches], dim=1)  # (B, 1 + L); cls never counts
        if self.teacher is None:
            return pixel_mse_loss(pred, target, weight)  # per-patch normalised targets (MAE's norm_pix_loss)
        return cosine_loss(pred, target, weight)

    def forward(
        self, images: torch.Tensor, *, noise: torch.Tensor | None = None, mask: MaskIndices | None = None
    ) -> MILANOutput:
        """One pretraining forward pass with ``self.student``.

        Args:
            images: (B, 3, H, W) ImageNet-normalised images.
            noise: (B, L) uniform noise for the mask draw (default: drawn from the global RNG).
            mask: Use this mask instead of drawing one.
        """
        target, importance = self.targets(images)
        if mask is None:
            if noise is None:
                noise = torch.rand(images.shape[0], self.encoder.num_patches, device=images.device)
            mask = self.draw_mask(importance, noise)
        pred = self.student(images, mask)
        return MILANOutput(self.loss(pred, target, mask), restore_order(pred, mask), target, mask, importance)
