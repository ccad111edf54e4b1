"""Loss values on hand-made vectors."""

from __future__ import annotations

import torch

from milan.losses import cosine_distance, cosine_loss, pixel_mse_loss


def test_cosine_distance_hand_values() -> None:
    target = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [3.0, 4.0]])
    pred = torch.tensor([[2.0, 0.0], [0.0, -1.0], [1.0, -1.0], [4.0, 3.0]])
    # same direction -> 0, opposite -> 4, orthogonal -> 2, cos = 24/25 -> 2 - 48/25
    torch.testing.assert_close(cosine_distance(pred, target), torch.tensor([0.0, 4.0, 2.0, 2 - 48 / 25]))


def test_cosine_loss_mean_and_weights() -> None:
    pred = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]]])  # (1, 3, 2)
    target = torch.tensor([[[1.0, 0.0], [1.0, 0.0], [-1.0, 0.0]]])  # distances 0, 2, 4
    torch.testing.assert_close(cosine_loss(pred, target), torch.tensor(2.0))
    torch.testing.assert_close(cosine_loss(pred, target, torch.tensor([[0.0, 1.0, 1.0]])), torch.tensor(3.0))


def test_cosine_loss_runs_in_fp32_for_half_inputs() -> None:
    pred = torch.full((1, 2, 4), 300.0, dtype=torch.float16)  # squares overflow fp16 (max 65504)
    loss = cosine_loss(pred, pred.clone())
    assert loss.dtype == torch.float32 and torch.isfinite(loss) and loss.abs() < 1e-5


def test_pixel_mse_with_norm_pix_on_masked_patches() -> None:
    target = torch.tensor([[[1.0, 3.0], [2.0, 2.0]]])  # (B=1, N=2 patches, P=2 pixels)
    pred = torch.zeros(1, 2, 2)
    weight = torch.tensor([[1.0, 0.0]])
    mean, var = 2.0, 2.0  # unbiased variance of [1, 3]
    normed = (torch.tensor([1.0, 3.0]) - mean) / (var + 1e-6) ** 0.5
    torch.testing.assert_close(pixel_mse_loss(pred, target, weight), normed.pow(2).mean())
    torch.testing.assert_close(pixel_mse_loss(pred, target, weight, norm_pix=False), torch.tensor(5.0))
