"""The teacher's QuickGELU computed as silu(1.702 x) / 1.702 against timm's own forward (the straightforward path)."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from timm.layers.mlp import Mlp
from timm.models.vision_transformer import VisionTransformer as TimmViT

from milan.models.teacher import Teacher, _mlp
from milan.models.tower import clip_vision_tower


def _plain_features(tower: TimmViT, images: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return tower.head(tower.forward_features(images))  # timm's blocks, QuickGELU as x * sigmoid(1.702 x)


def test_fast_quick_gelu_mlp_matches_timm() -> None:
    tower = clip_vision_tower(img_size=32, patch_size=8, width=128, depth=1, out_dim=32)
    mlp = tower.blocks[0].mlp
    x = torch.randn(3, 17, 128) * 3
    with torch.inference_mode():
        expected, got = mlp(x), _mlp(mlp, x)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


# The second case has ViT-B/16's token count and depth (the error accumulates over the blocks) at a quarter of its
# width; tests/parity runs the full ViT-B/16 teacher against mmpretrain's CLIP.
@pytest.mark.parametrize(("size", "patch", "width", "depth"), [(32, 8, 128, 2), (224, 16, 192, 12)])
def test_clip_teacher_features_match_timm_forward(size: int, patch: int, width: int, depth: int) -> None:
    torch.manual_seed(0)
    tower = clip_vision_tower(img_size=size, patch_size=patch, width=width, depth=depth, out_dim=64)
    teacher = Teacher(tower)
    images = torch.randn(1 if size > 32 else 3, 3, size, size)
    expected = _plain_features(tower, images)
    got = teacher(images).features
    assert ((got - expected).norm() / expected.norm()).item() < 1e-6
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_other_activations_run_unchanged() -> None:
    """A GELU teacher (e.g. a timm ImageNet ViT) takes timm's own MLP: bit-identical features."""
    torch.manual_seed(0)
    tower = TimmViT(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2, num_classes=16, act_layer=nn.GELU)
    assert isinstance(tower.blocks[0].mlp, Mlp)
    images = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(Teacher(tower)(images).features, _plain_features(tower, images), rtol=0, atol=0)
