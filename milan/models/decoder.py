"""Decoders from the encoder's visible tokens to per-token predictions of the teacher's features.

Both decoders work in *mask order* (``[cls, visible..., masked...]``, the order of ``ids_shuffle``) instead of
restoring the spatial order before every block: attention is permutation-equivariant once the position
embedding has been added, so the result is the same while the per-block gathers disappear. They return mask order;
:func:`milan.masking.restore_order` gives the spatial order (tests/models/test_decoder.py holds the naive
spatial-order algorithms they are checked against).

Key names follow the original MILAN/MAE layout (``decoder_embed``, ``mask_token``, ``decoder_pos_embed``,
``decoder_blocks.N.{norm1,attn,norm2,mlp}``, ``decoder_norm``, ``decoder_pred``).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers.mlp import Mlp
from timm.models.vision_transformer import Block

from milan.masking import MaskIndices, gather_tokens
from milan.models.vit import mae_init_
from milan.pos_embed import PosEmbedLayout, sincos_2d


class PromptAttention(nn.Module):
    """Multi-head attention whose queries come only from the mask tokens."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"decoder width {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)  # rows [k; v]
        self.proj = nn.Linear(dim, dim)

    def forward(self, queries: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """(B, M, C) normalised mask tokens attend over (B, N, C) keys (raw prompts + normalised mask tokens)."""
        b, m, c = queries.shape
        n = keys.shape[1]
        q = self.q(queries).reshape(b, m, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, M, hd)
        kv = self.kv(keys).reshape(b, n, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        k, v = kv.unbind(0)  # (B, H, N, hd) each
        out = F.scaled_dot_product_attention(q, k, v)  # (B, H, M, hd)
        result: torch.Tensor = self.proj(out.transpose(1, 2).reshape(b, m, c))
        return result


class PromptBlock(nn.Module):
    """MILAN's prompting block: only the mask tokens are updated.

    ``h = norm1(mask)``; queries from ``h``; keys/values over ``[prompts (raw, never normalised), h]``;
    then the usual residual MLP on the mask tokens. The prompts (cls + visible tokens) pass through unchanged.
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = PromptAttention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=nn.GELU)

    def forward(self, mask_tokens: torch.Tensor, prompts: torch.Tensor) -> torch.Tensor:
        """(B, M, C) mask tokens, (B, P, C) fixed prompts (cls + visible tokens) -> (B, M, C) updated mask tokens."""
        h = self.norm1(mask_tokens)
        x: torch.Tensor = mask_tokens + self.attn(h, torch.cat([prompts, h], dim=1))
        out: torch.Tensor = x + self.mlp(self.norm2(x))
        return out


class _Decoder(nn.Module):
    """Shared parts: embedding, mask token, fixed position table, the blocks, final norm and prediction head.

    Args:
        out_dim: Prediction width (teacher width, or ``patch_size**2 * 3`` for pixels).
        pos_embed_layout: Sin-cos layout (see ``milan.pos_embed``).
    """

    block: Callable[..., nn.Module]  # the subclass's block, built as block(dim, num_heads, mlp_ratio)

    def __init__(
        self,
        grid_size: tuple[int, int],
        in_dim: int,
        out_dim: int,
        embed_dim: int = 512,
        depth: int = 8,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        pos_embed_layout: PosEmbedLayout = "mmpretrain",
    ) -> None:
        super().__init__()
        self.embed_dim = embed_dim
        self.out_dim = out_dim
        self.decoder_embed = nn.Linear(in_dim, embed_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.decoder_pos_embed = nn.Parameter(
            sincos_2d(grid_size, embed_dim, layout=pos_embed_layout), requires_grad=False
        )  # (1, 1 + L, C)
        self.decoder_blocks = nn.ModuleList(self.block(embed_dim, num_heads, mlp_ratio) for _ in range(depth))
        self.decoder_norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.decoder_pred = nn.Linear(embed_dim, out_dim)
        self.init_weights()

    def init_weights(self) -> None:
        """MAE initialisation: N(0, 0.02) mask token, Xavier-uniform Linears, unit LayerNorms."""
        nn.init.normal_(self.mask_token, std=0.02)
        mae_init_(self)

    def _embed(self, latent: torch.Tensor, mask: MaskIndices) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns prompts (B, 1 + K, C) and mask tokens (B, M, C), both with their positions added."""
        z = self.decoder_embed(latent)  # (B, 1 + K, C)
        pos = self.decoder_pos_embed.expand(z.shape[0], -1, -1)
        pos_keep = gather_tokens(pos[:, 1:], mask.ids_keep)  # (B, K, C)
        pos_mask = gather_tokens(pos[:, 1:], mask.ids_mask)  # (B, M, C)
        prompts = torch.cat([z[:, :1] + pos[:, :1], z[:, 1:] + pos_keep], dim=1)
        return prompts, self.mask_token + pos_mask

    def _predict(self, tokens: torch.Tensor) -> torch.Tensor:
        pred: torch.Tensor = self.decoder_pred(self.decoder_norm(tokens))  # (B, 1 + L, out_dim)
        return pred


class PromptingDecoder(_Decoder):
    """MILAN's prompting decoder (default 512 wide, 8 blocks, 16 heads); arguments as in :class:`_Decoder`."""

    block = PromptBlock

    def forward(self, latent: torch.Tensor, mask: MaskIndices) -> torch.Tensor:
        """Predicts the teacher features of every token.

        Args:
            latent: (B, 1 + K, E) encoder output (cls + visible, in ``mask.ids_keep`` order).
            mask: The mask indices used by the encoder.

        Returns:
            (B, 1 + L, out_dim) predictions in mask order ``[cls, visible, masked]``. The cls and visible rows are
            the prompts, unchanged by the blocks, passed through ``decoder_norm`` and ``decoder_pred``.
        """
        prompts, tokens = self._embed(latent, mask)
        for blk in self.decoder_blocks:
            tokens = blk(tokens, prompts)
        return self._predict(torch.cat([prompts, tokens], dim=1))


class MAEDecoder(_Decoder):
    """The standard MAE decoder (full self-attention over all tokens), for ablations.

    Arguments as in :class:`_Decoder`.
    """

    block = staticmethod(partial(Block, qkv_bias=True, norm_layer=partial(nn.LayerNorm, eps=1e-6)))  # type: ignore[arg-type]

    def forward(self, latent: torch.Tensor, mask: MaskIndices) -> torch.Tensor:
        """Predicts every token with full self-attention (same contract as :class:`PromptingDecoder`)."""
        prompts, tokens = self._embed(latent, mask)
        x = torch.cat([prompts, tokens], dim=1)  # (B, 1 + L, C) in mask order
        for blk in self.decoder_blocks:
            x = blk(x)
        return self._predict(x)
