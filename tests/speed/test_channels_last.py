"""Channels-last input against the straightforward path (contiguous NCHW)."""

from __future__ import annotations

import torch

from milan.masking import from_permutation
from milan.models import create_model


def _twins() -> tuple[torch.nn.Module, torch.nn.Module]:
    torch.manual_seed(0)
    a = create_model("milan_test_tiny")
    b = create_model("milan_test_tiny")
    b.load_state_dict(a.state_dict())
    return a, b


def _mask(batch: int, seed: int = 0) -> object:
    g = torch.Generator().manual_seed(seed)
    return from_permutation(torch.stack([torch.randperm(16, generator=g) for _ in range(batch)]), 0.75)


def test_channels_last_same_loss_and_grads() -> None:
    plain, fast = _twins()
    fast.to(memory_format=torch.channels_last)
    assert fast.encoder.patch_embed.proj.weight.is_contiguous(memory_format=torch.channels_last)
    x = torch.randn(4, 3, 32, 32)
    mask = _mask(4)
    out_plain = plain(x, mask=mask)
    out_fast = fast(x.contiguous(memory_format=torch.channels_last), mask=mask)
    torch.testing.assert_close(out_fast.loss, out_plain.loss, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out_fast.target, out_plain.target, rtol=1e-5, atol=1e-6)
    out_plain.loss.backward()
    out_fast.loss.backward()
    grads = dict(plain.named_parameters())
    for name, p in fast.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, grads[name].grad, rtol=1e-5, atol=1e-6, msg=name)
