"""Tiny models in the real libraries' own layouts, for the checkpoint tests (no downloads: random weights)."""

from __future__ import annotations

import warnings
from typing import Any

import pytest
import torch
import torch.nn as nn

IMG = 32  # the milan_test_tiny resolution: patch 8 -> 4 x 4 grid


@pytest.fixture
def images() -> torch.Tensor:
    return torch.randn(2, 3, IMG, IMG, generator=torch.Generator().manual_seed(7))


def randomize_(module: nn.Module, std: float = 0.05, seed: int = 0) -> nn.Module:
    """Adds noise to every float parameter and buffer except fixed sin-cos tables (zero biases, unit norms and BN
    statistics all become distinctive, so a key loaded into the wrong place or not at all changes the outputs)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in [*module.named_parameters(), *module.named_buffers()]:
            if not t.is_floating_point() or (name.endswith("pos_embed") and not t.requires_grad):
                continue
            if name.endswith("running_var"):
                t.copy_(torch.rand(t.shape, generator=g) + 0.5)
            else:
                t.add_(torch.randn(t.shape, generator=g) * std)
    return module


def open_clip_model(
    *, width: int = 128, layers: int = 2, patch: int = 8, image: int = IMG, quick_gelu: bool = True, **vision: Any
) -> nn.Module:
    """open_clip's own CLIP (OpenAI key names) at a tiny size."""
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    torch.manual_seed(1)
    vision_cfg = CLIPVisionCfg(layers=layers, width=width, patch_size=patch, image_size=image, **vision)
    text_cfg = CLIPTextCfg(context_length=8, vocab_size=64, width=64, heads=1, layers=1)
    model = CLIP(embed_dim=32, vision_cfg=vision_cfg, text_cfg=text_cfg, quick_gelu=quick_gelu)
    return model.eval()


def open_clip_reference(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What open_clip computes: per-token targets (ln_post on every token, then proj), the CLS embedding
    (``encode_image``) and the last block's head-averaged CLS->patch attention (``nn.MultiheadAttention`` weights).
    """
    v = model.visual
    with torch.no_grad():
        h = v._embeds(x)
        for blk in v.transformer.resblocks[:-1]:
            h = blk(h)
        last = v.transformer.resblocks[-1]
        normed = last.ln_1(h)
        _, weights = last.attn(normed, normed, normed, need_weights=True)  # (B, N, N), head-averaged
        h = last(h)
        tokens = v.ln_post(h) @ v.proj
        cls = model.encode_image(x)
    return tokens, cls, weights[:, 0, 1:]


@pytest.fixture(autouse=True)
def _quiet_warnings() -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield
