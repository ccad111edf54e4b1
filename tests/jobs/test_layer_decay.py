"""Layer-wise lr decay groups against the reference exponents, computed by hand."""

import pytest
import torch

from milan.models.classifier import FinetuneClassifier
from milan.models.vit import VisionTransformer
from milan.train.layer_decay import layer_id, param_groups_layer_decay


def _scales(groups):
    return {n: (g["lr_scale"], g["weight_decay"]) for g in groups for n in g["param_names"]}


def test_vit_base_exponents_by_hand():
    # ViT-B/16: 12 blocks, decay 0.65 -> patch embed 0.65**13, block i 0.65**(12 - i), head 1.0.
    names = ["encoder.cls_token", "encoder.pos_embed", "encoder.patch_embed.proj.weight"]
    names += [f"encoder.blocks.{i}.attn.qkv.weight" for i in range(12)] + ["fc_norm.weight", "head.weight"]
    expected = [13, 13, 13] + [12 - i for i in range(12)] + [0, 0]
    for name, exp in zip(names, expected, strict=True):
        assert 0.65 ** (13 - layer_id(name, num_layers=13)) == pytest.approx(0.65**exp), name
    # no prefix works too (a bare encoder)
    assert layer_id("blocks.3.mlp.fc1.bias", 13) == 4
    assert layer_id("patch_embed.proj.bias", 13) == 0


def test_groups_on_finetune_classifier():
    enc = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=3, num_heads=2)
    model = FinetuneClassifier(enc, num_classes=5)
    groups = param_groups_layer_decay(model, weight_decay=0.05, layer_decay=0.75)
    got = _scales(groups)
    n_trainable = sum(1 for p in model.parameters() if p.requires_grad)
    assert len(got) == n_trainable  # every trainable parameter, once
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
    # one group per (layer, decay) pair, ordered by layer
    assert [g["layer_id"] for g in groups] == sorted(g["layer_id"] for g in groups)
    assert len(groups) == 2 * 5  # layers 0..4, each with decayed and exempt params
    # usable by a torch optimizer as is
    torch.optim.AdamW(groups, lr=1e-3)


def test_frozen_params_are_left_out():
    enc = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2)
    model = FinetuneClassifier(enc, num_classes=3)
    model.encoder.patch_embed.requires_grad_(False)
    names = {n for g in param_groups_layer_decay(model, weight_decay=0.1, layer_decay=0.5) for n in g["param_names"]}
    assert not any("patch_embed" in n for n in names)
    assert "head.weight" in names


def test_matches_timm_param_groups_layer_decay():
    # timm's implementation of the same BEiT/MAE scheme, on a timm ViT with the same key names as ours.
    timm = pytest.importorskip("timm")
    from timm.optim._param_groups import param_groups_layer_decay as timm_groups

    m = timm.create_model("vit_tiny_patch16_224", depth=4, num_classes=7, global_pool="avg", img_size=32, patch_size=8)
    ref = timm_groups(m, weight_decay=0.05, layer_decay=0.65, no_weight_decay_list=m.no_weight_decay())
    by_id = {id(p): (g["lr_scale"], g["weight_decay"]) for g in ref for p in g["params"]}
    ours = param_groups_layer_decay(m, weight_decay=0.05, layer_decay=0.65)
    for g in ours:
        for p, name in zip(g["params"], g["param_names"], strict=True):
            assert by_id[id(p)] == (pytest.approx(g["lr_scale"]), g["weight_decay"]), name
    assert sum(len(g["params"]) for g in ours) == len(by_id)
