"""LARS against plain per-parameter re-implementations of the two reference variants."""

import pytest
import torch

from milan.train.lars import LARS


def _naive_mocov3(params, grads_seq, lrs, momentum, wd, eta):
    """MAE/MoCo-v3 LARS written out with Python floats, one parameter at a time."""
    params = [p.clone() for p in params]
    mus = [torch.zeros_like(p) for p in params]
    for grads, lr in zip(grads_seq, lrs, strict=True):
        for j, (p, g) in enumerate(zip(params, grads, strict=True)):
            u = g.clone()
            if p.ndim > 1:
                u = u + wd * p
                pn, un = float(p.norm()), float(u.norm())
                q = eta * pn / un if (pn > 0 and un > 0) else 1.0
                u = u * q
            mus[j] = momentum * mus[j] + u
            params[j] = p - lr * mus[j]
    return params


def _naive_mmselfsup(params, grads_seq, lrs, momentum, wd, eta, eps=1e-8):
    """MMSelfSup LARS: trust ratio on every parameter, lr folded into the momentum buffer."""
    params = [p.clone() for p in params]
    bufs = [None] * len(params)
    for grads, lr in zip(grads_seq, lrs, strict=True):
        for j, (p, g) in enumerate(zip(params, grads, strict=True)):
            pn, gn = float(p.norm()), float(g.norm())
            local = eta * pn / (gn + wd * pn + eps) if (pn > 0 and gn > 0) else 1.0
            d = (g + wd * p) * (lr * local)
            bufs[j] = d.clone() if bufs[j] is None else momentum * bufs[j] + d
            params[j] = p - bufs[j]
    return params


@pytest.mark.parametrize("variant", ["mocov3", "mmselfsup"])
@pytest.mark.parametrize("wd", [0.0, 0.05])
def test_lars_matches_naive(variant, wd):
    torch.manual_seed(0)
    w = torch.randn(5, 7, dtype=torch.float64)
    b = torch.randn(5, dtype=torch.float64)
    z = torch.zeros(3, 4, dtype=torch.float64)  # zero norm -> trust ratio 1
    init = [w, b, z]
    steps = 4
    grads_seq = [[torch.randn_like(p) for p in init] for _ in range(steps)]
    lrs = [0.5, 1.0, 3.2, 0.1]  # a changing lr, as under a schedule
    params = [torch.nn.Parameter(p.clone()) for p in init]
    opt = LARS(params, lr=lrs[0], momentum=0.9, weight_decay=wd, trust_coefficient=0.001, variant=variant)
    for grads, lr in zip(grads_seq, lrs, strict=True):
        for p, g in zip(params, grads, strict=True):
            p.grad = g.clone()
        for group in opt.param_groups:
            group["lr"] = lr
        opt.step()
    naive = _naive_mocov3 if variant == "mocov3" else _naive_mmselfsup
    expected = naive(init, grads_seq, lrs, 0.9, wd, 0.001)
    for got, exp in zip(params, expected, strict=True):
        torch.testing.assert_close(got.detach(), exp, rtol=1e-12, atol=1e-12)


def test_lars_variants_differ_on_bias():
    # mocov3 leaves the trust ratio off 1-D params (a plain momentum-SGD step); mmselfsup scales it by eta*|p|/|g|.
    p1, p2 = torch.nn.Parameter(torch.ones(4)), torch.nn.Parameter(torch.ones(4))
    for p in (p1, p2):
        p.grad = torch.full((4,), 0.5)
    LARS([p1], lr=1.0, variant="mocov3").step()
    LARS([p2], lr=1.0, variant="mmselfsup").step()
    torch.testing.assert_close(p1.detach(), torch.full((4,), 0.5))
    local = 0.001 * 2.0 / (1.0 + 1e-8)
    torch.testing.assert_close(p2.detach(), torch.full((4,), 1 - 0.5 * local))


def test_lars_skips_params_without_grad_and_validates():
    p = torch.nn.Parameter(torch.ones(2, 2))
    LARS([p], lr=1.0).step()
    assert torch.equal(p.detach(), torch.ones(2, 2))
    with pytest.raises(ValueError, match="variant"):
        LARS([p], variant="sgd")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=">= 0"):
        LARS([p], lr=-1.0)


@pytest.mark.parity
def test_mmselfsup_variant_matches_mmpretrain():
    mm_lars = pytest.importorskip("mmpretrain.engine.optimizers.lars")
    torch.manual_seed(1)
    init = [torch.randn(6, 3), torch.randn(6)]
    grads_seq = [[torch.randn_like(p) for p in init] for _ in range(3)]
    ours = [torch.nn.Parameter(p.clone()) for p in init]
    theirs = [torch.nn.Parameter(p.clone()) for p in init]
    o1 = LARS(ours, lr=3.2, momentum=0.9, weight_decay=1e-4, variant="mmselfsup")
    o2 = mm_lars.LARS(theirs, lr=3.2, momentum=0.9, weight_decay=1e-4, eta=0.001)
    for grads in grads_seq:
        for a, b, g in zip(ours, theirs, grads, strict=True):
            a.grad, b.grad = g.clone(), g.clone()
        o1.step()
        o2.step()
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
