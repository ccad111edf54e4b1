"""Analytic FLOP counts of a MILAN pretraining step, and model FLOPs utilisation (MFU).

Counting rule: a multiply-add is 2 FLOPs; only matrix multiplications count (norms, softmax, GELU and the
elementwise ops are a few percent and ignored, as in the PaLM/nanoGPT MFU convention). For ``N`` tokens of width
``D`` and MLP ratio ``r``, one transformer block costs::

    qkv 6 N D^2  +  scores 2 N^2 D  +  attention x values 2 N^2 D  +  out-proj 2 N D^2  +  MLP 4 r N D^2

One MILAN image = teacher forward on all ``1 + L`` tokens + 3 x student forward (the backward pass costs twice
the forward) minus the patch embedding's input gradient (images need none), where the student forward is the
patch embedding of all ``L`` patches, the encoder on the ``1 + K`` visible tokens, and the decoder. For the
ViT-B/16 recipe (224 px, L = 196, K = 49, CLIP ViT-B/16 teacher, 512-d 8-block prompting decoder) this gives
35.3 (teacher) + 3 x 17.3 (student) - 0.2 = 86.8 GFLOP per image.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from milan.masking import num_visible
from milan.models.factory import ModelConfig

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
        total: ``teacher + 3 * student_forward - patch_embed``.
    """

    teacher: float
    student_forward: float
    patch_embed: float = 0.0

    @property
    def total(self) -> float:
        """FLOPs per image of a whole training step.

        The images need no gradient, so the patch embedding's backward only computes its weight gradient.
        """
        return self.teacher + 3 * self.student_forward - self.patch_embed


def pretrain_flops(cfg: ModelConfig) -> PretrainFlops:
    """Analytic FLOPs per image of a MILAN pretraining step (see the module docstring).

    Args:
        cfg: The model config.

    Returns:
        Teacher and student FLOPs.

    Examples:
        >>> from milan.models.factory import model_config
        >>> round(pretrain_flops(model_config("milan_vit_base_patch16")).total / 1e9, 1)
        86.8
    """
    enc, dec, tea = cfg.encoder, cfg.decoder, cfg.teacher
    num_patches = (enc.img_size // enc.patch_size) ** 2
    keep = num_visible(num_patches, cfg.mask_ratio)
    patch_dim = 3 * enc.patch_size**2
    stem = 2.0 * num_patches * patch_dim * enc.embed_dim  # patch embedding of every patch (masking comes after)
    encoder = stem + enc.depth * block_flops(1 + keep, enc.embed_dim, enc.mlp_ratio)
    pixel_targets = tea.kind == "none"
    out_dim = patch_dim if pixel_targets else tea.out_dim
    tokens = 1 + num_patches
    decoder = 2.0 * (1 + keep) * enc.embed_dim * dec.embed_dim + 2.0 * tokens * dec.embed_dim * out_dim
    if dec.kind == "prompting":
        decoder += dec.depth * prompt_block_flops(num_patches - keep, tokens, dec.embed_dim, dec.mlp_ratio)
    else:
        decoder += dec.depth * block_flops(tokens, dec.embed_dim, dec.mlp_ratio)
    teacher = 0.0
    if not pixel_targets:
        t_patches = (tea.img_size // tea.patch_size) ** 2
        teacher = 2.0 * t_patches * 3 * tea.patch_size**2 * tea.width
        teacher += tea.depth * block_flops(1 + t_patches, tea.width)
        teacher += 2 * (1 + t_patches) * tea.width * tea.out_dim
    return PretrainFlops(teacher=teacher, student_forward=encoder + decoder, patch_embed=stem)


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
