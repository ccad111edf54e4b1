"""Numerical parity with OpenMMLab mmpretrain 1.2.0's MILAN on the same weights, input and mask."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("mmpretrain", reason="needs the `parity` extra (pip install -e .[parity])")

from milan.masking import attention_masking, from_permutation, restore_order
from milan.models import build_milan, model_config
from milan.models.factory import ModelConfig
from tests.models.test_milan import naive_spatial_loss
from tests.parity.mm_reference import build_reference, load_reference_into, run_reference

pytestmark = pytest.mark.parity


def _compare(cfg: ModelConfig, batch: int, spatial: bool, tol: dict[str, float]) -> dict[str, float]:
    """``spatial``: our model's parts with the loss in spatial order (the oracle of the mask-order loss) instead of
    ``MILAN.forward``."""
    reference = build_reference(cfg, seed=0)
    ours = build_milan(cfg)
    load_reference_into(ours, reference)

    g = torch.Generator().manual_seed(1)
    images = torch.randn(batch, 3, cfg.encoder.img_size, cfg.encoder.img_size, generator=g)
    assert ours.teacher is not None
    importance = ours.teacher(images).cls_attention
    noise = torch.rand(importance.shape, generator=torch.Generator().manual_seed(2))
    ids_shuffle = attention_masking(importance, cfg.mask_ratio, noise).ids_shuffle

    ref = run_reference(reference, images, ids_shuffle)
    ours.zero_grad(set_to_none=True)
    mask = from_permutation(ids_shuffle, cfg.mask_ratio)
    out = ours(images, mask=mask)
    loss = naive_spatial_loss(ours, images, mask) if spatial else out.loss
    pred = restore_order(ours.student(images, mask), mask) if spatial else out.pred
    loss.backward()
    latent = ours.encoder.forward_masked(images, mask.ids_keep)

    diffs = {
        "loss": (loss.detach() - ref["loss"]).abs().item(),
        "features": (out.target - ref["features"]).abs().max().item(),
        "importance": (out.importance - ref["importance"]).abs().max().item(),
        "latent": (latent.detach() - ref["latent"]).abs().max().item(),
        "pred": (pred.detach() - ref["pred"]).abs().max().item(),
    }
    params = dict(ours.named_parameters())
    trainable = {k for k, p in params.items() if p.requires_grad}
    assert set(ref["grads"]) == trainable, sorted(set(ref["grads"]) ^ trainable)
    grad_diff = 0.0
    for name, ref_grad in ref["grads"].items():
        ours_grad = params[name].grad
        assert ours_grad is not None, name
        scale = ref_grad.abs().max().clamp_min(1e-12)
        grad_diff = max(grad_diff, ((ours_grad - ref_grad).abs().max() / scale).item())
    diffs["grad_rel"] = grad_diff
    for key, value in diffs.items():
        assert value <= tol[key], f"{key}: {value:.3e} > {tol[key]:.1e} (all: {diffs})"
    print({k: f"{v:.2e}" for k, v in diffs.items()})
    return diffs


TINY_TOL = {"loss": 1e-6, "features": 1e-5, "importance": 1e-6, "latent": 1e-5, "pred": 1e-5, "grad_rel": 1e-4}


@pytest.mark.parametrize("spatial", [True, False], ids=["spatial-order", "mask-order"])
def test_parity_tiny(spatial: bool) -> None:
    _compare(model_config("milan_test_tiny"), batch=4, spatial=spatial, tol=TINY_TOL)


def test_parity_vit_base_patch16() -> None:
    """The paper's dimensions (ViT-B/16 student, 512-d 8-block decoder, CLIP ViT-B/16 teacher) at batch 2."""
    tol = {"loss": 2e-6, "features": 5e-5, "importance": 1e-6, "latent": 5e-5, "pred": 5e-5, "grad_rel": 1e-3}
    _compare(model_config("milan_vit_base_patch16"), batch=2, spatial=False, tol=tol)
