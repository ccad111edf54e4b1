"""Our neck, UperNet and FCN heads and loss against mmsegmentation 1.2.2's own, with the same weights.

Test-only and skipped unless mmsegmentation is importable. It is not in the ``parity`` extra: mmsegmentation 1.2.2
installs cleanly with that extra's pins but does not import with them, for two reasons (both worked around here, for
this test only, without touching the compared code):

1. ``mmseg/__init__.py`` asserts ``mmcv < 2.2.0``, while the extra's ``mmcv-lite>=2.0,<2.3`` resolves to 2.2.0
   (mmpretrain 1.2.0 accepts it): the version is presented as 2.1.0 during the import.
2. ``mmseg.utils`` imports ``mmcv.ops`` (compiled CUDA/C++ extensions), which mmcv-lite does not ship: a stand-in
   ``mmcv.ops`` module answers the import; the compared classes (``UPerHead``, ``FCNHead``, ``Feature2Pyramid``,
   ``CrossEntropyLoss``) use no compiled op, and calling any stand-in raises.

Run it with mmsegmentation on the path, e.g. ``pip install --target DIR --no-deps mmsegmentation==1.2.2 prettytable
scipy`` then ``PYTHONPATH=DIR python -m pytest tests/parity/test_mmseg_parity.py``.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import sys
import types
from typing import Any

import pytest
import torch

from milan.models.segmentation import SegmentationModel, segmentation_loss
from milan.models.vit import VisionTransformer

pytestmark = pytest.mark.parity


class _MissingOps(types.ModuleType):
    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)

        def missing(*_a: Any, **_k: Any) -> Any:
            raise RuntimeError(f"mmcv.ops.{name} needs mmcv's compiled ops (not in mmcv-lite)")

        return missing


class _OpsFinder:
    """Answers ``import mmcv.ops[...]`` with :class:`_MissingOps` modules."""

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        if name == "mmcv.ops" or name.startswith("mmcv.ops."):
            return importlib.machinery.ModuleSpec(name, self, is_package=True)  # type: ignore[arg-type]
        return None

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
        return _MissingOps(spec.name)

    def exec_module(self, module: types.ModuleType) -> None:
        module.__path__ = []


def _import_mmseg() -> Any:
    if importlib.util.find_spec("mmseg") is None or importlib.util.find_spec("mmcv") is None:
        pytest.skip("mmsegmentation is not installed (see the module docstring)")
    import mmcv

    if importlib.util.find_spec("mmcv._ext") is None and not any(isinstance(f, _OpsFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _OpsFinder())
    real = mmcv.__version__
    mmcv.__version__ = min(real, "2.1.0")
    try:
        import mmseg.models.decode_heads as heads
        import mmseg.models.necks as necks
    finally:
        mmcv.__version__ = real
    return heads, necks


def _build(dim: int, channels: int, aux: int, k: int) -> tuple[SegmentationModel, Any, Any, Any]:
    heads, necks = _import_mmseg()
    bn = dict(type="BN", requires_grad=True)
    enc = VisionTransformer(img_size=32, patch_size=8, embed_dim=dim, depth=2, num_heads=2)
    ours = SegmentationModel(enc, k, crop_size=64, channels=channels, aux_channels=aux)
    neck = necks.Feature2Pyramid(embed_dim=dim, rescales=[4, 2, 1, 0.5], norm_cfg=bn)
    uper = heads.UPerHead(
        in_channels=[dim] * 4,
        in_index=[0, 1, 2, 3],
        pool_scales=(1, 2, 3, 6),
        channels=channels,
        dropout_ratio=0.1,
        num_classes=k,
        norm_cfg=bn,
        align_corners=False,
    )
    fcn = heads.FCNHead(
        in_channels=dim,
        in_index=2,
        channels=aux,
        num_convs=1,
        concat_input=False,
        dropout_ratio=0.1,
        num_classes=k,
        norm_cfg=bn,
        align_corners=False,
        loss_decode=dict(type="CrossEntropyLoss", use_sigmoid=False, loss_weight=0.4),
    )
    for m in (neck, uper, fcn):
        if hasattr(m, "init_weights"):
            m.init_weights()
        for p in m.parameters():  # different values than ours, so that the copy below is what makes them agree
            p.data.normal_(0, 0.05)
    ours.neck.load_state_dict(neck.state_dict())  # strict: the same names
    ours.decode_head.load_state_dict(uper.state_dict(), strict=False)
    missing = set(ours.decode_head.state_dict()) - set(uper.state_dict())
    assert not missing, missing
    assert ours.auxiliary_head is not None
    ours.auxiliary_head.load_state_dict(fcn.state_dict(), strict=False)
    return ours, neck, uper, fcn


def test_neck_and_heads_match_mmsegmentation() -> None:
    torch.manual_seed(0)
    ours, neck, uper, fcn = _build(dim=32, channels=24, aux=16, k=7)
    feats = [torch.randn(2, 32, 8, 10) for _ in range(4)]
    for train in (False, True):  # eval: running statistics; train: batch statistics (dropout off to compare)
        for m in (ours, neck, uper, fcn):
            m.train(train)
        if train:
            for d in (ours.decode_head.dropout, ours.auxiliary_head.dropout, uper.dropout, fcn.dropout):  # type: ignore[union-attr]
                d.p = 0.0
        levels = ours.neck(feats)
        ref_levels = neck(feats)
        for a, b in zip(levels, ref_levels, strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
        torch.testing.assert_close(ours.decode_head(levels), uper(list(ref_levels)), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(ours.auxiliary_head(levels[2]), fcn(list(ref_levels)), rtol=1e-5, atol=1e-6)  # type: ignore[misc]


def test_loss_matches_mmsegmentation() -> None:
    torch.manual_seed(1)
    _, _, uper, fcn = _build(dim=16, channels=8, aux=8, k=5)  # skips without mmsegmentation
    from mmengine.structures import PixelData
    from mmseg.structures import SegDataSample

    logits, aux = torch.randn(2, 5, 8, 8), torch.randn(2, 5, 4, 4)
    labels = torch.randint(0, 5, (2, 32, 32))
    labels[:, :5] = 255
    samples = []
    for y in labels:
        s = SegDataSample()
        s.gt_sem_seg = PixelData(data=y[None])
        samples.append(s)
    ref = uper.loss_by_feat(logits, samples)["loss_ce"] + fcn.loss_by_feat(aux, samples)["loss_ce"]
    ours = segmentation_loss(logits, labels, ignore_index=255, aux_logits=aux, aux_weight=0.4)
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-7)
