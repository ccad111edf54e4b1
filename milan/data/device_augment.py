"""The pretraining view on the training device: random resized crop + flip + normalise, per-sample seeded.

Each image's random choices come from its own :class:`torch.Generator` seeded with the sample's seed, and are the
draws torchvision makes, in the same order: :meth:`torchvision.transforms.RandomResizedCrop.get_params` (10 tries,
then the central crop) then ``RandomHorizontalFlip`` (flip when ``rand < p``). A generator seeded with ``s`` gives
the same numbers as the global generator after ``torch.manual_seed(s)``, so the crop box and the flip equal the
CPU path's for the same seed (the CPU path may decode through JPEG draft mode and resamples with Pillow, so the
pixels differ slightly).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as F

from milan.models.teacher import IMAGENET_MEAN, IMAGENET_STD

CropBox = tuple[int, int, int, int]
"""``(top, left, height, width)``, torchvision's order."""


def random_crop_box(
    height: int,
    width: int,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    generator: torch.Generator,
) -> CropBox:
    """The crop box of torchvision's ``RandomResizedCrop.get_params``, drawn from ``generator`` (not the global one).

    Args:
        height: Image height.
        width: Image width.
        scale: Range of the crop area as a fraction of the image area.
        ratio: Range of the crop aspect ratio (width / height).
        generator: A CPU generator.

    Returns:
        The crop box ``(top, left, height, width)``.
    """
    area = height * width
    log_ratio = torch.log(torch.tensor(ratio))
    for _ in range(10):
        target_area = area * torch.empty(1).uniform_(scale[0], scale[1], generator=generator).item()
        aspect = math.exp(torch.empty(1).uniform_(log_ratio[0].item(), log_ratio[1].item(), generator=generator).item())
        w = round(math.sqrt(target_area * aspect))
        h = round(math.sqrt(target_area / aspect))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, size=(1,), generator=generator).item())
            left = int(torch.randint(0, width - w + 1, size=(1,), generator=generator).item())
            return top, left, h, w
    in_ratio = width / height  # fallback: the central crop, clamped to the ratio range
    if in_ratio < min(ratio):
        w, h = width, round(width / min(ratio))
    elif in_ratio > max(ratio):
        w, h = round(height * max(ratio)), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


@dataclass(frozen=True)
class DeviceAugment:
    """RandomResizedCrop + RandomHorizontalFlip + ToTensor + Normalize of decoded uint8 images, on their device.

    Attributes:
        size: Output side length.
        scale: RandomResizedCrop area range.
        ratio: RandomResizedCrop aspect-ratio range.
        interpolation: ``"bicubic"`` or ``"bilinear"`` (antialiased).
        hflip: Probability of a horizontal flip.
        mean: Normalisation mean, RGB.
        std: Normalisation std, RGB.
    """

    size: int
    scale: tuple[float, float] = (0.2, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    interpolation: str = "bicubic"
    hflip: float = 0.5
    mean: tuple[float, ...] = tuple(IMAGENET_MEAN)
    std: tuple[float, ...] = tuple(IMAGENET_STD)

    def view(self, image: torch.Tensor, seed: int) -> torch.Tensor:
        """One image's crop and flip: ``(3, H, W)`` uint8 -> ``(3, size, size)`` uint8, on the same device."""
        g = torch.Generator().manual_seed(seed)
        top, left, h, w = random_crop_box(image.shape[-2], image.shape[-1], self.scale, self.ratio, g)
        mode = InterpolationMode(self.interpolation.lower())
        size = [self.size, self.size]
        out: torch.Tensor = F.resized_crop(image, top, left, h, w, size, interpolation=mode, antialias=True)
        if torch.rand(1, generator=g).item() < self.hflip:
            out = F.horizontal_flip(out)
        return out

    def __call__(self, images: Sequence[torch.Tensor], seeds: Sequence[int]) -> torch.Tensor:
        """Augments and normalises a batch.

        Args:
            images: ``(3, H, W)`` uint8 RGB images (sizes may differ), all on one device.
            seeds: One seed per image.

        Returns:
            ``(B, 3, size, size)`` float32 on the images' device (``(0, 3, size, size)`` for no images).
        """
        if not images:
            return torch.empty(0, 3, self.size, self.size)
        device = images[0].device
        with torch.autocast(device.type, enabled=False):  # resampling in fp32 whatever the run's autocast
            views = torch.stack([self.view(img, s) for img, s in zip(images, seeds, strict=True)])  # (B, 3, S, S)
            mean = torch.tensor(self.mean, device=device).view(1, 3, 1, 1)
            std = torch.tensor(self.std, device=device).view(1, 3, 1, 1)
            return (views.float() / 255 - mean) / std  # (B, 3, S, S)
