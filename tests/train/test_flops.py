from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from milan.flops import mfu, peak_flops, pretrain_flops
from milan.masking import random_masking
from milan.models import create_model
from milan.models.factory import model_config


def naive_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
    """Attention as two visible matmuls (the flop counter does not see the CPU fused kernel)."""
    scale = kwargs.get("scale") or q.shape[-1] ** -0.5
    return torch.softmax(q @ k.transpose(-2, -1) * float(scale), dim=-1) @ v  # type: ignore[arg-type]


def measured(fn: object) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()  # type: ignore[operator]
    return counter.get_total_flops()


@pytest.mark.parametrize("name", ["milan_test_tiny", "milan_demo_small"])
def test_analytic_flops_match_torch_flop_counter(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(F, "scaled_dot_product_attention", naive_sdpa)
    model = create_model(name)
    assert model.teacher is not None
    images = torch.randn(2, 3, model.encoder.patch_embed.img_size[0], model.encoder.patch_embed.img_size[1])
    mask = random_masking(2, model.encoder.num_patches, model.mask_ratio)
    analytic = pretrain_flops(model_config(name))
    teacher = measured(lambda: model.teacher(images)) / 2
    student = measured(lambda: model.student(images, mask)) / 2
    # the counter also sees the teacher's explicit CLS-attention row (one query of the last block)
    assert teacher == pytest.approx(analytic.teacher, rel=0.02)
    assert student == pytest.approx(analytic.student_forward, rel=0.01)
    fwd_bwd = measured(lambda: model.student(images, mask).sum().backward()) / 2
    assert fwd_bwd == pytest.approx(3 * analytic.student_forward - analytic.patch_embed, rel=0.01)


def test_vit_base_recipe_is_87_gflop_per_image() -> None:
    f = pretrain_flops(model_config("milan_vit_base_patch16"))
    assert f.teacher / 1e9 == pytest.approx(35.3, abs=0.1)
    assert f.student_forward / 1e9 == pytest.approx(17.25, abs=0.1)
    assert f.total / 1e9 == pytest.approx(86.8, abs=0.1)


def test_mfu_and_peaks() -> None:
    assert peak_flops(torch.device("cpu")) is None
    assert peak_flops(torch.device("cpu"), override_tflops=100.0) == 1e14
    assert mfu(1000.0, 87e9, 989e12, num_devices=1) == pytest.approx(0.088, abs=1e-3)
    assert mfu(1000.0, 87e9, None) is None
