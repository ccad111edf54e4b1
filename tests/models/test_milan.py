"""The whole MILAN model: one training step, loss options, ablation variants, factory errors."""

from __future__ import annotations

import pytest
import torch

from milan.losses import cosine_distance, cosine_loss
from milan.masking import MaskIndices, attention_masking, from_permutation, random_masking, restore_order
from milan.models import MILAN, build_milan, create_model, list_models, model_config
from milan.models.milan import patchify


def _images(batch: int = 4) -> torch.Tensor:
    return torch.randn(batch, 3, 32, 32)


def test_one_step_gives_every_trainable_parameter_a_finite_gradient_and_leaves_the_teacher_untouched() -> None:
    model = create_model("milan_test_tiny")
    assert model.teacher is not None
    teacher_before = {k: v.clone() for k, v in model.teacher.state_dict().items()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert {id(p) for p in trainable} == {id(p) for p in model.student.parameters() if p.requires_grad}
    assert not any(p.requires_grad for p in model.teacher.parameters())
    before = [p.detach().clone() for p in trainable]
    optimizer = torch.optim.AdamW(trainable, lr=1e-3)

    out = model(_images())
    assert out.loss.ndim == 0 and 0.0 <= out.loss.item() <= 4.0
    out.loss.backward()
    for name, p in model.student.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
    optimizer.step()
    assert all(not torch.equal(a, p) for a, p in zip(before, trainable, strict=True))
    for k, v in model.teacher.state_dict().items():
        assert torch.equal(v, teacher_before[k]), k  # bit-identical
    assert not model.encoder.pos_embed.requires_grad and not model.decoder.decoder_pos_embed.requires_grad


def naive_spatial_loss(model: MILAN, images: torch.Tensor, mask: MaskIndices) -> torch.Tensor:
    """The references' layout: predictions put back in spatial order, then the loss over every spatial token."""
    assert model.teacher is not None and model.loss_on == "all"
    pred = restore_order(model.student(images, mask), mask)  # (B, 1 + L, D) spatial
    return cosine_loss(pred, model.teacher(images).features)


def test_loss_in_mask_order_equals_the_naive_spatial_order_loss() -> None:
    """MILAN computes the loss in mask order (gathering the target once); the oracle un-shuffles the predictions."""
    fast = create_model("milan_test_tiny")
    slow = create_model("milan_test_tiny")
    slow.load_state_dict(fast.state_dict())
    images = _images()
    mask = fast.draw_mask(fast.teacher(images).cls_attention, torch.rand(4, 16))
    a, b = fast(images, mask=mask), naive_spatial_loss(slow, images, mask)
    torch.testing.assert_close(a.loss, b, atol=1e-6, rtol=0)
    torch.testing.assert_close(a.pred, restore_order(slow.student(images, mask), mask), atol=1e-6, rtol=1e-5)
    a.loss.backward()
    b.backward()
    for (name, p), q in zip(fast.student.named_parameters(), slow.student.parameters(), strict=True):
        if p.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, atol=1e-6, rtol=1e-4, msg=name)


def test_loss_on_masked_tokens_only() -> None:
    model = create_model("milan_test_tiny", loss_on="masked")
    out = model(_images())
    dist = cosine_distance(out.pred, out.target)  # (B, 1 + L) spatial
    expected = (dist[:, 1:] * out.mask.binary_mask()).sum() / out.mask.binary_mask().sum()
    torch.testing.assert_close(out.loss, expected, atol=1e-6, rtol=1e-6)
    all_tokens = cosine_distance(out.pred, out.target).mean()
    assert not torch.isclose(out.loss, all_tokens)


def test_mask_ratio_and_attention_masking_use_the_teacher_importance() -> None:
    """The model's mask is the attention-masking draw from the teacher's importance (not the random draw from the
    same noise); which of the two keeps important patches more often is tests/test_masking.py's statistic."""
    model = create_model("milan_test_tiny", mask_ratio=0.5)
    images, noise = _images(), torch.rand(4, 16)
    out = model(images, noise=noise)
    assert out.mask.num_keep == 8 and out.importance is not None and out.importance.shape == (4, 16)
    assert model.teacher is not None
    torch.testing.assert_close(out.importance, model.teacher(images).cls_attention)
    assert torch.equal(out.mask.ids_shuffle, attention_masking(out.importance, 0.5, noise).ids_shuffle)
    assert not torch.equal(out.mask.ids_shuffle, random_masking(noise, 0.5).ids_shuffle)
    random = create_model("milan_test_tiny", mask_ratio=0.5, masking="random")
    assert torch.equal(random(images, noise=noise).mask.ids_shuffle, random_masking(noise, 0.5).ids_shuffle)


def test_random_masking_with_mae_decoder_ablation() -> None:
    cfg = model_config("milan_test_tiny")
    cfg.masking, cfg.decoder.kind = "random", "mae"
    model = build_milan(cfg)
    out = model(_images())
    out.loss.backward()
    assert all(p.grad is not None for p in model.student.parameters() if p.requires_grad)


def test_pixel_targets_without_teacher_equal_a_manual_mae_loss() -> None:
    cfg = model_config("milan_test_tiny")
    cfg.teacher.kind, cfg.decoder.kind, cfg.loss_on = "none", "mae", "masked"  # MAE: masked patches only
    model = build_milan(cfg)
    assert model.teacher is None and model.masking == "random" and model.decoder.out_dim == 8 * 8 * 3
    images = _images()
    mask = from_permutation(torch.stack([torch.randperm(16) for _ in range(4)]), 0.75)
    out = model(images, mask=mask)
    target = patchify(images, 8)
    target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6) ** 0.5
    per_patch = (out.pred[:, 1:] - target).pow(2).mean(-1)
    expected = (per_patch * mask.binary_mask()).sum() / mask.binary_mask().sum()
    torch.testing.assert_close(out.loss, expected, atol=1e-5, rtol=1e-5)


def test_patchify_layout() -> None:
    images = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).view(2, 3, 4, 4)
    patches = patchify(images, 2)  # (2, 4, 12), pixels ordered (p, p, C)
    assert patches.shape == (2, 4, 12)
    torch.testing.assert_close(patches[0, 1, :3], images[0, :, 0, 2])  # patch (0,1), pixel (0,0), channels


def test_shape_mismatches_are_clear_errors() -> None:
    cfg = model_config("milan_test_tiny")
    cfg.teacher.patch_size, cfg.teacher.img_size = 16, 32  # explicitly a 2 x 2 teacher grid vs the 4 x 4 student's
    with pytest.raises(ValueError, match="grid"):
        build_milan(cfg)
    with pytest.raises(KeyError, match="milan_test_tiny"):
        create_model("milan_vit_gigantic")
    with pytest.raises(TypeError, match="mask_rate"):
        create_model("milan_test_tiny", mask_rate=0.5)
    cfg = model_config("milan_test_tiny")
    cfg.teacher.kind = "none"
    with pytest.raises(ValueError, match="random"):
        MILAN(*_parts(cfg), teacher=None, masking="attention")


def _parts(cfg: object) -> tuple[object, object]:
    model = build_milan(cfg)  # type: ignore[arg-type]
    return model.encoder, model.decoder


def test_variants_and_paper_parameter_count() -> None:
    assert {"milan_vit_base_patch16", "milan_vit_large_patch16", "milan_test_tiny"} <= set(list_models())
    model = create_model("milan_vit_base_patch16")
    student = sum(p.numel() for p in model.student.parameters())
    assert student == 111_776_512  # encoder 85.80 M (incl. frozen pos-embed) + decoder 25.98 M
    assert model.teacher is not None and model.teacher.out_dim == 512 and model.decoder.out_dim == 512
    assert model.mask_ratio == 0.75 and model.loss_on == "all" and model.masking == "attention"
