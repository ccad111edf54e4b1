"""Semantic segmentation on a ViT encoder: multi-level features, the Feature2Pyramid neck, UperNet and an FCN head.

The model of the paper's ADE20K protocol (mmsegmentation's MAE + UperNet config,
``configs/mae/mae-base_upernet_8xb2-amp-160k_ade20k-512x512.py``), in our own compact code on torch:

* **Encoder**: our :class:`~milan.models.vit.VisionTransformer` at the segmentation resolution. Its position table is
  resampled (bicubic, as mmsegmentation's ``MAE.resize_abs_pos_embed``) to the crop's patch grid and trained; the
  final LayerNorm is dropped (mmsegmentation's MAE backbone has ``final_norm=False``); optional LayerScale gammas
  (``init_values=1.0`` in that config). The features after blocks 4, 6, 8 and 12 of 12 (:func:`feature_blocks`
  scales them to other depths), without the class token, become four ``(B, D, H/p, W/p)`` maps.
* **Neck** (:class:`Feature2Pyramid`): strides ``p/4, p/2, p, 2p`` (4, 8, 16, 32 for patch 16) from the four maps:
  ConvTranspose-BN-GELU-ConvTranspose / ConvTranspose / identity / max-pool.
* **Decode head** (:class:`UPerHead`): pyramid pooling (scales 1, 2, 3, 6) on the coarsest level plus an FPN over
  all four, fused by a 3x3 conv; Dropout2d 0.1 and a 1x1 classifier. Output at stride ``p/4``.
* **Auxiliary head** (:class:`FCNHead`): one 3x3 conv (256 channels) on the third level, dropout, classifier;
  its loss is weighted 0.4 (:func:`segmentation_loss`).

Conv-BN-ReLU blocks (:class:`ConvModule`) are initialised as mmcv's ``ConvModule`` (Kaiming normal, fan-out) and
the classifiers with N(0, 0.01), as mmsegmentation's ``BaseDecodeHead``. The state-dict names of the neck and the
heads are mmsegmentation's (``decode_head.psp_modules.0.1.conv.weight``, ...), so its weights load by name.

Inference (:func:`slide_inference`, :meth:`SegmentationModel.predict`) returns logits at the input resolution;
inputs of any size are padded to a multiple of ``2 x patch`` (the stride-``2p`` level) and the padding is cropped off.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers.layer_scale import LayerScale
from timm.layers.pos_embed import resample_abs_pos_embed
from torch.utils.checkpoint import checkpoint

from milan.models.vit import VisionTransformer


def feature_blocks(depth: int) -> tuple[int, int, int, int]:
    """The 0-based blocks feeding the neck: ``round(depth * k / 12) - 1`` (at least 0) for ``k`` in 4, 6, 8, 12.

    ViT-L's (7, 11, 15, 23) is mmsegmentation's index list; shallow encoders repeat blocks.

    Examples:
        >>> feature_blocks(12), feature_blocks(24), feature_blocks(4)
        ((3, 5, 7, 11), (7, 11, 15, 23), (0, 1, 2, 3))
    """
    a, b, c, d = (max(1, round(depth * k / 12)) - 1 for k in (4, 6, 8, 12))  # ViT-B's 1-based blocks 4, 6, 8, 12
    return a, b, c, d


class ConvModule(nn.Sequential):
    """Conv (no bias) -> BatchNorm -> ReLU, named and initialised as mmcv's ``ConvModule`` with a BN norm."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int) -> None:
        conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False)
        nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
        super().__init__(OrderedDict(conv=conv, bn=nn.BatchNorm2d(out_channels), activate=nn.ReLU(inplace=True)))


def _classifier(channels: int, num_classes: int) -> nn.Conv2d:
    conv = nn.Conv2d(channels, num_classes, kernel_size=1)
    nn.init.normal_(conv.weight, std=0.01)
    nn.init.constant_(conv.bias, 0.0)  # type: ignore[arg-type]
    return conv


def _resize(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Bilinear resize, ``align_corners=False`` (mmsegmentation's ``resize`` in UperNet)."""
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


class Feature2Pyramid(nn.Module):
    """Four same-stride ViT maps -> strides ``p/4, p/2, p, 2p`` (mmsegmentation's, rescales 4, 2, 1, 0.5)."""

    def __init__(self, embed_dim: int) -> None:
        super().__init__()
        self.upsample_4x = nn.Sequential(
            nn.ConvTranspose2d(embed_dim, embed_dim, kernel_size=2, stride=2),
            nn.BatchNorm2d(embed_dim),
            nn.GELU(),
            nn.ConvTranspose2d(embed_dim, embed_dim, kernel_size=2, stride=2),
        )
        self.upsample_2x = nn.Sequential(nn.ConvTranspose2d(embed_dim, embed_dim, kernel_size=2, stride=2))
        self.identity = nn.Identity()
        self.downsample_2x = nn.MaxPool2d(kernel_size=2, stride=2)

    def forward(self, features: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """4 x (B, D, h, w) -> (B, D, 4h, 4w), (B, D, 2h, 2w), (B, D, h, w), (B, D, h/2, w/2)."""
        ops = (self.upsample_4x, self.upsample_2x, self.identity, self.downsample_2x)
        return [op(x) for op, x in zip(ops, features, strict=True)]


class UPerHead(nn.Module):
    """UperNet decode head: PPM on the coarsest level + FPN, fused (mmsegmentation's ``UPerHead``).

    Args:
        in_channels: Channels of each level (finest first).
        channels: Width of the head (768 for ViT-B in the reference config).
    """

    def __init__(
        self,
        in_channels: Sequence[int],
        channels: int,
        num_classes: int,
        pool_scales: Sequence[int] = (1, 2, 3, 6),
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        top = in_channels[-1]
        self.psp_modules = nn.ModuleList(
            nn.Sequential(nn.AdaptiveAvgPool2d(scale), ConvModule(top, channels, 1)) for scale in pool_scales
        )
        self.bottleneck = ConvModule(top + len(pool_scales) * channels, channels, 3)
        self.lateral_convs = nn.ModuleList(ConvModule(c, channels, 1) for c in in_channels[:-1])
        self.fpn_convs = nn.ModuleList(ConvModule(channels, channels, 3) for _ in in_channels[:-1])
        self.fpn_bottleneck = ConvModule(len(in_channels) * channels, channels, 3)
        self.dropout = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()
        self.conv_seg = _classifier(channels, num_classes)

    def forward(self, inputs: Sequence[torch.Tensor]) -> torch.Tensor:
        """Levels finest first -> (B, num_classes, h0, w0) logits at the finest level's size."""
        laterals = [conv(inputs[i]) for i, conv in enumerate(self.lateral_convs)]
        top = inputs[-1]
        pooled = [_resize(ppm(top), top.shape[2:]) for ppm in self.psp_modules]  # PPM on the coarsest level
        laterals.append(self.bottleneck(torch.cat([top, *pooled], dim=1)))
        for i in range(len(laterals) - 1, 0, -1):  # top-down: add each level's upsampled coarser neighbour
            laterals[i - 1] = laterals[i - 1] + _resize(laterals[i], laterals[i - 1].shape[2:])
        outs = [conv(laterals[i]) for i, conv in enumerate(self.fpn_convs)]
        outs.append(laterals[-1])
        size = outs[0].shape[2:]
        fused = self.fpn_bottleneck(torch.cat([outs[0], *(_resize(o, size) for o in outs[1:])], dim=1))
        logits: torch.Tensor = self.conv_seg(self.dropout(fused))
        return logits


class FCNHead(nn.Module):
    """The auxiliary head: 3x3 ConvModule, dropout, 1x1 classifier (``FCNHead``, ``num_convs=1``, no concat)."""

    def __init__(self, in_channels: int, channels: int, num_classes: int, dropout: float = 0.1) -> None:
        super().__init__()
        self.convs = nn.Sequential(ConvModule(in_channels, channels, 3))
        self.dropout = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()
        self.conv_seg = _classifier(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_channels, h, w) -> (B, num_classes, h, w)."""
        logits: torch.Tensor = self.conv_seg(self.dropout(self.convs(x)))
        return logits


class SegmentationModel(nn.Module):
    """ViT encoder + Feature2Pyramid + UperNet (+ the auxiliary FCN head while training).

    Args:
        encoder: The (pretrained) encoder, built with the fine-tuning drop-path rate. Changed in place: its position
            table is resampled to ``crop_size`` and made trainable, its final norm removed, LayerScale added.
        crop_size: The training resolution (square); the position table's grid is ``crop_size / patch``.
        channels: UperNet width (default: the encoder width, 768 for ViT-B as in the reference).
        aux_channels: FCN head width (0: no auxiliary head).
        layer_scale: Initial LayerScale gamma added to every block (``None``: none; an encoder that has them keeps
            its own).
        blocks: 0-based blocks feeding the neck (default :func:`feature_blocks`).
    """

    def __init__(
        self,
        encoder: VisionTransformer,
        num_classes: int,
        *,
        crop_size: int,
        channels: int | None = None,
        aux_channels: int = 256,
        pool_scales: Sequence[int] = (1, 2, 3, 6),
        dropout: float = 0.1,
        layer_scale: float | None = None,
        blocks: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        dim, patch = encoder.embed_dim, encoder.patch_size
        if crop_size % (2 * patch):
            raise ValueError(f"crop_size {crop_size} must be a multiple of 2 x patch size ({2 * patch})")
        grid = (crop_size // patch, crop_size // patch)
        resampled = resample_abs_pos_embed(
            encoder.pos_embed.data, list(grid), list(encoder.grid_size), num_prefix_tokens=1, antialias=False
        )  # (1, 1 + gh * gw, D): bicubic, align_corners=False, as mmsegmentation resizes the pretrained table
        encoder.pos_embed = nn.Parameter(resampled, requires_grad=True)
        encoder.grid_size = grid
        encoder.num_patches = grid[0] * grid[1]
        encoder.norm = nn.Identity()
        if layer_scale is not None:
            for blk in encoder.blocks:
                for name in ("ls1", "ls2"):
                    if isinstance(getattr(blk, name), nn.Identity):
                        setattr(blk, name, LayerScale(dim, init_values=layer_scale))
        self.encoder = encoder
        self.blocks = tuple(feature_blocks(len(encoder.blocks)) if blocks is None else blocks)
        if len(self.blocks) != 4 or not all(0 <= b < len(encoder.blocks) for b in self.blocks):
            raise ValueError(f"need 4 block indices in [0, {len(encoder.blocks)}), got {list(self.blocks)}")
        self.crop_size = crop_size
        self.num_classes = num_classes
        self.neck = Feature2Pyramid(dim)
        self.decode_head = UPerHead([dim] * 4, channels or dim, num_classes, pool_scales, dropout)
        self.auxiliary_head = FCNHead(dim, aux_channels, num_classes, dropout) if aux_channels > 0 else None

    def features(self, images: torch.Tensor) -> list[torch.Tensor]:
        """(B, 3, H, W), H and W multiples of the patch size -> 4 x (B, D, H/p, W/p) block outputs.

        Another grid than the training one gets the position table resampled on the fly (bicubic).
        """
        enc = self.encoder
        x = enc.patch_embed.proj(images)  # (B, D, h, w)
        h, w = x.shape[2:]
        x = enc.patch_embed.norm(x.flatten(2).transpose(1, 2))  # (B, h * w, D)
        pos = enc.pos_embed
        if (h, w) != enc.grid_size:
            pos = resample_abs_pos_embed(pos, [h, w], list(enc.grid_size), num_prefix_tokens=1, antialias=False)
        x = torch.cat([(enc.cls_token + pos[:, :1]).expand(x.shape[0], -1, -1), x + pos[:, 1:]], dim=1)
        outs: list[torch.Tensor] = []
        for i, blk in enumerate(enc.blocks[: max(self.blocks) + 1]):
            if enc.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(blk, x, use_reentrant=False)
            else:
                x = blk(x)
            for _ in range(self.blocks.count(i)):
                outs.append(x[:, 1:].transpose(1, 2).reshape(x.shape[0], -1, h, w))  # (B, D, h, w)
        return outs

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Training forward pass on (B, 3, H, W) inputs, H and W multiples of twice the patch size.

        Returns:
            ``(logits at stride p/4, auxiliary logits at stride p or None)``; the auxiliary head runs only in
            training mode.
        """
        levels = self.neck(self.features(images))
        logits = self.decode_head(levels)
        aux = self.auxiliary_head(levels[2]) if self.auxiliary_head is not None and self.training else None
        return logits, aux

    def predict(self, images: torch.Tensor) -> torch.Tensor:
        """Logits at the input resolution for inputs of any size: (B, 3, H, W) -> (B, K, H, W).

        The input is padded at the bottom and right with zeros (the normalised mean colour, as mmsegmentation's
        data preprocessor pads) to a multiple of twice the patch size (the coarsest level's stride); the decode
        logits are resized bilinearly to the padded size and the padding is cropped off.
        """
        h, w = images.shape[2:]
        m = 2 * self.encoder.patch_size
        padded = F.pad(images, (0, -w % m, 0, -h % m))
        logits, _ = self(padded)
        return _resize(logits, padded.shape[2:])[:, :, :h, :w]


def segmentation_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    ignore_index: int,
    aux_logits: torch.Tensor | None = None,
    aux_weight: float = 0.4,
) -> torch.Tensor:
    """The decode + auxiliary cross-entropy of mmsegmentation (scalar, float32).

    Each head's (B, K, h, w) logits are resized bilinearly to the (B, H, W) labels' size; the per-pixel cross-entropy
    (0 at ignored pixels) is averaged over *all* pixels, ignored ones included (mmseg's ``avg_non_ignore=False``).
    """

    def ce(x: torch.Tensor) -> torch.Tensor:
        x = _resize(x.float(), labels.shape[1:])
        return F.cross_entropy(x, labels, ignore_index=ignore_index, reduction="none").mean()

    loss = ce(logits)
    if aux_logits is not None:
        loss = loss + aux_weight * ce(aux_logits)
    return loss


def slide_inference(
    predict: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor, num_classes: int, *, crop: int, stride: int
) -> torch.Tensor:
    """Sliding-window inference (mmsegmentation's): ``crop`` windows every ``stride`` pixels, averaged.

    The last window of a row or column is shifted back to end at the border; an image smaller than ``crop`` is one
    window of its own size. The windows run as one batch (mmsegmentation runs them one by one: the same numbers up to
    float rounding).

    ``predict``: (B, 3, h, w) -> (B, K, h, w) logits (e.g. :meth:`SegmentationModel.predict`). Returns (B, K, H, W)
    float32 logits of the (B, 3, H, W) images, each pixel the mean over the windows covering it.
    """
    b, _, h, w = images.shape
    rows, cols = window_grid(h, w, crop, stride)
    boxes = []
    for r in range(rows):
        for c in range(cols):
            y2, x2 = min(r * stride + crop, h), min(c * stride + crop, w)
            boxes.append((max(y2 - crop, 0), y2, max(x2 - crop, 0), x2))
    # Every window has the same size (the image's, where it is smaller than the crop): one batched pass over all.
    windows = torch.cat([images[:, :, y1:y2, x1:x2] for y1, y2, x1, x2 in boxes])  # (n * B, 3, crop, crop)
    logits = torch.split(predict(windows).float(), b)  # n x (B, K, crop, crop)
    total = images.new_zeros((b, num_classes, h, w), dtype=torch.float32)
    count = images.new_zeros((1, 1, h, w), dtype=torch.float32)
    for (y1, y2, x1, x2), window in zip(boxes, logits, strict=True):
        total[:, :, y1:y2, x1:x2] += window
        count[:, :, y1:y2, x1:x2] += 1
    return total / count


def model_spec(model: SegmentationModel) -> dict[str, Any]:
    """What :func:`build_from_spec` needs to rebuild ``model`` (plain data, stored in checkpoints)."""
    enc = model.encoder
    blk: Any = enc.blocks[0]
    return {
        "embed_dim": enc.embed_dim,
        "depth": len(enc.blocks),
        "num_heads": enc.num_heads,
        "patch_size": enc.patch_size,
        "mlp_ratio": blk.mlp.fc1.out_features / enc.embed_dim,
        "qkv_bias": blk.attn.qkv.bias is not None,
        "norm_eps": blk.norm1.eps,
        "layer_scale": not isinstance(blk.ls1, nn.Identity),
        "crop_size": model.crop_size,
        "num_classes": model.num_classes,
        "channels": model.decode_head.conv_seg.in_channels,
        "aux_channels": model.auxiliary_head.conv_seg.in_channels if model.auxiliary_head is not None else 0,
        "pool_scales": [int(s[0].output_size) for s in model.decode_head.psp_modules],  # type: ignore[index]
        "blocks": list(model.blocks),
    }


def build_from_spec(spec: dict[str, Any]) -> SegmentationModel:
    """An (untrained) :class:`SegmentationModel` of the architecture ``spec`` describes (load its weights next)."""
    shape = ("patch_size", "embed_dim", "depth", "num_heads", "mlp_ratio", "qkv_bias", "norm_eps")
    encoder = VisionTransformer(img_size=int(spec["crop_size"]), **{k: spec[k] for k in shape})
    return SegmentationModel(
        encoder, int(spec["num_classes"]), crop_size=int(spec["crop_size"]), channels=int(spec["channels"]),
        aux_channels=int(spec["aux_channels"]), pool_scales=[int(s) for s in spec["pool_scales"]],
        layer_scale=1.0 if spec["layer_scale"] else None, blocks=[int(b) for b in spec["blocks"]],
    )  # fmt: skip


def window_grid(height: int, width: int, crop: int, stride: int) -> tuple[int, int]:
    """(rows, columns) of the windows :func:`slide_inference` runs on an image of this size."""
    return max(height - crop + stride - 1, 0) // stride + 1, max(width - crop + stride - 1, 0) // stride + 1
