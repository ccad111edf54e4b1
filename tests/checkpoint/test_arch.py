"""Architectures inferred from weights build the same modules as the model factory, and towers describe themselves."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from milan.checkpoint.spec import infer_encoder
from milan.models import model_config
from milan.models.factory import build_encoder
from milan.models.tower import TowerSpec, describe_tower


@pytest.mark.parametrize("layout", ["mmpretrain", "mae"])
def test_encoder_arch_builds_what_its_config_builds(images: torch.Tensor, layout: str) -> None:
    cfg = model_config("milan_test_tiny")
    encoder = build_encoder(dataclasses.replace(cfg.encoder, pos_embed_layout=layout)).eval()
    arch = infer_encoder(encoder.state_dict(), num_heads=4)
    assert arch.to_config() == dataclasses.replace(cfg.encoder, pos_embed_layout=layout)
    for drop_path in (0.0, 0.2):
        ours, factory = arch.build(drop_path_rate=drop_path), build_encoder(arch.to_config(drop_path_rate=drop_path))
        assert [repr(m) for m in ours.modules()] == [repr(m) for m in factory.modules()]  # incl. the drop-path rates
        for module in (ours, factory):
            module.load_state_dict(encoder.state_dict())
            torch.testing.assert_close(module.eval().forward_features(images), encoder.forward_features(images))
    assert "drop_prob=0.200" in repr(arch.build(drop_path_rate=0.2).blocks[-1])


@pytest.mark.parametrize(
    "spec",
    [
        TowerSpec(32, 8, 64, 2, 4, out_dim=16, act="quick_gelu", norm_eps=1e-5, pre_norm=True),  # CLIP-shaped
        TowerSpec(16, 8, 64, 1, 2, act="gelu_tanh", reg_tokens=2, layer_scale=True, qk_norm=True, resize_input=True),
        TowerSpec(32, 16, 64, 12, 1, out_dim=10, timm_name="test_vit"),  # timm's own tiny ViT, built by name
    ],
    ids=["clip", "registers-resized", "timm-name"],
)
def test_describe_tower_gives_the_spec_back(spec: TowerSpec, images: torch.Tensor) -> None:
    tower = spec.build().eval()
    described = describe_tower(tower)
    if spec.timm_name is None:
        assert described == spec
    else:  # built by timm: the name, plus what timm's model is
        assert (described.timm_name, described.out_dim, described.img_size) == ("test_vit", 10, 32)
    rebuilt = TowerSpec.from_dict(described.to_dict()).build().eval()
    rebuilt.load_state_dict(tower.state_dict())
    torch.testing.assert_close(rebuilt.forward_features(images), tower.forward_features(images))  # resized if needed
    assert describe_tower(rebuilt) == described
