"""Channels-last input and fused AdamW against the straightforward path (contiguous NCHW, for-loop AdamW)."""

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


def test_fused_adamw_matches_for_loop_adamw() -> None:
    """Three MILAN steps with fused AdamW (one kernel for all parameters) and with the for-loop AdamW.

    ``eps=1e-4`` keeps numerically-zero gradients (the key bias, whose exact gradient is 0, gets ~1e-10 rounding
    noise) from being amplified by Adam into lr-sized updates of random sign in either implementation.
    """
    models = _twins()
    x = torch.randn(4, 3, 32, 32)
    optimizers = [
        torch.optim.AdamW(
            [p for p in m.parameters() if p.requires_grad],
            lr=1e-3,
            betas=(0.9, 0.95),
            eps=1e-4,
            weight_decay=0.05,
            **flags,
        )
        for m, flags in zip(models, ({"foreach": False}, {"fused": True}), strict=True)
    ]
    for step in range(3):
        mask = _mask(4, seed=step)
        losses = []
        for model, opt in zip(models, optimizers, strict=True):
            loss = model(x, mask=mask).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.item())
        assert abs(losses[0] - losses[1]) < 1e-5, (step, losses)
    reference = dict(models[0].named_parameters())
    for name, p in models[1].named_parameters():
        torch.testing.assert_close(p, reference[name], rtol=1e-5, atol=1e-6, msg=name)
    initial = _twins()[0].student.parameters()
    moved = [(p - q).abs().max().item() for p, q in zip(models[1].student.parameters(), initial, strict=True)]
    assert max(moved) > 1e-4  # the steps did update the weights
