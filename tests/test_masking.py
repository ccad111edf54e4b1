"""Masking: permutation contract, exact counts, and the sampling statistics."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from milan.masking import (
    MaskIndices,
    attention_masking,
    from_permutation,
    num_visible,
    random_masking,
    restore_order,
    to_mask_order,
)


def _noise(batch: int, length: int, seed: int) -> torch.Tensor:
    return torch.rand(batch, length, generator=torch.Generator().manual_seed(seed))


def _check_contract(mask: MaskIndices, batch: int, length: int, keep: int) -> None:
    assert mask.ids_shuffle.shape == (batch, length)
    assert torch.equal(mask.ids_shuffle.sort(dim=1).values, torch.arange(length).expand(batch, -1))
    assert torch.equal(torch.gather(mask.ids_shuffle, 1, mask.ids_restore), torch.arange(length).expand(batch, -1))
    assert mask.num_keep == keep and mask.ids_keep.shape == (batch, keep)
    assert mask.ids_mask.shape == (batch, length - keep)
    binary = mask.binary_mask()
    assert torch.equal(binary.sum(1), torch.full((batch,), float(length - keep)))
    assert torch.all(torch.gather(binary, 1, mask.ids_keep) == 0)


@pytest.mark.parametrize(("length", "ratio", "keep"), [(196, 0.75, 49), (256, 0.75, 64), (16, 0.75, 4), (49, 0.6, 19)])
def test_exact_counts_and_permutation(length: int, ratio: float, keep: int) -> None:
    assert num_visible(length, ratio) == keep
    importance = torch.rand(5, length)
    _check_contract(attention_masking(importance, ratio, _noise(5, length, 0)), 5, length, keep)
    _check_contract(random_masking(_noise(5, length, 1), ratio), 5, length, keep)


def test_bad_ratio_is_rejected() -> None:
    with pytest.raises(ValueError, match="mask_ratio"):
        num_visible(196, 1.0)


def test_peaked_importance_keeps_high_importance_patches_far_more_often() -> None:
    length, trials = 16, 4000
    importance = torch.ones(trials, length)
    high = torch.tensor([2, 5, 11, 14])
    importance[:, high] = 50.0
    mask = attention_masking(importance, 0.75, _noise(trials, length, 0))  # keep 4 of 16
    kept = 1 - mask.binary_mask()  # (trials, L), 1 = visible
    freq = kept.mean(0)
    low = torch.ones(length, dtype=torch.bool)
    low[high] = False
    assert freq[high].min() > 0.85
    assert freq[low].max() < 0.06


Masker = Callable[[torch.Tensor, torch.Tensor], MaskIndices]  # (importance (B, L), noise (B, L)) -> mask


def _importance_gap_in_sigmas(masker: Masker, trials: int = 2000) -> float:
    """How much more often the 4 most important of 16 patches stay visible than the 4 least important ones, in
    standard errors of that difference. Every sample has the same mildly varied importance (1 to 4), far from the
    50x peaks of the test above, so a masking rule that ignores the importance has no gap beyond noise."""
    length = 16
    importance = torch.linspace(1.0, 4.0, length)[torch.randperm(length, generator=torch.Generator().manual_seed(5))]
    order = importance.argsort()
    low, high = order[:4], order[-4:]
    mask = masker(importance.expand(trials, -1), _noise(trials, length, 6))
    visible = 1 - mask.binary_mask()  # (trials, L), 1 = visible
    p_high, p_low = visible[:, high].mean(), visible[:, low].mean()
    pooled = visible[:, torch.cat([high, low])].mean()
    stderr = (pooled * (1 - pooled) * 2 / (4 * trials)) ** 0.5
    return float((p_high - p_low) / stderr)


def test_attention_masking_keeps_high_importance_patches_more_often_and_random_masking_does_not() -> None:
    """The statistic separates the two rules: attention masking passes the 6-sigma threshold by far, and the same
    statistic on random masking (the rule substituted, same noise) stays below it."""
    attention = _importance_gap_in_sigmas(lambda importance, noise: attention_masking(importance, 0.75, noise))
    random = _importance_gap_in_sigmas(lambda importance, noise: random_masking(noise, 0.75))
    assert attention > 6.0, attention
    assert abs(random) < 6.0, random


def test_uniform_importance_behaves_like_random_masking() -> None:
    length, trials, ratio = 16, 8000, 0.75
    keep = num_visible(length, ratio)
    ones = torch.ones(trials, length)
    attn_freq = (1 - attention_masking(ones, ratio, _noise(trials, length, 1)).binary_mask()).mean(0)
    rand_freq = (1 - random_masking(_noise(trials, length, 2), ratio).binary_mask()).mean(0)
    expected = keep / length
    sigma = (expected * (1 - expected) / trials) ** 0.5
    assert (attn_freq - expected).abs().max() < 5 * sigma
    assert (rand_freq - expected).abs().max() < 5 * sigma
    # Pair statistics too: under uniform sampling every pair is kept together with the same probability.
    kept = 1 - attention_masking(torch.ones(trials, length), ratio, _noise(trials, length, 3)).binary_mask()
    pair = (kept.T @ kept / trials)[~torch.eye(length, dtype=torch.bool)]
    pair_expected = keep * (keep - 1) / (length * (length - 1))
    assert (pair - pair_expected).abs().max() < 6 * (pair_expected / trials) ** 0.5


def test_first_draw_follows_importance_proportionally() -> None:
    # Plackett-Luce: the first visible patch is drawn with probability importance / sum(importance).
    importance = torch.tensor([1.0, 2.0, 3.0, 4.0]).expand(20000, -1).contiguous()
    first = attention_masking(importance, 0.5, _noise(20000, 4, 2)).ids_keep[:, 0]
    freq = torch.bincount(first, minlength=4).float() / first.numel()
    torch.testing.assert_close(freq, torch.tensor([0.1, 0.2, 0.3, 0.4]), atol=0.015, rtol=0)


def test_noise_makes_draws_reproducible_and_zero_importance_is_valid() -> None:
    importance = torch.rand(4, 16)
    a = attention_masking(importance, 0.75, _noise(4, 16, 7))
    b = attention_masking(importance, 0.75, _noise(4, 16, 7))
    assert torch.equal(a.ids_shuffle, b.ids_shuffle)
    zeros = torch.zeros(4, 16)
    zeros[:, 3] = 1.0
    mask = attention_masking(zeros, 0.75, _noise(4, 16, 8))
    assert torch.all(mask.ids_keep[:, 0] == 3)  # the only weighted patch is always drawn first


def test_order_helpers_are_inverse() -> None:
    mask = from_permutation(torch.stack([torch.randperm(16) for _ in range(3)]), 0.75)
    x = torch.randn(3, 17, 5)
    torch.testing.assert_close(restore_order(to_mask_order(x, mask), mask), x)
