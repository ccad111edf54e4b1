"""The segmentation model: block choice, neck and head shapes, position table, inference, loss, layer decay."""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from milan.models.segmentation import (
    SegmentationModel,
    build_from_spec,
    feature_blocks,
    model_spec,
    segmentation_loss,
    slide_inference,
    window_grid,
)
from milan.models.vit import VisionTransformer
from milan.train.optim import layer_decay_groups


def tiny(depth: int = 2, patch: int = 8, crop: int = 64, **kw: object) -> SegmentationModel:
    enc = VisionTransformer(img_size=32, patch_size=patch, embed_dim=32, depth=depth, num_heads=2)
    return SegmentationModel(enc, 5, crop_size=crop, channels=16, aux_channels=8, **kw)  # type: ignore[arg-type]


def test_feature_blocks_follow_the_reference_and_scale_with_depth() -> None:
    assert feature_blocks(12) == (3, 5, 7, 11)  # mmseg MAE out_indices
    assert feature_blocks(24) == (7, 11, 15, 23)  # mmseg ViT-L
    assert feature_blocks(4) == (0, 1, 2, 3)
    assert feature_blocks(6) == (1, 2, 3, 5)
    assert feature_blocks(1) == (0, 0, 0, 0)
    for depth in range(1, 40):
        blocks = feature_blocks(depth)
        assert list(blocks) == sorted(blocks) and blocks[-1] == depth - 1 and blocks[0] >= 0


@pytest.mark.parametrize(
    ("depth", "patch", "crop", "size"),
    [(1, 8, 64, (64, 64)), (2, 8, 64, (48, 80)), (4, 16, 64, (64, 96)), (12, 16, 32, (96, 32))],
)
def test_neck_and_head_shapes(depth: int, patch: int, crop: int, size: tuple[int, int]) -> None:
    model = tiny(depth, patch, crop)
    x = torch.randn(2, 3, *size)
    h, w = size[0] // patch, size[1] // patch
    feats = model.features(x)
    assert [tuple(f.shape) for f in feats] == [(2, 32, h, w)] * 4
    levels = model.neck(feats)
    assert [tuple(f.shape[2:]) for f in levels] == [(4 * h, 4 * w), (2 * h, 2 * w), (h, w), (h // 2, w // 2)]
    logits, aux = model(x)
    assert logits.shape == (2, 5, 4 * h, 4 * w)  # stride patch / 4
    assert aux is not None and aux.shape == (2, 5, h, w)  # the auxiliary head on the third level
    model.eval()
    assert model(x)[1] is None  # no auxiliary head at inference
    odd = torch.randn(1, 3, size[0] + 5, size[1] + 3)  # any size: padded, then cropped back
    assert model.predict(odd).shape == (1, 5, size[0] + 5, size[1] + 3)


def test_position_table_is_resampled_bicubically_and_trained() -> None:
    enc = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2)  # 4 x 4 grid
    old = enc.pos_embed.detach().clone()
    model = SegmentationModel(enc, 3, crop_size=96, channels=8, aux_channels=0)  # 12 x 12 grid
    grid = old[:, 1:].reshape(1, 4, 4, 32).permute(0, 3, 1, 2)
    expected = F.interpolate(grid, size=(12, 12), mode="bicubic", align_corners=False)  # mmseg resize_pos_embed
    got = model.encoder.pos_embed
    assert got.requires_grad and got.shape == (1, 1 + 144, 32)
    assert torch.equal(got[:, :1], old[:, :1])
    torch.testing.assert_close(got[:, 1:], expected.permute(0, 2, 3, 1).reshape(1, 144, 32))
    assert isinstance(model.encoder.norm, nn.Identity) and model.auxiliary_head is None
    with pytest.raises(ValueError, match="multiple of 2 x patch"):
        SegmentationModel(
            VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2), 3, crop_size=72
        )


def test_features_equal_the_encoder_blocks_run_by_hand() -> None:
    model = tiny(depth=4, layer_scale=0.5).eval()
    enc = model.encoder
    assert all(blk.ls1.gamma.eq(0.5).all() for blk in enc.blocks)  # LayerScale added
    x = torch.randn(1, 3, 64, 64)
    tokens = enc.patch_embed.proj(x).flatten(2).transpose(1, 2) + enc.pos_embed[:, 1:]
    tokens = torch.cat([enc.cls_token + enc.pos_embed[:, :1], tokens], dim=1)
    outs = []
    for blk in enc.blocks:
        tokens = blk(tokens)
        outs.append(tokens[:, 1:].transpose(1, 2).reshape(1, 32, 8, 8))
    for got, b in zip(model.features(x), model.blocks, strict=True):
        torch.testing.assert_close(got, outs[b])


def test_slide_equals_whole_when_one_window_covers_the_image() -> None:
    model = tiny().eval()
    for size in ((64, 64), (40, 56), (64, 30)):  # the window (64) covers the image
        x = torch.randn(2, 3, *size)
        assert window_grid(*size, 64, 43) == (1, 1)
        with torch.no_grad():
            torch.testing.assert_close(slide_inference(model.predict, x, 5, crop=64, stride=43), model.predict(x))


def test_slide_windows_cover_every_pixel_and_average_overlaps() -> None:
    weight = torch.randn(4, 3, 1, 1)

    def pointwise(x: torch.Tensor) -> torch.Tensor:  # a per-pixel predictor: windows cannot change its output
        return F.conv2d(x, weight)

    x = torch.randn(1, 3, 100, 130)
    assert window_grid(100, 130, 64, 43) == (2, 3)
    torch.testing.assert_close(slide_inference(pointwise, x, 4, crop=64, stride=43), pointwise(x))
    calls: list[tuple[int, int, int, int]] = []

    def ones(x: torch.Tensor) -> torch.Tensor:
        calls.append(tuple(x.shape))  # type: ignore[arg-type]
        return torch.ones(x.shape[0], 1, *x.shape[2:])

    assert torch.equal(slide_inference(ones, x, 1, crop=64, stride=43), torch.ones(1, 1, 100, 130))
    assert calls == [(6, 3, 64, 64)]  # one batch of 6 windows; the last row/column is shifted back inside the image


def test_batched_windows_equal_mmsegmentations_window_by_window_loop() -> None:
    model = tiny().eval()
    x = torch.randn(2, 3, 100, 130)
    h_grids, w_grids = window_grid(100, 130, 64, 43)
    preds, count = torch.zeros(2, 5, 100, 130), torch.zeros(2, 1, 100, 130)
    with torch.no_grad():
        for h_idx in range(h_grids):  # mmseg EncoderDecoder.slide_inference, one window at a time
            for w_idx in range(w_grids):
                y1, x1 = h_idx * 43, w_idx * 43
                y2, x2 = min(y1 + 64, 100), min(x1 + 64, 130)
                y1, x1 = max(y2 - 64, 0), max(x2 - 64, 0)
                preds += F.pad(model.predict(x[:, :, y1:y2, x1:x2]), (x1, 130 - x2, y1, 100 - y2))
                count[:, :, y1:y2, x1:x2] += 1
        got = slide_inference(model.predict, x, 5, crop=64, stride=43)
    torch.testing.assert_close(got, preds / count, rtol=1e-5, atol=1e-5)


def test_loss_averages_over_all_pixels_ignored_included() -> None:
    logits, aux = torch.randn(2, 5, 8, 8), torch.randn(2, 5, 4, 4)
    labels = torch.randint(0, 5, (2, 16, 16))
    labels[0, :4] = 255
    loss = segmentation_loss(logits, labels, ignore_index=255, aux_logits=aux, aux_weight=0.4)

    def naive(x: torch.Tensor) -> torch.Tensor:
        up = F.interpolate(x, size=(16, 16), mode="bilinear", align_corners=False)
        logp = up.log_softmax(dim=1)
        total = torch.zeros(())
        for b in range(2):
            for i in range(16):
                for j in range(16):
                    if labels[b, i, j] != 255:
                        total -= logp[b, labels[b, i, j], i, j]
        return total / labels.numel()  # mmseg avg_non_ignore=False: divide by every pixel

    torch.testing.assert_close(loss, naive(logits) + 0.4 * naive(aux))


def test_spec_rebuilds_the_model() -> None:
    model = tiny(depth=3, layer_scale=1.0)
    rebuilt = build_from_spec(model_spec(model))
    rebuilt.load_state_dict(model.state_dict())  # strict
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt.eval().predict(x), model.eval().predict(x))


def mmseg_layer_id(name: str, num_layers: int) -> int:
    """mmsegmentation's get_layer_id_for_vit (names with our ``encoder.``/``blocks`` instead of ``backbone.layers``)."""
    if name in ("encoder.cls_token", "encoder.mask_token", "encoder.pos_embed") or name.startswith("encoder.patch_"):
        return 0
    if name.startswith("encoder.blocks."):
        return int(name.split(".")[2]) + 1
    return num_layers - 1


def test_layer_decay_groups_follow_mmsegmentation_exponents() -> None:
    depth, decay = 4, 0.65
    model = tiny(depth=depth, layer_scale=1.0)
    groups = layer_decay_groups(model, weight_decay=0.05, layer_decay=decay)
    names = {id(p): n for n, p in model.named_parameters()}
    by_name = {names[id(p)]: g for g in groups for p in g["params"]}
    assert by_name.keys() == {n for n, p in model.named_parameters() if p.requires_grad}
    assert sum(len(g["params"]) for g in groups) == len(by_name)  # every trainable parameter, once
    for name, g in by_name.items():
        p = model.get_parameter(name)
        lid = mmseg_layer_id(name, depth + 2)  # mmseg: num_layers = 12 + 2, scale decay ** (num_layers - id - 1)
        assert g["lr_scale"] == pytest.approx(decay ** (depth + 2 - lid - 1)), name
        exempt = p.ndim == 1 or name.endswith(".bias") or re.search(r"(pos_embed|cls_token)$", name)
        assert g["weight_decay"] == (0.0 if exempt else 0.05), name
    assert by_name["decode_head.conv_seg.weight"]["lr_scale"] == 1.0
    assert by_name["neck.upsample_4x.0.weight"]["weight_decay"] == 0.05  # conv weights decay
    assert by_name["neck.upsample_4x.1.weight"]["weight_decay"] == 0.0  # BatchNorm weights do not
    assert by_name["encoder.blocks.0.ls1.gamma"]["lr_scale"] == pytest.approx(decay**depth)
    assert by_name["encoder.pos_embed"]["lr_scale"] == pytest.approx(decay ** (depth + 1))
