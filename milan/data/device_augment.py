"""The pretraining view on the training device: random resized crop + flip + normalise, per-sample seeded.

Each image's random choices are torchvision's own draws seeded with the sample's seed, in the CPU path's order:
:meth:`torchvision.transforms.RandomResizedCrop.get_params` then the flip (``rand < p``), so the crop box and the
flip equal the CPU path's for the same seed (the CPU path may decode through JPEG draft mode and resamples with
Pillow, so the pixels differ slightly).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torchvision.transforms import InterpolationMode, RandomResizedCrop
from torchvision.transforms.v2 import functional as F

from milan.models.teacher import IMAGENET_MEAN, IMAGENET_STD

CropBox = tuple[int, int, int, int]
"""``(top, left, height, width)``, torchvision's order."""


def view_params(
    height: int, width: int, scale: tuple[float, float], ratio: tuple[float, float], hflip: float, seed: int
) -> tuple[CropBox, bool]:
    """The crop box and flip of a sample seeded with ``seed``: the CPU path's draws, made by torchvision itself.

    ``RandomResizedCrop.get_params`` and then the flip draw run on the global generator seeded with ``seed`` inside
    :func:`torch.random.fork_rng`, so the caller's random state is left as it was.

    Args:
        height: Image height.
        width: Image width.
        scale: Range of the crop area as a fraction of the image area.
        ratio: Range of the crop aspect ratio (width / height).
        hflip: Probability of a horizontal flip.
        seed: The sample's seed.

    Returns:
        ``((top, left, height, width), flip)``.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        top, left, h, w = RandomResizedCrop.get_params(torch.empty(0, height, width), list(scale), list(ratio))
        flip = torch.rand(1).item() < hflip
    return (top, left, h, w), flip


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
        height, width = image.shape[-2:]
        (top, left, h, w), flip = view_params(height, width, self.scale, self.ratio, self.hflip, seed)
        mode = InterpolationMode(self.interpolation.lower())
        size = [self.size, self.size]
        out: torch.Tensor = F.resized_crop(image, top, left, h, w, size, interpolation=mode, antialias=True)
        if flip:
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
