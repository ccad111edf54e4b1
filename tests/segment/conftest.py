"""Generated image / label-map folders for the segmentation tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[2]


def write_pairs(
    images: Path,
    labels: Path,
    n: int,
    *,
    size: tuple[int, int] = (96, 64),
    values: int = 4,
    offset: int = 0,
    seed: int = 0,
    prefix: str = "img_",
) -> list[str]:
    """``n`` JPEG images and their 8-bit PNG label maps (``offset .. offset + values - 1``; image colour follows the
    label, so a model can learn something). Returns the stems."""
    images.mkdir(parents=True, exist_ok=True)
    labels.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    w, h = size
    colours = rng.integers(0, 256, (values, 3))
    stems = []
    for i in range(n):
        yy, xx = np.mgrid[0:h, 0:w]
        cx, cy = rng.integers(0, w), rng.integers(0, h)
        region = ((xx - cx) ** 2 // max(1, w // 3) + (yy - cy) ** 2 // max(1, h // 3) + i) % values
        pixels = np.clip(colours[region] + rng.integers(-20, 20, (h, w, 3)), 0, 255).astype(np.uint8)
        stem = f"{prefix}{i:04d}"
        Image.fromarray(pixels).save(images / f"{stem}.jpg", quality=92)
        Image.fromarray((region + offset).astype(np.uint8), mode="L").save(labels / f"{stem}.png")
        stems.append(stem)
    return stems
