"""Fixed 2-D sin-cos position embeddings (with an all-zero class-token row).

Two layouts exist in the MILAN lineage; they are the same table with the patch grid transposed.
With ``w_d = 10000 ** (-d / (D / 4))`` for ``d = 0 .. D/4 - 1`` and a patch at grid row ``i``, column ``j``
(token index ``i * grid_w + j``):

* ``"mmpretrain"`` (OpenMMLab MMSelfSup / mmpretrain): ``[sin(i w), cos(i w), sin(j w), cos(j w)]``.
* ``"mae"`` (facebookresearch/mae and the original MILAN code): ``[sin(j w), cos(j w), sin(i w), cos(i w)]``.

Either trains equally well from scratch; a checkpoint must keep the table stored with it.
"""

from __future__ import annotations

from typing import Literal

import torch
from timm.layers.pos_embed_sincos import build_sincos2d_pos_embed

PosEmbedLayout = Literal["mmpretrain", "mae"]


def sincos_2d(grid_size: tuple[int, int], dim: int, *, layout: PosEmbedLayout = "mmpretrain") -> torch.Tensor:
    """Builds the fixed 2-D sin-cos table, the class token's all-zero row first.

    Args:
        grid_size: Patch grid as (rows, columns).
        dim: Embedding width; must be divisible by 4.
        layout: Which coordinate fills the first half of the channels (see the module docstring).

    Returns:
        Tensor of shape (1, 1 + rows * columns, dim), float32.
    """
    if dim % 4:
        raise ValueError(f"sin-cos position embedding needs dim % 4 == 0, got dim={dim}")
    if layout not in ("mmpretrain", "mae"):
        raise ValueError(f"unknown pos-embed layout {layout!r}; expected 'mmpretrain' or 'mae'")
    # timm stacks the coordinates (row, col); with interleave_sin_cos each contributes [sin, cos] blocks: the
    # mmpretrain layout. The token order stays row-major in both layouts, so only the channel halves swap.
    table = build_sincos2d_pos_embed(
        list(grid_size), dim=dim, interleave_sin_cos=True, reverse_coord=False
    )  # (rows * cols, dim) = [sin(i w), cos(i w), sin(j w), cos(j w)]
    if layout == "mae":
        half = dim // 2
        table = torch.cat([table[:, half:], table[:, :half]], dim=1)
    return torch.cat([torch.zeros(1, dim), table], dim=0).unsqueeze(0)
