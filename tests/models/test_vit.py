"""The student encoder: timm key compatibility, masked forward, fixed position table."""

from __future__ import annotations

import timm
import torch

from milan.models.vit import VIT_ARCHS, VisionTransformer
from milan.pos_embed import sincos_2d


def test_vit_base_weights_load_strictly_into_timm() -> None:
    ours = VisionTransformer(**dict(zip(("embed_dim", "depth", "num_heads"), VIT_ARCHS["base"], strict=True)))
    ref = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0)
    result = ref.load_state_dict(ours.state_dict(), strict=True)
    assert not result.missing_keys and not result.unexpected_keys


def test_features_identical_to_timm() -> None:
    dim, _, heads = VIT_ARCHS["tiny"]
    ours = VisionTransformer(embed_dim=dim, depth=4, num_heads=heads).eval()
    ref = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, depth=4).eval()
    ref.load_state_dict(ours.state_dict(), strict=True)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(ours.forward_features(x), ref.forward_features(x), atol=1e-5, rtol=1e-5)


def test_masked_forward_with_every_patch_equals_full_forward_and_permutes_tokens() -> None:
    enc = VisionTransformer(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        full = enc.forward_features(x)
        ids = torch.arange(16).expand(2, -1)
        torch.testing.assert_close(enc.forward_masked(x, ids), full, atol=1e-5, rtol=1e-5)
        perm = torch.stack([torch.randperm(16), torch.randperm(16)])
        permuted = enc.forward_masked(x, perm)
        torch.testing.assert_close(permuted[:, 1:], torch.gather(full[:, 1:], 1, perm[..., None].expand(-1, -1, 64)))
        keep = perm[:, :4]
        assert enc.forward_masked(x, keep).shape == (2, 5, 64)


def test_position_embedding_is_fixed_sincos_and_init_is_mae_style() -> None:
    enc = VisionTransformer(img_size=64, patch_size=16, embed_dim=32, depth=1, num_heads=2, pos_embed_layout="mae")
    assert not enc.pos_embed.requires_grad
    torch.testing.assert_close(enc.pos_embed.data, sincos_2d((4, 4), 32, layout="mae"))
    trainable = {n for n, p in enc.named_parameters() if p.requires_grad}
    assert "pos_embed" not in trainable and "cls_token" in trainable
    assert enc.norm.eps == 1e-6
    assert torch.all(enc.blocks[0].attn.qkv.bias == 0)
    assert 0.01 < enc.cls_token.std().item() < 0.03


def test_grad_checkpointing_gives_same_gradients() -> None:
    enc = VisionTransformer(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4)
    x = torch.randn(2, 3, 32, 32)
    enc.forward_features(x).sum().backward()
    grads = [p.grad.clone() for p in enc.parameters() if p.grad is not None]
    enc.zero_grad()
    enc.set_grad_checkpointing(True)
    enc.forward_features(x).sum().backward()
    for g, p in zip(grads, [p for p in enc.parameters() if p.grad is not None], strict=True):
        torch.testing.assert_close(p.grad, g)
