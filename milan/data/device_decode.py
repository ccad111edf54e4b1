"""Batched image decoding on the training device (nvJPEG on CUDA), with every failure classified, not raised.

:func:`decode_on_device` decodes a batch of encoded files:

1. with ``max_pixels``, every header is parsed first (Pillow, no pixel decoding) so that empty files, non-images
   and oversized images are skipped before any pixels are allocated;
2. the JPEGs (by signature) are decoded in **one** :func:`torchvision.io.decode_jpeg` call on ``device``
   (batched nvJPEG on CUDA, libjpeg-turbo on CPU); if that call rejects the batch, each JPEG is retried alone;
3. everything else (PNG, WebP, BMP, and JPEGs the device decoder rejects) is decoded on the CPU by
   :func:`milan.data.decode.decode_rgb` -- the CPU path's own decoder, so transparency, 16-bit and palette images
   get exactly the CPU path's RGB, and a file that fails there gets the CPU path's skip reason -- then moved to
   ``device``.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
import torch
from torchvision.io import ImageReadMode
from torchvision.io import decode_jpeg as _tv_decode_jpeg

from milan.data.decode import BadSample, ImageDecodeError, decode_rgb, open_image

JPEG_SIGNATURE = b"\xff\xd8\xff"

DecodeResult = torch.Tensor | BadSample
"""One decoded image, ``(3, H, W)`` uint8 RGB on the device, or the reason it was skipped."""


def _is_jpeg(data: torch.Tensor) -> bool:
    return data.numel() >= 3 and bytes(data[:3].tolist()) == JPEG_SIGNATURE


def _decode_cpu(data: torch.Tensor, path: str, device: torch.device) -> DecodeResult:
    """The CPU path's decoder (Pillow); ``(3, H, W)`` uint8 on ``device`` or a :class:`BadSample`."""
    try:
        rgb = decode_rgb(data.numpy().tobytes(), max_pixels=None)
    except ImageDecodeError as err:
        return BadSample(path, err.reason, err.detail)
    pixels = torch.from_numpy(np.array(rgb, dtype=np.uint8))  # (H, W, 3)
    return pixels.permute(2, 0, 1).contiguous().to(device)  # (3, H, W)


def decode_jpeg(data: torch.Tensor | list[torch.Tensor], device: torch.device) -> torch.Tensor | list[torch.Tensor]:
    """``torchvision.io.decode_jpeg`` to RGB, without its per-call deprecation warning.

    torchvision >= 0.29 points to TorchCodec instead, which is not a dependency here.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*image decoding and encoding capabilities", DeprecationWarning)
        out: torch.Tensor | list[torch.Tensor] = _tv_decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
    return out


def _decode_jpegs(datas: list[torch.Tensor], device: torch.device) -> list[torch.Tensor | None]:
    """Decodes JPEGs in one batched call; ``None`` where a JPEG is rejected even on its own."""
    try:
        return list(decode_jpeg(datas, device))
    except RuntimeError:  # the batch holds at least one damaged file: find it
        pass
    out: list[torch.Tensor | None] = []
    for data in datas:
        try:
            out.append(decode_jpeg(data, device))  # type: ignore[arg-type]
        except RuntimeError:
            out.append(None)
    return out


def decode_on_device(
    datas: Sequence[torch.Tensor],
    paths: Sequence[str],
    device: torch.device,
    *,
    max_pixels: int | None = None,
) -> list[DecodeResult]:
    """Decodes a batch of encoded images on ``device`` (see the module docstring for the order of attempts).

    Args:
        datas: The files' bytes, each a 1-D ``uint8`` CPU tensor.
        paths: The files' paths (or keys), for the skip reports; as long as ``datas``.
        device: Where the decoded images go (CUDA: decoded there by nvJPEG).
        max_pixels: Skip images with more pixels as ``"too large"`` after a header-only parse (``None``: no
            header check, e.g. when the DataLoader workers already did it).

    Returns:
        Per input, in order: a ``(3, H, W)`` uint8 RGB tensor on ``device``, or a :class:`BadSample`.
    """
    if len(datas) != len(paths):
        raise ValueError(f"got {len(datas)} images but {len(paths)} paths")
    results: list[DecodeResult | None] = [None] * len(datas)
    jpegs: list[int] = []
    for i, (data, path) in enumerate(zip(datas, paths, strict=True)):
        if max_pixels is not None:
            try:
                open_image(data.numpy().tobytes(), max_pixels=max_pixels)
            except ImageDecodeError as err:
                results[i] = BadSample(path, err.reason, err.detail)
                continue
        if _is_jpeg(data):
            jpegs.append(i)
    if jpegs:
        for i, image in zip(jpegs, _decode_jpegs([datas[i] for i in jpegs], device), strict=True):
            results[i] = image
    return [
        result if result is not None else _decode_cpu(datas[i], paths[i], device) for i, result in enumerate(results)
    ]
