"""The teacher against a naive OpenAI-CLIP forward built on nn.MultiheadAttention(need_weights=True)."""

from __future__ import annotations

import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.data.constants import IMAGENET_DEFAULT_MEAN as IMAGENET_MEAN
from timm.data.constants import IMAGENET_DEFAULT_STD as IMAGENET_STD
from timm.data.constants import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

from milan.models import Teacher, clip_vision_tower


def _tiny_tower() -> nn.Module:
    return clip_vision_tower(img_size=32, patch_size=8, width=64, depth=3, num_heads=4, out_dim=24)


def naive_clip_forward(tower: nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """OpenAI CLIP's visual forward written plainly, with torch's MultiheadAttention returning weights."""
    x = F.conv2d(images, tower.patch_embed.proj.weight, stride=tower.patch_embed.proj.stride)  # no bias
    x = x.flatten(2).transpose(1, 2)
    cls = tower.cls_token.expand(x.shape[0], -1, -1)
    x = torch.cat([cls, x], dim=1) + tower.pos_embed
    x = F.layer_norm(x, (x.shape[-1],), tower.norm_pre.weight, tower.norm_pre.bias, eps=1e-5)
    attention = None
    for blk in tower.blocks:
        width = x.shape[-1]
        mha = nn.MultiheadAttention(width, blk.attn.num_heads, batch_first=True)
        mha.in_proj_weight.data.copy_(blk.attn.qkv.weight)
        mha.in_proj_bias.data.copy_(blk.attn.qkv.bias)
        mha.out_proj.weight.data.copy_(blk.attn.proj.weight)
        mha.out_proj.bias.data.copy_(blk.attn.proj.bias)
        h = F.layer_norm(x, (width,), blk.norm1.weight, blk.norm1.bias, eps=1e-5)
        out, attention = mha(h, h, h, need_weights=True, average_attn_weights=True)
        x = x + out
        h = F.layer_norm(x, (width,), blk.norm2.weight, blk.norm2.bias, eps=1e-5)
        h = F.linear(h, blk.mlp.fc1.weight, blk.mlp.fc1.bias)
        h = h * torch.sigmoid(1.702 * h)  # QuickGELU
        x = x + F.linear(h, blk.mlp.fc2.weight, blk.mlp.fc2.bias)
    x = F.layer_norm(x, (x.shape[-1],), tower.norm.weight, tower.norm.bias, eps=1e-5)  # ln_post, every token
    features = x @ tower.head.weight.t()  # proj (no bias)
    assert attention is not None
    return features, attention[:, 0, 1:]


def test_features_and_cls_attention_match_naive_multihead_attention() -> None:
    tower = _tiny_tower()
    with torch.no_grad():
        for p in tower.parameters():  # non-trivial LN/bias values
            p.add_(0.05 * torch.randn_like(p))
        tower.head.bias.zero_()
    teacher = Teacher(tower)
    images = torch.randn(3, 3, 32, 32)
    out = teacher(images)
    with torch.no_grad():
        features, importance = naive_clip_forward(tower, images)
    assert out.features.shape == (3, 17, 24) and out.cls_attention.shape == (3, 16)
    torch.testing.assert_close(out.features, features, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(out.cls_attention, importance, atol=1e-6, rtol=1e-5)
    # Not renormalised: the CLS->CLS entry is dropped, so rows sum to less than one.
    assert torch.all(out.cls_attention.sum(-1) < 1.0)


def test_clip_input_norm_renormalises_the_imagenet_tensor() -> None:
    tower = _tiny_tower()
    pixels = torch.rand(2, 3, 32, 32)
    imagenet = (pixels - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    clip = (pixels - torch.tensor(OPENAI_CLIP_MEAN).view(1, 3, 1, 1)) / torch.tensor(OPENAI_CLIP_STD).view(1, 3, 1, 1)
    with_clip_norm = Teacher(tower, input_norm="clip")(imagenet)
    reference = Teacher(tower, input_norm="imagenet")(clip)
    torch.testing.assert_close(with_clip_norm.features, reference.features, atol=1e-5, rtol=1e-5)
    plain = Teacher(tower, input_norm="imagenet")(imagenet)
    assert not torch.allclose(plain.features, reference.features, atol=1e-3)


def test_teacher_is_frozen_and_outputs_work_with_autograd() -> None:
    teacher = Teacher(_tiny_tower())
    assert all(not p.requires_grad for p in teacher.parameters())
    teacher.train()
    assert not teacher.training and not teacher.model.training
    out = teacher(torch.randn(2, 3, 32, 32))
    assert not out.features.is_inference() and not out.features.requires_grad
    pred = torch.randn_like(out.features, requires_grad=True)
    (pred * out.features).sum().backward()  # an inference tensor here would raise
    torch.testing.assert_close(pred.grad, out.features)


def test_register_tokens_are_dropped_and_attention_covers_patches_only() -> None:
    tower = timm.models.vision_transformer.VisionTransformer(
        img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4, reg_tokens=3, num_classes=0, init_values=1e-2
    )
    out = Teacher(tower)(torch.randn(2, 3, 32, 32))
    assert out.features.shape == (2, 17, 64)  # cls + 16 patches; registers dropped
    assert out.cls_attention.shape == (2, 16)


def test_teacher_without_class_token_is_rejected() -> None:
    tower = timm.models.vision_transformer.VisionTransformer(
        img_size=32, patch_size=8, embed_dim=64, depth=1, num_heads=4, class_token=False, global_pool="avg"
    )
    with pytest.raises(ValueError, match="class token"):
        Teacher(tower)


def test_unknown_input_norm_is_rejected() -> None:
    with pytest.raises(ValueError, match="input_norm"):
        Teacher(_tiny_tower(), input_norm="openai")  # type: ignore[arg-type]
