"""MILAN: a masked student regresses a frozen teacher's features, with teacher-guided masking.

One step, for a batch of ImageNet-normalised images:

1. the teacher gives per-token targets (B, 1 + L, D_out) and the CLS-to-patch attention (B, L);
2. semantic-aware masking draws a permutation with probability proportional to that attention and keeps the
   first 25 % visible (or uniformly random masking, for ablations);
3. the encoder sees only the visible patches; the decoder predicts every token's target;
4. the loss is the mean of ``2 - 2 cos(pred, target)`` over all tokens (or the masked ones only).
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

    def forward(self, images: torch.Tensor, mask: MaskIndices, restore_order: bool = False) -> torch.Tensor:
        """Predicts all tokens.

        Args:
            images: (B, 3, H, W) normalised images.
            mask: Which patches the encoder sees.
            restore_order: Spatial output order instead of mask order.

        Returns:
            (B, 1 + L, D) predictions.
        """
        latent = self.encoder.forward_masked(images, mask.ids_keep)  # (B, 1 + K, E)
        pred: torch.Tensor = self.decoder(latent, mask, restore_order)
        return pred


class MILAN(nn.Module):
    """The MILAN pretraining model.

    Args:
        encoder: Student ViT.
        decoder: Prompting decoder (MILAN) or MAE decoder (ablation).
        teacher: Frozen teacher; ``None`` means pixel targets (MAE, for ablations; needs random masking).
        mask_ratio: Fraction of patches masked (0.75).
        masking: ``"attention"`` (semantic-aware, MILAN) or ``"random"``.
        loss_on: ``"all"`` tokens (the references) or only the ``"masked"`` ones. Pixel targets never count cls.
        restore_order: Compute the loss in spatial order (the reference's layout). The default computes it in
            mask order and gathers the target instead, which gives the same value with fewer gathers.
        norm_pix: Normalise each target patch for pixel targets (MAE's ``norm_pix_loss``).
    """

    def __init__(
        self,
        encoder: VisionTransformer,
        decoder: PromptingDecoder | MAEDecoder,
        teacher: Teacher | None,
        mask_ratio: float = 0.75,
        masking: Masking = "attention",
        loss_on: LossOn = "all",
        restore_order: bool = False,
        norm_pix: bool = True,
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
        self.restore_order = restore_order
        self.norm_pix = norm_pix

    @property
    def encoder(self) -> VisionTransformer:
        """The student encoder."""
        return self.student.encoder

    @property
    def decoder(self) -> PromptingDecoder | MAEDecoder:
        """The student decoder."""
        return self.student.decoder

    def _token_weight(self, mask: MaskIndices) -> torch.Tensor | None:
        """(B, 1 + L) loss weights in the decoder's output order; ``None`` is a plain mean over every token."""
        if self.teacher is not None and self.loss_on == "all":
            return None
        ids = mask.ids_shuffle
        patches = mask.binary_mask() if self.loss_on == "masked" else torch.ones(ids.shape, device=ids.device)
        weight = torch.cat([torch.zeros_like(patches[:, :1]), patches], dim=1)  # (B, 1 + L) spatial; cls never counts
        if self.restore_order:
            return weight
        return to_mask_order(weight.unsqueeze(-1), mask).squeeze(-1)

    def draw_mask(
        self,
        images: torch.Tensor,
        importance: torch.Tensor | None,
        generator: torch.Generator | None = None,
        noise: torch.Tensor | None = None,
    ) -> MaskIndices:
        """Draws the mask for a batch, by the configured masking rule (from ``noise`` (B, L) when given)."""
        if self.masking == "attention":
            assert importance is not None
            return attention_masking(importance, self.mask_ratio, generator, noise=noise)
        return random_masking(
            images.shape[0],
            self.encoder.num_patches,
            self.mask_ratio,
            device=images.device,
            generator=generator,
            noise=noise,
        )

    def forward(
        self,
        images: torch.Tensor,
        *,
        mask: MaskIndices | None = None,
        generator: torch.Generator | None = None,
        noise: torch.Tensor | None = None,
        student: nn.Module | None = None,
    ) -> MILANOutput:
        """One pretraining forward pass.

        Args:
            images: (B, 3, H, W) ImageNet-normalised images.
            mask: Use this mask instead of drawing one.
            generator: RNG for the mask draw.
            noise: (B, L) uniform noise for the mask draw instead of ``generator`` (per-sample reproducible masks,
                see :func:`milan.masking.attention_masking`).
            student: Call this module instead of ``self.student`` (e.g. its DDP wrapper).

        Returns:
            Loss, predictions, targets, mask and importance.
        """
        importance: torch.Tensor | None = None
        if self.teacher is not None:
            teacher_out = self.teacher(images)
            target, importance = teacher_out.features, teacher_out.cls_attention  # (B, 1 + L, D), (B, L)
        else:
            pixels = patchify(images, self.encoder.patch_size)  # (B, L, P)
            target = torch.cat([pixels.new_zeros(pixels.shape[0], 1, pixels.shape[2]), pixels], dim=1)
        if mask is None:
            mask = self.draw_mask(images, importance, generator, noise)
        pred = (student if student is not None else self.student)(images, mask, restore_order=self.restore_order)

        weight = self._token_weight(mask)
        target_o = target if self.restore_order else to_mask_order(target, mask)
        if self.teacher is None:
            loss = pixel_mse_loss(pred, target_o, weight, self.norm_pix)
        else:
            loss = cosine_loss(pred, target_o, weight)
        pred_spatial = pred if self.restore_order else restore_order(pred, mask)
        return MILANOutput(loss, pred_spatial, target, mask, importance)
