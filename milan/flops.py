"""Analytic FLOP counts of a MILAN pretraining step, and model FLOPs utilisation (MFU).

Counting rule: a multiply-add is 2 FLOPs; only matrix multiplications count (norms, softmax, GELU and the
elementwise ops are a few percent and ignored, as in the PaLM/nanoGPT MFU convention). For ``N`` tokens of width
``D`` and MLP ratio ``r``, one transformer block costs::

    qkv 6 N D^2  +  scores 2 N^2 D  +  attention x values 2 N^2 D  +  out-proj 2 N D^2  +  MLP 4 r N D^2

One MILAN image = teacher forward on all ``1 + L`` tokens + 3 x student forward (the backward pass costs twice
the forward) minus the patch embedding's input gradient (images need none), where the student forward is the
patch embedding of all ``L`` patches, the encoder on the ``1 + K`` visible tokens, and the decoder. For the
ViT-B/16 recipe (224 px, L = 196, K = 49, CLIP ViT-B/16 teacher, 512-d 8-block prompting decoder) this gives
35.3 (teacher) + 3 x 17.3 (student) - 0.2 = 86.8 GFLOP per image. The functions take shapes (numbers);
:func:`milan.models.factory.model_flops` reads them from a model config and a built teacher.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from milan.masking import num_visible

# Dense bf16/fp16 tensor-core peak, TFLOP/s per GPU (vendor spec sheets, without sparsity). Matched by substring of
# torch.cuda.get_device_name(), first match wins (so the longer names come first).
PEAK_TFLOPS: tuple[tuple[str, float], ...] = (
    ("H200", 989.0),
    ("H100 PCIe", 756.0),
    ("H100", 989.0),
    ("GH200", 989.0),
    ("B200", 2250.0),
    ("A100", 312.0),
    ("A800", 312.0),
    ("L40S", 362.0),
    ("L40", 181.0),
    ("L4", 121.0),
    ("A10G", 70.0),
    ("A10", 125.0),
    ("RTX 4090", 165.0),
    ("RTX 3090", 71.0),
    ("V100", 125.0),
    ("T4", 65.0),
)


def block_flops(tokens: int, dim: int, mlp_ratio: float = 4.0) -> float:
    """FLOPs of one pre-norm ViT block (self-attention over ``tokens`` tokens, then the MLP)."""
    n, d = tokens, dim
    return 8 * n * d * d + 4 * n * n * d + 4 * mlp_ratio * n * d * d


def prompt_block_flops(queries: int, keys: int, dim: int, mlp_ratio: float = 4.0) -> float:
    """FLOPs of one prompting-decoder block: ``queries`` mask tokens attend over ``keys`` tokens."""
    q, k, d = queries, keys, dim
    return 2 * q * d * d + 4 * k * d * d + 4 * q * k * d + 2 * q * d * d + 4 * mlp_ratio * q * d * d


@dataclass(frozen=True)
class PretrainFlops:
    """FLOPs per image of one MILAN training step.

    Attributes:
        teacher: Teacher forward.
        student_forward: Encoder (visible tokens) + decoder forward.
        patch_embed: Part of ``student_forward`` spent in the patch embedding.
    """

    teacher: float
    student_forward: float
    patch_embed: float = 0.0

    @property
    def total(self) -> float:
        """``teacher + 3 * student_forward - patch_embed``.

        The images need no gradient, so the patch embedding's backward only computes its weight gradient.
        """
        return self.teacher + 3 * self.student_forward - self.patch_embed


@dataclass(frozen=True)
class TowerShape:
    """What a ViT's FLOPs depend on.

    Attributes:
        grid: Patches per side at the resolution it runs at.
        out_dim: Width of the output projection (0: none).
        prefix_tokens: Class (and register) tokens.
    """

    width: int
    depth: int
    patch_size: int
    grid: int
    out_dim: int = 0
    mlp_ratio: float = 4.0
    prefix_tokens: int = 1


def teacher_flops(shape: TowerShape) -> float:
    """Forward FLOPs per image of a teacher: patch embedding, blocks on every token, output projection."""
    patches = shape.grid**2
    tokens = shape.prefix_tokens + patches
    flops = 2.0 * patches * 3 * shape.patch_size**2 * shape.width
    flops += shape.depth * block_flops(tokens, shape.width, shape.mlp_ratio)
    return flops + 2 * tokens * shape.width * shape.out_dim


def pretrain_flops(
    encoder: TowerShape, decoder: TowerShape, teacher: TowerShape | None, mask_ratio: float, *, prompting: bool = True
) -> PretrainFlops:
    """Analytic FLOPs per image of a MILAN pretraining step (see the module docstring).

    Args:
        encoder: The student encoder (its ``out_dim`` is not used).
        decoder: The decoder's width, depth and MLP ratio (it runs on the encoder's grid).
        teacher: The teacher as it runs (``None``: pixel targets).
        mask_ratio: Fraction of the patches masked.
        prompting: MILAN's prompting decoder (only the mask tokens are queries); else MAE's full self-attention.

    Examples:
        >>> vit_b, decoder = TowerShape(768, 12, 16, 14), TowerShape(512, 8, 16, 14)
        >>> round(pretrain_flops(vit_b, decoder, TowerShape(768, 12, 16, 14, out_dim=512), 0.75).total / 1e9, 1)
        86.8
    """
    num_patches = encoder.grid**2
    keep = num_visible(num_patches, mask_ratio)
    patch_dim = 3 * encoder.patch_size**2
    stem = 2.0 * num_patches * patch_dim * encoder.width  # patch embedding of every patch (masking comes after)
    student = stem + encoder.depth * block_flops(1 + keep, encoder.width, encoder.mlp_ratio)
    out_dim = patch_dim if teacher is None else (teacher.out_dim or teacher.width)
    tokens = 1 + num_patches
    d = decoder.width
    student += 2.0 * (1 + keep) * encoder.width * d + 2.0 * tokens * d * out_dim  # embedding and prediction
    if prompting:
        student += decoder.depth * prompt_block_flops(num_patches - keep, tokens, d, decoder.mlp_ratio)
    else:
        student += decoder.depth * block_flops(tokens, d, decoder.mlp_ratio)
    teacher_total = teacher_flops(teacher) if teacher is not None else 0.0
    return PretrainFlops(teacher=teacher_total, student_forward=student, patch_embed=stem)


def peak_flops(device: torch.device, override_tflops: float | None = None) -> float | None:
    """The accelerator's dense bf16 peak in FLOP/s (``None`` on CPU or for an unknown GPU)."""
    if override_tflops is not None:
        return override_tflops * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, tflops in PEAK_TFLOPS:
        if key in name:
            return tflops * 1e12
    return None


def mfu(images_per_second: float, flops_per_image: float, peak: float | None, num_devices: int = 1) -> float | None:
    """Model FLOPs utilisation: achieved FLOP/s over the peak of ``num_devices`` accelerators."""
    if peak is None or peak <= 0:
        return None
    return images_per_second * flops_per_image / (peak * num_devices)
