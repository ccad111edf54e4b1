"""Sin-cos tables against the formula, and the transposition between the two layouts."""

from __future__ import annotations

import math

import pytest
import torch

from milan.pos_embed import sincos_2d


def _formula(i: int, j: int, dim: int, first: str) -> torch.Tensor:
    quarter = dim // 4
    omega = torch.tensor([10000 ** (-d / quarter) for d in range(quarter)], dtype=torch.float64)
    a, b = (i, j) if first == "row" else (j, i)
    return torch.cat([torch.sin(a * omega), torch.cos(a * omega), torch.sin(b * omega), torch.cos(b * omega)]).float()


@pytest.mark.parametrize(("layout", "first"), [("mmpretrain", "row"), ("mae", "col")])
def test_layouts_match_the_formula(layout: str, first: str) -> None:
    table = sincos_2d((3, 5), 16, layout=layout)  # type: ignore[arg-type]
    assert table.shape == (1, 16, 16)
    assert torch.all(table[0, 0] == 0)  # cls row
    for i in range(3):
        for j in range(5):
            torch.testing.assert_close(table[0, 1 + i * 5 + j], _formula(i, j, 16, first), atol=1e-6, rtol=0)


def test_the_two_layouts_are_the_grid_transposed() -> None:
    mm = sincos_2d((4, 4), 32, layout="mmpretrain")[0, 1:].view(4, 4, 32)
    mae = sincos_2d((4, 4), 32, layout="mae")[0, 1:].view(4, 4, 32)
    torch.testing.assert_close(mae, mm.transpose(0, 1))


def test_matches_mmpretrain_builder() -> None:
    utils = pytest.importorskip("mmpretrain.models.utils")
    ref = utils.build_2d_sincos_position_embedding(14, 768, cls_token=True)
    torch.testing.assert_close(sincos_2d((14, 14), 768), ref, atol=1e-6, rtol=0)


def test_dim_must_be_divisible_by_four() -> None:
    with pytest.raises(ValueError, match="dim % 4"):
        sincos_2d((2, 2), 6)
    assert math.isclose(float(sincos_2d((2, 2), 8)[0, 1, 2]), 1.0)  # [sin, sin, cos, ...]: cos(0) at index 2
