"""Analytic FLOP counts of a MILAN pretraining step, and model FLOPs utilisation (MFU).

Counting rule: a multiply-add is 2 FLOPs; only matrix multiplications count (norms, softmax, GELU and the
elementwise ops are a few percent and ignored, as in the PaLM/nanoGPT MFU convention). For ``N`` tokens of width
``D`` and MLP ratio ``r``, one transformer block costs::

    qkv 6 N D^2  +  scores 2 N^2 D  +  attention x values 2 N^2 D  +  out-proj 2 N D^2  +  MLP 4 r N D^2

One MILAN image = teacher forward on all ``1 + L`` tokens + 3 x student forward (the backward pass costs twice
the forward) minus the patch embedding's input gradient (images need none), where the student forward is the
patch embedding of all ``L`` patches, the encoder on the ``1 + K`` visible tokens, and the decoder. For the
ViT-B/16 recipe (224 px, L = 196, K = 49, CLIP ViT-B/16 teacher, 512-d 8-block prompting decoder) this gives
35.3 (teacher) + 3 x 17.3 (student) - 0.2 = 86.8 GFLOP per image. A teacher loaded from a file is counted from its
own shape at the resolution it runs at (:func:`teacher_shape`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from milan.masking import num_visible
from milan.models.factory import ModelConfig
from milan.models.teacher import Teacher

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


@dataclass(frozen=True)
class TowerShape:
    """What the teacher's FLOPs depend on.

    Attributes:
        width: Token width.
        depth: Blocks.
        patch_size: Patch side in pixels.
        grid: Patches per side at the resolution it runs at.
        out_dim: Width of the output projection (0: none).
        mlp_ratio: MLP hidden width / width.
        prefix_tokens: Class (and register) tokens.
    """

    width: int
    depth: int
    patch_size: int
    grid: int
    out_dim: int
    mlp_ratio: float = 4.0
    prefix_tokens: int = 1


def teacher_shape(teacher: Teacher) -> TowerShape:
    """The shape of a built teacher (e.g. one loaded from a file, whose config fields describe another)."""
    tower = teacher.model
    block = tower.blocks[0]
    fc1 = getattr(getattr(block, "mlp", None), "fc1", None)
    width = int(tower.embed_dim)
    hidden = fc1.out_features if isinstance(fc1, torch.nn.Linear) else 4 * width
    head = tower.head
    return TowerShape(
        width=width,
        depth=len(tower.blocks),
        patch_size=teacher.patch_size,
        grid=teacher.grid_size[0],
        out_dim=head.out_features if isinstance(head, torch.nn.Linear) else 0,
        mlp_ratio=hidden / width,
        prefix_tokens=teacher.num_prefix_tokens,
    )


def teacher_flops(shape: TowerShape) -> float:
    """Forward FLOPs per image of a teacher: patch embedding, blocks on every token, output projection."""
    patches = shape.grid**2
    tokens = shape.prefix_tokens + patches
    flops = 2.0 * patches * 3 * shape.patch_size**2 * shape.width
    flops += shape.depth * block_flops(tokens, shape.width, shape.mlp_ratio)
    return flops + 2 * tokens * shape.width * shape.out_dim


def pretrain_flops(cfg: ModelConfig, teacher: Teacher | None = None) -> PretrainFlops:
    """Analytic FLOPs per image of a MILAN pretraining step (see the module docstring).

    Args:
        cfg: The model config.
        teacher: The built teacher, whose shape then replaces ``cfg.teacher``'s (pass it for a teacher loaded from
            ``model.teacher.checkpoint``: the config's architecture fields describe a random teacher only).

    Returns:
        Teacher and student FLOPs.

    Examples:
        >>> from milan.models.factory import model_config
        >>> round(pretrain_flops(model_config("milan_vit_base_patch16")).total / 1e9, 1)
        86.8
    """
    enc, dec, tea = cfg.encoder, cfg.decoder, cfg.teacher
    grid = enc.img_size // enc.patch_size
    num_patches = grid**2
    keep = num_visible(num_patches, cfg.mask_ratio)
    patch_dim = 3 * enc.patch_size**2
    stem = 2.0 * num_patches * patch_dim * enc.embed_dim  # patch embedding of every patch (masking comes after)
    encoder = stem + enc.depth * block_flops(1 + keep, enc.embed_dim, enc.mlp_ratio)
    shape: TowerShape | None = None
    if teacher is not None:
        shape = teacher_shape(teacher)
    elif tea.kind != "none":
        t_grid = tea.img_size // tea.patch_size if tea.img_size is not None else grid  # null: follows the student
        shape = TowerShape(tea.width, tea.depth, tea.patch_size, t_grid, tea.out_dim)
    out_dim = patch_dim if shape is None else (shape.out_dim or shape.width)
    tokens = 1 + num_patches
    decoder = 2.0 * (1 + keep) * enc.embed_dim * dec.embed_dim + 2.0 * tokens * dec.embed_dim * out_dim
    if dec.kind == "prompting":
        decoder += dec.depth * prompt_block_flops(num_patches - keep, tokens, dec.embed_dim, dec.mlp_ratio)
    else:
        decoder += dec.depth * block_flops(tokens, dec.embed_dim, dec.mlp_ratio)
    teacher_total = teacher_flops(shape) if shape is not None else 0.0
    return PretrainFlops(teacher=teacher_total, student_forward=encoder + decoder, patch_embed=stem)


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
