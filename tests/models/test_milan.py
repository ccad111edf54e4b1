"""The whole MILAN model: one training step, loss options, ablation variants, factory errors."""

from __future__ import annotations

import pytest
import torch

from milan.losses import cosine_distance
from milan.masking import from_permutation
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


def test_loss_is_the_same_in_mask_order_and_spatial_order() -> None:
    fast = create_model("milan_test_tiny")
    slow = create_model("milan_test_tiny", restore_order=True)
    slow.load_state_dict(fast.state_dict())
    images = _images()
    mask = fast.draw_mask(images, fast.teacher(images).cls_attention, torch.Generator().manual_seed(0))
    a, b = fast(images, mask=mask), slow(images, mask=mask)
    torch.testing.assert_close(a.loss, b.loss, atol=1e-6, rtol=0)
    torch.testing.assert_close(a.pred, b.pred, atol=1e-6, rtol=1e-5)
    a.loss.backward()
    b.loss.backward()
    for (name, p), q in zip(fast.student.named_parameters(), slow.student.parameters(), strict=True):
        if p.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, atol=1e-6, rtol=1e-4, msg=name)


@pytest.mark.parametrize("restore_order", [False, True])
def test_loss_on_masked_tokens_only(restore_order: bool) -> None:
    model = create_model("milan_test_tiny", loss_on="masked", restore_order=restore_order)
    out = model(_images())
    dist = cosine_distance(out.pred, out.target)  # (B, 1 + L) spatial
    expected = (dist[:, 1:] * out.mask.binary_mask()).sum() / out.mask.binary_mask().sum()
    torch.testing.assert_close(out.loss, expected, atol=1e-6, rtol=1e-6)
    all_tokens = cosine_distance(out.pred, out.target).mean()
    assert not torch.isclose(out.loss, all_tokens)


def test_mask_ratio_and_attention_masking_use_the_teacher_importance() -> None:
    model = create_model("milan_test_tiny", mask_ratio=0.5)
    out = model(_images())
    assert out.mask.num_keep == 8 and out.importance is not None and out.importance.shape == (4, 16)


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
