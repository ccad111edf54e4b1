"""``data.decode: device``: the workers read the files, the training device decodes and augments them.

The DataLoader workers only read each file, parse its header (Pillow, no pixels: empty, non-image and oversized files
are skipped there, as on the CPU path) and draw the sample's augmentation seed (:class:`EncodedImages`; from the
global ``torch`` generator, which :class:`milan.data.sampling.SeededSamples` seeds per ``(seed, epoch, index)``, so
every crop and flip is reproducible on resume and independent of workers and processes). :func:`collate_encoded`
packs a batch's files back to back in one ``uint8`` tensor (one shared-memory block per batch). In the main process
:func:`decode_batch` decodes them (:func:`decode_on_device`) and applies the view (:class:`DeviceAugment`):

1. the JPEGs (by signature) in **one** :func:`torchvision.io.decode_jpeg` call on the device (batched nvJPEG on CUDA,
   libjpeg-turbo on CPU); if that call rejects the batch, each JPEG is retried alone;
2. everything else (PNG, WebP, BMP, JPEGs the device decoder rejects) on the CPU by the CPU path's own decoder
   (:func:`milan.data.decode.decode_rgb`: the same RGB for transparency, 16-bit and palette images, the same skip
   reason for a damaged file), then moved to the device;
3. the crop box and flip are torchvision's own draws seeded with the sample's seed, in the CPU path's order
   (``RandomResizedCrop.get_params``, then ``rand < p``): the CPU path's boxes and flips for the same seed (its
   pixels differ slightly: it may draft, and resamples with Pillow).
"""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch.utils.data import Dataset
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as F

from milan.data.datasets import ImageDataset
from milan.data.decode import BadSample, ImageDecodeError, decode_rgb, open_file, open_image
from milan.data.report import Batch
from milan.data.transforms import crop_box
from milan.errors import ConfigError

CropBox = tuple[int, int, int, int]  # (top, left, height, width), torchvision's order
DecodeResult = torch.Tensor | BadSample  # (3, H, W) uint8 RGB on the device, or why it was skipped
EncodedItem = tuple[bytes, int, str, int] | BadSample  # (the encoded file, its augmentation seed, path, label)


class EncodedImages(Dataset[EncodedItem]):
    """The files of an :class:`~milan.data.datasets.ImageDataset`, read and header-checked but not decoded."""

    def __init__(self, images: Dataset[Any]) -> None:
        if not isinstance(images, ImageDataset):
            raise ConfigError("data.decode='device' does not support tar shards; use data.decode=cpu")
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> EncodedItem:
        path, label = self.images.samples[index]
        opened = open_file(path, self.images.max_pixels)  # the header only
        if isinstance(opened, BadSample):
            return opened
        return opened[0], int(torch.randint(1 << 62, (1,)).item()), str(path), label


@dataclass
class EncodedBatch:
    """A batch of encoded files plus the samples the workers already skipped."""

    data: torch.Tensor  # (N,) uint8, the files back to back
    offsets: list[int]  # B + 1 byte offsets: file i is data[offsets[i]:offsets[i + 1]]
    seeds: list[int]  # B augmentation seeds
    paths: list[str]
    labels: torch.Tensor  # (B,) int64
    skipped: tuple[BadSample, ...] = ()

    def __len__(self) -> int:
        return len(self.seeds)


def collate_encoded(items: Sequence[EncodedItem]) -> EncodedBatch:
    """DataLoader ``collate_fn`` for :class:`EncodedImages`: packs the files, keeps the bad samples aside."""
    good = [item for item in items if not isinstance(item, BadSample)]
    datas, seeds, paths, labels = zip(*good, strict=True) if good else ((), (), (), ())
    packed = bytearray(b"".join(datas))
    return EncodedBatch(
        data=torch.frombuffer(packed, dtype=torch.uint8) if packed else torch.empty(0, dtype=torch.uint8),  # (N,)
        offsets=[0, *itertools.accumulate(len(data) for data in datas)],
        seeds=list(seeds),
        paths=list(paths),
        labels=torch.tensor(labels, dtype=torch.long),  # (B,)
        skipped=tuple(item for item in items if isinstance(item, BadSample)),
    )


def _decode_cpu(data: torch.Tensor, path: str, device: torch.device) -> DecodeResult:
    try:
        rgb = decode_rgb(data.numpy().tobytes(), max_pixels=None)
    except ImageDecodeError as err:
        return err.skip(path)
    pixels = torch.from_numpy(np.array(rgb, dtype=np.uint8))  # (H, W, 3)
    return pixels.permute(2, 0, 1).contiguous().to(device)  # (3, H, W)


def _decode_jpegs(datas: list[torch.Tensor], device: torch.device) -> list[torch.Tensor | None]:
    """JPEGs decoded to RGB in one batched call; ``None`` where one is rejected even on its own.

    torchvision >= 0.29 warns on every call (it points to TorchCodec, which is not a dependency here): silenced.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*image decoding and encoding capabilities", DeprecationWarning)
        try:
            return list(decode_jpeg(datas, mode=ImageReadMode.RGB, device=device))
        except RuntimeError:  # the batch holds at least one damaged file: find it
            pass
        out: list[torch.Tensor | None] = []
        for data in datas:
            try:
                out.append(decode_jpeg(data, mode=ImageReadMode.RGB, device=device))
            except RuntimeError:
                out.append(None)
    return out


def decode_on_device(
    datas: Sequence[torch.Tensor], paths: Sequence[str], device: torch.device, *, max_pixels: int | None = None
) -> list[DecodeResult]:
    """Decodes a batch of encoded images on ``device`` (the order of attempts is in the module docstring).

    Args:
        datas: The files, each a 1-D ``uint8`` CPU tensor.
        paths: The files' paths (or keys), for the skip reports.
        device: Where the decoded images go (CUDA: decoded there by nvJPEG).
        max_pixels: Skip images with more pixels as ``"too large"`` after a header-only parse (``None``: no
            header check, e.g. when the DataLoader workers did it).

    Returns:
        Per input, in order: a ``(3, H, W)`` uint8 RGB tensor on ``device``, or a :class:`BadSample`.
    """
    results: list[DecodeResult | None] = [None] * len(datas)
    jpegs: list[int] = []
    for i, (data, path) in enumerate(zip(datas, paths, strict=True)):
        if max_pixels is not None:
            try:
                open_image(data.numpy().tobytes(), max_pixels=max_pixels)
            except ImageDecodeError as err:
                results[i] = err.skip(path)
                continue
        if data.numel() >= 3 and bytes(data[:3].tolist()) == b"\xff\xd8\xff":  # a JPEG
            jpegs.append(i)
    for i, image in zip(jpegs, _decode_jpegs([datas[i] for i in jpegs], device) if jpegs else [], strict=True):
        results[i] = image
    return [r if r is not None else _decode_cpu(datas[i], paths[i], device) for i, r in enumerate(results)]


def view_params(
    height: int, width: int, scale: tuple[float, float], ratio: tuple[float, float], hflip: float, seed: int
) -> tuple[CropBox, bool]:
    """The crop box and flip of a sample seeded with ``seed``: the CPU path's draws, made by torchvision itself.

    They run on the global generator seeded with ``seed`` inside :func:`torch.random.fork_rng`: the caller's random
    state is left as it was.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        box = crop_box(width, height, scale, ratio)
        flip = torch.rand(1).item() < hflip
    return box, flip


@dataclass(frozen=True)
class DeviceAugment:
    """RandomResizedCrop + RandomHorizontalFlip + ToTensor + Normalize of decoded uint8 images, on their device."""

    size: int
    scale: tuple[float, float] = (0.2, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    interpolation: str = "bicubic"  # or "bilinear" (antialiased)
    hflip: float = 0.5
    mean: tuple[float, ...] = IMAGENET_DEFAULT_MEAN
    std: tuple[float, ...] = IMAGENET_DEFAULT_STD

    def view(self, image: torch.Tensor, seed: int) -> torch.Tensor:
        """One image's crop and flip: ``(3, H, W)`` uint8 -> ``(3, size, size)`` uint8, on the same device."""
        height, width = image.shape[-2:]
        (top, left, h, w), flip = view_params(height, width, self.scale, self.ratio, self.hflip, seed)
        mode = InterpolationMode(self.interpolation.lower())
        out: torch.Tensor = F.resized_crop(image, top, left, h, w, [self.size] * 2, interpolation=mode, antialias=True)
        return F.horizontal_flip(out) if flip else out

    def __call__(self, images: Sequence[torch.Tensor], seeds: Sequence[int]) -> torch.Tensor:
        """``(3, H, W)`` uint8 images (at least one; sizes may differ, one device) -> ``(B, 3, S, S)`` float32 views."""
        device = images[0].device
        with torch.autocast(device.type, enabled=False):  # resampling in fp32 whatever the run's autocast
            views = torch.stack([self.view(img, s) for img, s in zip(images, seeds, strict=True)])  # (B, 3, S, S)
            mean = torch.tensor(self.mean, device=device).view(1, 3, 1, 1)
            std = torch.tensor(self.std, device=device).view(1, 3, 1, 1)
            return (views.float() / 255 - mean) / std


def decode_batch(batch: EncodedBatch, augment: DeviceAugment, device: torch.device) -> tuple[Batch, torch.Tensor]:
    """Decodes and augments a batch on ``device`` (CUDA: nvJPEG).

    Returns:
        ``(Batch, keep)``: the decodable images (``(B_ok, 3, S, S)`` float32 on ``device``; ``skipped``: the
        workers' plus the undecodable files) and the ``(B,)`` bool mask of the files kept, to select their rows of
        per-sample tensors such as the mask noise.
    """
    files = [batch.data[a:b] for a, b in zip(batch.offsets[:-1], batch.offsets[1:], strict=True)]  # (N_i,) views
    decoded = decode_on_device(files, batch.paths, device)
    keep = torch.tensor([not isinstance(d, BadSample) for d in decoded], dtype=torch.bool)  # (B,)
    images = [d for d in decoded if not isinstance(d, BadSample)]
    seeds = [s for s, d in zip(batch.seeds, decoded, strict=True) if not isinstance(d, BadSample)]
    failed = tuple(d for d in decoded if isinstance(d, BadSample))
    views = augment(images, seeds) if images else torch.empty(0, 3, 0, 0, device=device)  # (B_ok, 3, S, S)
    return Batch(images=views, labels=batch.labels[keep].to(device), skipped=batch.skipped + failed), keep
