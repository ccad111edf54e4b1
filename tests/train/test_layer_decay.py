"""Layer-wise lr decay groups (timm's, with our weight-decay rule) against the reference exponents, by hand."""

import pytest
import torch

from milan.models.classifier import FinetuneClassifier
from milan.models.vit import VisionTransformer
from milan.train.optim import layer_decay_groups


def _scales(model, groups):
    names = {id(p): n for n, p in model.named_parameters()}
    return {names[id(p)]: (g["lr_scale"], g["weight_decay"]) for g in groups for p in g["params"]}


def test_vit_base_exponents_by_hand():
    # ViT-B/16's 12 blocks, decay 0.65: patch embed 0.65**13, block i 0.65**(12 - i), head 1.0 (MAE util/lr_decay.py)
    model = FinetuneClassifier(VisionTransformer(img_size=16, patch_size=8, embed_dim=8, depth=12, num_heads=1), 3)
    got = _scales(model, layer_decay_groups(model, weight_decay=0.05, layer_decay=0.65))
    expected = {"encoder.cls_token": 13, "encoder.pos_embed": 13, "encoder.patch_embed.proj.weight": 13}
    expected |= {f"encoder.blocks.{i}.attn.qkv.weight": 12 - i for i in range(12)} | {"head.weight": 0}
    for name, exponent in expected.items():
        assert got[name][0] == pytest.approx(0.65**exponent), name


def test_groups_on_finetune_classifier():
    enc = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=3, num_heads=2)
    model = FinetuneClassifier(enc, num_classes=5)
    groups = layer_decay_groups(model, weight_decay=0.05, layer_decay=0.75)
    got = _scales(model, groups)
    assert len(got) == sum(1 for p in model.parameters() if p.requires_grad)  # every trainable parameter, once
    d = 0.75
    assert got["encoder.patch_embed.proj.weight"] == (pytest.approx(d**4), 0.05)
    assert got["encoder.patch_embed.proj.bias"] == (pytest.approx(d**4), 0.0)
    assert got["encoder.cls_token"] == (pytest.approx(d**4), 0.0)
    assert got["encoder.pos_embed"] == (pytest.approx(d**4), 0.0)  # learnable during fine-tuning, no wd
    assert got["encoder.blocks.0.attn.qkv.weight"] == (pytest.approx(d**3), 0.05)
    assert got["encoder.blocks.0.norm1.weight"] == (pytest.approx(d**3), 0.0)
    assert got["encoder.blocks.2.mlp.fc2.weight"] == (pytest.approx(d**1), 0.05)
    assert got["encoder.blocks.2.mlp.fc2.bias"] == (pytest.approx(d**1), 0.0)
    assert got["fc_norm.weight"] == (1.0, 0.0)
    assert got["head.weight"] == (1.0, 0.05)
    assert got["head.bias"] == (1.0, 0.0)
    assert len(groups) == 2 * 5  # layers 0..4, each with decayed and exempt params
    torch.optim.AdamW(groups, lr=1e-3)  # usable by a torch optimizer as is


def test_the_token_exemption_is_the_configs():
    """optim.wd_exempt_tokens=false decays the tokens in fine-tuning too (before: the key was ignored there)."""
    model = FinetuneClassifier(VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2), 3)
    got = _scales(model, layer_decay_groups(model, weight_decay=0.05, layer_decay=0.5, exempt_tokens=False))
    assert got["encoder.cls_token"][1] == got["encoder.pos_embed"][1] == 0.05
    assert got["encoder.blocks.0.norm1.weight"][1] == got["head.bias"][1] == 0.0  # 1-D: never decayed


def test_frozen_params_are_left_out():
    enc = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2)
    model = FinetuneClassifier(enc, num_classes=3)
    model.encoder.patch_embed.requires_grad_(False)
    names = set(_scales(model, layer_decay_groups(model, weight_decay=0.1, layer_decay=0.5)))
    assert not any("patch_embed" in n for n in names)
    assert "head.weight" in names
