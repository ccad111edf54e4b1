"""Classifiers on a MILAN encoder: the linear probe and the fine-tuning model.

State-dict layouts (what ``milan evaluate`` and the checkpoint converters map into):

* :class:`LinearProbe`: ``encoder.*`` (our ViT keys, incl. the final ``norm``), ``head.bn.{running_mean,
  running_var,num_batches_tracked}`` (BatchNorm without affine), ``head.fc.{weight,bias}``.
* :class:`FinetuneClassifier`: ``encoder.*`` without ``norm`` (the pretrained final norm is dropped, as in MAE),
  ``fc_norm.*`` (a new LayerNorm after average pooling) and ``head.{weight,bias}``. Without the ``encoder.``
  prefix this is timm's ``vit_*`` layout with ``global_pool='avg'``.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Literal

import torch
import torch.nn as nn
from timm.layers.weight_init import trunc_normal_

from milan.models.vit import VisionTransformer


class LinearProbe(nn.Module):
    """MAE/MILAN linear probe: CLS token after the final LayerNorm -> BatchNorm1d(affine=False) -> Linear.

    The encoder is frozen (``requires_grad=False``); only ``head`` trains.
    """

    def __init__(self, encoder: VisionTransformer, num_classes: int) -> None:
        super().__init__()
        dim = encoder.embed_dim
        self.encoder = encoder.requires_grad_(False)
        fc = nn.Linear(dim, num_classes)
        trunc_normal_(fc.weight, std=0.01)
        nn.init.zeros_(fc.bias)
        self.head = nn.Sequential(OrderedDict(bn=nn.BatchNorm1d(dim, affine=False, eps=1e-6), fc=fc))

    def train(self, mode: bool = True) -> LinearProbe:
        """The frozen encoder always stays in eval mode; the head follows ``mode``."""
        super().train(mode)
        self.encoder.eval()
        return self

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, num_classes) logits."""
        with torch.no_grad():
            feats = self.encoder.forward_features(images)[:, 0]  # (B, D) CLS token after the final LayerNorm
        logits: torch.Tensor = self.head(feats)
        return logits


class FinetuneClassifier(nn.Module):
    """MAE/MILAN fine-tuning model: mean of the patch tokens -> new LayerNorm -> Linear (init std 0.02).

    Args:
        encoder: Pretrained encoder (build it with the fine-tuning drop-path rate). Its final ``norm`` is replaced
            by an identity, and its position embedding becomes trainable, as in the references.
        global_pool: ``"avg"`` pools the patch tokens (the recipe); ``"token"`` uses the CLS token.
    """

    def __init__(
        self, encoder: VisionTransformer, num_classes: int, global_pool: Literal["avg", "token"] = "avg"
    ) -> None:
        super().__init__()
        dim = encoder.embed_dim
        encoder.norm = nn.Identity()
        encoder.pos_embed.requires_grad_(True)
        self.encoder = encoder
        self.global_pool = global_pool
        self.fc_norm = nn.LayerNorm(dim, eps=1e-6)
        self.head = nn.Linear(dim, num_classes)
        trunc_normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, D) pooled, normalised features."""
        tokens = self.encoder.forward_features(images)  # (B, 1 + L, D), no final norm
        pooled = tokens[:, 1:].mean(dim=1) if self.global_pool == "avg" else tokens[:, 0]
        out: torch.Tensor = self.fc_norm(pooled)
        return out

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, num_classes) logits."""
        logits: torch.Tensor = self.head(self.forward_features(images))
        return logits
