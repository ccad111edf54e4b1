"""The frozen teacher: a CLIP-style ViT image tower that gives MILAN its targets and its masking importance.

The tower is a timm ``VisionTransformer`` (:mod:`milan.models.tower`), so OpenAI / OpenCLIP weights load through
timm's own key conversion and any timm ViT can be brought as a teacher. Its ``norm`` (CLIP's ``ln_post``) and
``head`` (CLIP's ``proj``) are applied to every token.

The last block is run here explicitly so that the CLS query's attention row can be computed from that block's own
q and k (one query row, never the full L x L map), while every block keeps fused attention.
"""

from __future__ import annotations

from typing import Literal, NamedTuple, cast

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from timm.layers import QuickGELU
from timm.layers.attention import Attention
from timm.layers.mlp import Mlp
from timm.models.vision_transformer import Block
from timm.models.vision_transformer import VisionTransformer as TimmVisionTransformer
from torch.utils.hooks import RemovableHandle

TeacherInputNorm = Literal["imagenet", "clip"]


class TeacherOutput(NamedTuple):
    """What the teacher gives MILAN.

    Attributes:
        features: (B, 1 + L, D_out) per-token targets: cls then patches in spatial order (registers dropped).
        cls_attention: (B, L) last block's post-softmax attention of the CLS query over the patch keys,
            averaged over heads; not renormalised (the CLS->CLS entry is dropped).
    """

    features: torch.Tensor
    cls_attention: torch.Tensor


def _mlp(mlp: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A block's MLP in the teacher's inference pass.

    For timm's ``Mlp`` with ``QuickGELU`` (CLIP), ``h * sigmoid(1.702 h)`` is computed as ``silu(1.702 h) / 1.702``
    in place on the fc1 output (a fresh tensor owned here): the same function, but one vectorised SiLU pass and two
    cheap scalings instead of a slow sigmoid and two allocating passes (about 2.3x faster on CPUs, where QuickGELU
    otherwise costs half as much as the fc1 matmul). Other MLPs run as they are.
    """
    if type(mlp) is not Mlp or type(mlp.act) is not QuickGELU:
        return cast(torch.Tensor, mlp(x))
    h = F.silu(mlp.fc1(x).mul_(1.702), inplace=True).div_(1.702)  # (B, N, hidden)
    return cast(torch.Tensor, mlp.drop2(mlp.fc2(mlp.norm(mlp.drop1(h)))))


def _block(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A teacher block (inference): timm's ``Block`` with the fast MLP above, any other block as it is."""
    if type(block) is not Block:
        return cast(torch.Tensor, block(x))
    x = x + block.drop_path1(block.ls1(block.attn(block.norm1(x))))
    out: torch.Tensor = x + block.drop_path2(block.ls2(_mlp(block.mlp, block.norm2(x))))
    return out


def _block_with_cls_attention(block: Block, x: torch.Tensor, num_prefix: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Runs a pre-norm timm ``Block`` and also returns its CLS-query attention row over the patch keys.

    (B, N, C) tokens (token 0: the class token) -> (B, N, C) and the head-averaged (B, N - num_prefix) attention
    (cls and registers dropped).
    """
    attn = cast(Attention, block.attn)
    b, n, _ = x.shape
    h = block.norm1(x)
    qkv = attn.qkv(h).reshape(b, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)  # (B, H, N, hd) each
    q, k = attn.q_norm(q), attn.k_norm(k)
    out = F.scaled_dot_product_attention(q, k, v)  # fused path for the block output
    # Only the CLS query row: (B, H, 1, hd) @ (B, H, hd, N) -> (B, H, 1, N), softmax in fp32.
    logits = (q[:, :, :1].float() * attn.scale) @ k.float().transpose(-2, -1)
    cls_attention = logits.softmax(dim=-1).mean(dim=1)[:, 0, num_prefix:]  # (B, L)
    out = attn.proj(attn.norm(out.transpose(1, 2).reshape(b, n, -1)))
    x = x + block.drop_path1(block.ls1(out))
    x = x + block.drop_path2(block.ls2(_mlp(block.mlp, block.norm2(x))))
    return x, cls_attention


def check_teacher_tower(model: TimmVisionTransformer) -> None:
    """Raises unless ``model`` (built, or a meta skeleton) has a class token (ValueError) and a standard last block."""
    if model.cls_token is None:
        raise ValueError(
            "this tower has no class token (SigLIP-style); MILAN's attention masking needs the CLS query's "
            "attention, so it cannot be a teacher. Use a CLS-token model (CLIP, DINOv2, MAE/DeiT ViTs)."
        )
    last = model.blocks[-1]
    if not isinstance(last, Block) or type(last.attn) is not Attention or getattr(last.attn, "gate", None):
        raise TypeError(
            f"the teacher's last block is a {type(last).__name__}, not a timm Block with a standard Attention; "
            "MILAN computes the CLS attention from its qkv (EVA-style RoPE blocks are not supported)"
        )


class Teacher(nn.Module):
    """Frozen ViT teacher returning per-token targets and the CLS-to-patch attention.

    It is never trained: parameters have ``requires_grad=False``, the module stays in eval mode, the forward pass
    runs under ``torch.inference_mode`` and returns ordinary (cloned) tensors usable by autograd-tracked losses.
    Keep it out of the optimizer and out of DDP.

    Args:
        model: A timm ``VisionTransformer`` with a class token and a standard last block (see the module docstring).
        input_norm: ``"imagenet"`` feeds the student's ImageNet-normalised tensor as is (the references do this);
            ``"clip"`` re-normalises it with OpenAI CLIP's mean and std first.
    """

    in_scale: torch.Tensor
    in_shift: torch.Tensor

    def __init__(self, model: TimmVisionTransformer, input_norm: TeacherInputNorm = "imagenet") -> None:
        super().__init__()
        check_teacher_tower(model)
        if input_norm not in ("imagenet", "clip"):
            raise ValueError(f"teacher input_norm must be 'imagenet' or 'clip', got {input_norm!r}")
        self.model = model
        self.input_norm: TeacherInputNorm = input_norm
        self.num_prefix_tokens = int(model.num_prefix_tokens)
        head = model.head
        self.out_dim = head.out_features if isinstance(head, nn.Linear) else int(model.embed_dim)
        self.patch_size = int(model.patch_embed.patch_size[0])
        self.grid_size: tuple[int, int] = (int(model.patch_embed.grid_size[0]), int(model.patch_embed.grid_size[1]))
        # x_clip = (x * std_in + mean_in - mean_clip) / std_clip  =  x * scale + shift
        mean_in, std_in = torch.tensor(IMAGENET_DEFAULT_MEAN), torch.tensor(IMAGENET_DEFAULT_STD)
        mean_clip, std_clip = torch.tensor(OPENAI_CLIP_MEAN), torch.tensor(OPENAI_CLIP_STD)
        self.register_buffer("in_scale", (std_in / std_clip).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("in_shift", ((mean_in - mean_clip) / std_clip).view(1, 3, 1, 1), persistent=False)
        self.compute_dtype: torch.dtype | None = None  # None: the weights' dtype, under the caller's autocast
        self.source_format = "random"  # the format of the file its weights were read from (checkpoints record it)
        self._cast_hook: RemovableHandle | None = None
        self.requires_grad_(False)
        self.eval()

    def to_compute_dtype(self, dtype: torch.dtype) -> Teacher:
        """Casts the tower's weights to ``dtype`` once and runs it in that dtype with autocast off.

        A speed option for GPUs (e.g. ``torch.bfloat16``): no per-step weight casts, no fp32 LayerNorm round
        trips, half the weight traffic. The input is normalised in fp32, and resized in fp32 when the tower runs at
        another resolution than the images (CPU resampling kernels have no bf16 version), then cast as it enters
        the patch embedding; the CLS attention is still computed in fp32; the features come out in ``dtype`` (the
        loss normalises them in fp32). Casting back to fp32 later cannot restore the rounded weights: load the
        weights first, then call this. Returns ``self``.
        """
        if not dtype.is_floating_point:
            raise ValueError(f"teacher compute dtype must be floating point, got {dtype}")
        self.model.to(dtype)
        self.compute_dtype = dtype
        if self._cast_hook is not None:
            self._cast_hook.remove()
        # After the tower's own input hooks (e.g. the resize of a teacher run at another resolution), which run first.
        self._cast_hook = self.model.patch_embed.register_forward_pre_hook(
            lambda _, args: (args[0].to(dtype), *args[1:])
        )
        return self

    def train(self, mode: bool = True) -> Teacher:
        """Always stays in eval mode."""
        return super().train(False)

    def _forward(self, images: torch.Tensor) -> TeacherOutput:
        m = self.model
        x = m.norm_pre(m.patch_drop(m._pos_embed(m.patch_embed(images))))  # (B, P + L, C)
        for blk in m.blocks[:-1]:
            x = _block(blk, x)
        x, cls_attention = _block_with_cls_attention(cast(Block, m.blocks[-1]), x, self.num_prefix_tokens)
        x = m.head(m.norm(x))  # ln_post on every token, then proj: (B, P + L, D_out)
        if self.num_prefix_tokens > 1:  # drop register tokens, keep cls
            x = torch.cat([x[:, :1], x[:, self.num_prefix_tokens :]], dim=1)
        return TeacherOutput(x, cls_attention)

    def forward(self, images: torch.Tensor) -> TeacherOutput:
        """(B, 3, H, W) ImageNet-normalised images (the student's exact view) -> targets and importance."""
        with torch.inference_mode():
            if self.input_norm == "clip":
                images = images * self.in_scale + self.in_shift
            if self.compute_dtype is None:
                out = self._forward(images)
            else:
                with torch.autocast(images.device.type, enabled=False):
                    out = self._forward(images)  # cast to compute_dtype as it enters the patch embedding
        if torch.is_inference_mode_enabled():
            return out
        return TeacherOutput(out.features.clone(), out.cls_attention.clone())
