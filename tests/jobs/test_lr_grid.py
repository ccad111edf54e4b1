"""The one-pass lr grid trains each head exactly as a separate linear probe would."""

import pytest
import torch
import torch.nn.functional as F

from milan.models.classifier import LinearProbe
from milan.models.lr_grid import LinearProbeGrid, grid_cross_entropy
from milan.models.vit import VisionTransformer
from milan.train.lars import LARS
from milan.train.optim import param_groups


def _encoder():
    return VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2)


@pytest.mark.parametrize("variant", ["mocov3", "mmselfsup"])
def test_grid_equals_separate_probes(variant):
    torch.manual_seed(0)
    enc = _encoder()
    scales = [0.5, 2.0]
    grid = LinearProbeGrid(enc, num_classes=4, lr_scales=scales).train()
    probes = []
    for i in range(2):
        probe = LinearProbe(_encoder(), 4)
        probe.encoder.load_state_dict(enc.state_dict())
        probe.head.fc.load_state_dict(grid.fcs[i].state_dict())
        probes.append(probe.train())
    base_lr = 0.3
    groups = [{**g, "lr_scale": s} for fc, s in zip(grid.fcs, scales, strict=True) for g in param_groups(fc, 0.0)]
    opt = LARS(groups, lr=base_lr, variant=variant)  # as milan linprobe groups the heads
    opts = [LARS(p.head.parameters(), lr=base_lr * s, variant=variant) for p, s in zip(probes, scales, strict=True)]
    for _ in range(3):
        x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 4, (8,))
        loss = grid_cross_entropy(grid(x), y)
        opt.zero_grad()
        loss.backward()
        for group in opt.param_groups:
            group["lr"] = base_lr * group["lr_scale"]
        opt.step()
        for p, o in zip(probes, opts, strict=True):
            o.zero_grad()
            F.cross_entropy(p(x), y).backward()
            o.step()
    for i, p in enumerate(probes):
        for key, value in p.state_dict().items():
            torch.testing.assert_close(grid.probe_state_dict(i)[key], value, rtol=1e-5, atol=1e-6)
        assert set(grid.probe_state_dict(i)) == set(p.state_dict())
    # the exported probe gives the grid head's logits
    grid.eval()
    x = torch.randn(5, 3, 32, 32)
    probe = LinearProbe(grid.encoder, grid.num_classes)
    probe.load_state_dict(grid.probe_state_dict(1))
    torch.testing.assert_close(probe.eval()(x), grid(x)[1])


def test_grid_validates_and_freezes():
    with pytest.raises(ValueError, match="lr_scales"):
        LinearProbeGrid(_encoder(), 3, [])
    grid = LinearProbeGrid(_encoder(), 3, [1.0])
    assert not any(p.requires_grad for p in grid.encoder.parameters())
    grid.train()
    assert not grid.encoder.training and grid.bn.training
