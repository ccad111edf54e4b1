"""The student encoder: timm's Vision Transformer with a fixed sin-cos position table and an MAE-style masked forward.

Its state dict (``cls_token``, ``pos_embed``, ``patch_embed.proj.*``, ``blocks.N.{norm1,attn.qkv,attn.proj,
norm2,mlp.fc1,mlp.fc2}.*``, ``norm.*``) loads strictly into ``timm.create_model('vit_base_patch16_224',
num_classes=0)`` for the ViT-B/16 variant, so exported backbones need no key mapping.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn as nn
from timm.models import checkpoint_seq
from timm.models.vision_transformer import VisionTransformer as TimmVisionTransformer

from milan.masking import gather_tokens
from milan.pos_embed import PosEmbedLayout, sincos_2d

# Standard sizes: (embed_dim, depth, num_heads).
VIT_ARCHS: dict[str, tuple[int, int, int]] = {
    "tiny": (192, 12, 3),
    "small": (384, 12, 6),
    "base": (768, 12, 12),
    "large": (1024, 24, 16),
    "huge": (1280, 32, 16),
}


def mae_init_(module: nn.Module) -> None:
    """MAE initialisation, in place: Xavier-uniform Linears with zero biases, unit LayerNorms."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class VisionTransformer(TimmVisionTransformer):
    """timm's ViT encoder (no head) with a fixed 2-D sin-cos position embedding, MAE's init and a masked forward.

    Args:
        drop_path_rate: Stochastic depth, linearly increasing over depth (0 for pretraining).
        pos_embed_layout: Channel layout of the sin-cos table (see ``milan.pos_embed``).
        norm_eps: LayerNorm epsilon (1e-6 in MAE/MILAN).
    """

    cls_token: nn.Parameter
    pos_embed: nn.Parameter

    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_path_rate: float = 0.0,
        pos_embed_layout: PosEmbedLayout = "mmpretrain",
        norm_eps: float = 1e-6,
    ) -> None:
        super().__init__(
            img_size, patch_size, in_chans, num_classes=0, embed_dim=embed_dim, depth=depth, num_heads=num_heads,
            mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, drop_path_rate=drop_path_rate, pos_embed="none",
            norm_layer=partial(nn.LayerNorm, eps=norm_eps), weight_init="skip",
        )  # fmt: skip
        self.num_heads = num_heads
        self.patch_size = patch_size
        gh, gw = self.patch_embed.grid_size
        self.grid_size: tuple[int, int] = (int(gh), int(gw))
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        # Fixed during pretraining (requires_grad=False); fine-tuning may unfreeze it.
        self.pos_embed = nn.Parameter(
            sincos_2d(self.grid_size, embed_dim, layout=pos_embed_layout), requires_grad=False
        )  # (1, 1 + L, D)
        self.init_weights()

    def init_weights(self, mode: str = "", needs_reset: bool = True) -> None:
        """MAE initialisation: Xavier-uniform Linears (and patch projection viewed as a Linear), N(0, 0.02) cls."""
        w = self.patch_embed.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.normal_(self.cls_token, std=0.02)
        mae_init_(self.blocks)
        mae_init_(self.norm)

    def forward_masked(self, images: torch.Tensor, ids_keep: torch.Tensor) -> torch.Tensor:
        """Encodes only the visible patches.

        Args:
            images: (B, C, H, W) normalised images.
            ids_keep: (B, K) indices of the visible patches, in the order the tokens should appear.

        Returns:
            (B, 1 + K, D) the cls token then the visible tokens, after the final LayerNorm.
        """
        x = self.patch_embed(images) + self.pos_embed[:, 1:]  # (B, L, D): positions added before masking
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(x.shape[0], -1, -1)  # pos[0] is zero
        x = torch.cat([cls, gather_tokens(x, ids_keep)], dim=1)  # (B, 1 + K, D)
        x = checkpoint_seq(self.blocks, x) if self.grad_checkpointing and torch.is_grad_enabled() else self.blocks(x)
        out: torch.Tensor = self.norm(x)
        return out

    def forward(self, images: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        """Every patch (evaluation): (B, C, H, W) normalised images -> (B, 1 + L, D) after the final norm."""
        return self.forward_features(images)
