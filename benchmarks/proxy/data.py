"""The proxy's data: CIFAR-10 and the Tiny-ImageNet subset, unpacked once and decoded once (cached as tensors).

* ``../shared/data/cifar10_jpg/{train,test}.tar.gz``: 32 x 32 JPEGs, ``<split>/<class>/NNNN.jpg``;
* ``../shared/data/tiny_imagenet_subset/train100.tar.gz``: 64 x 64 JPEGs, ``train/<wnid>/images/*.JPEG``,
  202 classes x 100 images.

Subsets are the first ``per_class`` images of every class in natural name order (the same files everywhere), unpacked
by :func:`milan.data.extract_archive_subset` under ``$MILAN_CACHE/proxy`` (default ``~/.cache/milan/proxy``). The
pretraining jobs read the unpacked JPEG folders through the library's own data pipeline. Everything else (the
evaluation images and the teacher's training images) is decoded once into ``uint8`` tensors, cached next to the
folders (``tensors/*.pt``) and augmented in batches (:func:`random_resized_crop`), so no JPEG is decoded twice.
"""

from __future__ import annotations

import hashlib
import math
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torchvision.transforms import InterpolationMode, v2

from milan.checkpoint.io import CheckpointError, atomic_save, safe_load
from milan.data import ImagePipeline, build_dataset, build_loader, default_cache_dir, extract_archive_subset
from milan.data.transforms import ResizeDecode

REPO = Path(__file__).resolve().parents[2]
DEFAULT_DATA = next(
    (p for p in (REPO.parent / "shared" / "data", Path("/work/shared/data")) if p.is_dir()),
    REPO.parent / "shared" / "data",
)  # ../shared/data next to the repository; the team's shared folder when run from a clone elsewhere (CI)
CACHE_VERSION = 1  # bump when the decoding below changes


def data_dir(given: str | os.PathLike[str] | None) -> Path:
    """The shared data folder: ``given``, else ``$MILAN_PROXY_DATA``, else ``../shared/data`` next to the repo."""
    path = Path(given or os.environ.get("MILAN_PROXY_DATA") or DEFAULT_DATA).expanduser()
    missing = [
        p for p in (cifar_archive(path, "train"), cifar_archive(path, "test"), tiny_archive(path)) if not p.is_file()
    ]
    if missing:
        raise FileNotFoundError(f"proxy data not found: {', '.join(map(str, missing))} (pass --data DIR)")
    return path


def cifar_archive(root: Path, split: str) -> Path:
    return root / "cifar10_jpg" / f"{split}.tar.gz"


def tiny_archive(root: Path) -> Path:
    return root / "tiny_imagenet_subset" / "train100.tar.gz"


def cache_root() -> Path:
    return default_cache_dir() / "proxy"


def unpack(archive: Path, name: str, per_class: int | None) -> Path:
    """Unpacks (or reuses) the first ``per_class`` images of each class: an ImageFolder tree."""
    return extract_archive_subset(archive, cache_root() / f"{name}-{per_class or 'all'}", per_class=per_class)


def cifar_root(root: Path, split: str, per_class: int | None) -> Path:
    return unpack(cifar_archive(root, split), f"cifar10-{split}", per_class)


def tiny_root(root: Path, per_class: int | None) -> Path:
    return unpack(tiny_archive(root), "tinyimagenet-train100", per_class)


# ----------------------------------------------------------------------------------------------------------------
# Decoding once: uint8 tensors


def uint8_pipeline(img_size: int) -> ImagePipeline:
    """:func:`milan.data.eval_transform` (``crop_pct=1``) without its float conversion: ``(3, S, S)`` uint8.

    ``normalize(uint8_pipeline(S)(img))`` equals ``eval_transform(S, crop_pct=1.0)(img)`` exactly (tests/proxy).
    """
    transform = v2.Compose(
        [
            v2.Resize(img_size, interpolation=InterpolationMode.BICUBIC, antialias=True),
            v2.CenterCrop(img_size),
            v2.ToImage(),
            v2.ToPureTensor(),
        ]
    )
    return ImagePipeline(transform=transform, decode=ResizeDecode(img_size))


def normalize(images: torch.Tensor) -> torch.Tensor:
    """uint8 ``(N, 3, H, W)`` -> ImageNet-normalised float32, as the library's transforms produce them."""
    mean = torch.tensor(IMAGENET_DEFAULT_MEAN, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_DEFAULT_STD, device=images.device).view(1, 3, 1, 1)
    return (images.float() / 255.0 - mean) / std


def folder_tensors(folder: Path, img_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """An ImageFolder tree decoded once at ``img_size`` (cached under ``<cache>/proxy/tensors``).

    Returns:
        ``(N, 3, S, S)`` uint8 images and ``(N,)`` int64 labels, in the dataset's order (class, then natural name).

    Raises:
        RuntimeError: Some image could not be decoded (the shared data is expected to be clean).
    """
    dataset = build_dataset(folder, uint8_pipeline(img_size), labelled=True)
    listing = "\n".join(f"{p.relative_to(folder)}\t{label}\t{p.stat().st_size}" for p, label in dataset.samples)
    key = hashlib.sha256(f"v{CACHE_VERSION}\n{img_size}\n{listing}".encode()).hexdigest()
    path = cache_root() / "tensors" / f"{folder.name}-{img_size}px.pt"
    if path.is_file():
        try:
            cached = safe_load(path)
            if isinstance(cached, dict) and cached.get("key") == key:
                return cached["images"], cached["labels"]
        except CheckpointError:
            pass  # unreadable (e.g. interrupted by another version): decode again
    images, labels = [], []
    for batch in build_loader(dataset, 500, num_workers=0, pin_memory=False):
        if batch.skipped:
            raise RuntimeError(f"unreadable images in the proxy data: {[s.path for s in batch.skipped][:5]}")
        images.append(batch.images)
        labels.append(batch.labels)
    out = torch.cat(images), torch.cat(labels)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_save({"key": key, "images": out[0], "labels": out[1]}, path)
    return out


def cifar_eval_tensors(
    root: Path, split: str, per_class: int | None, img_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """CIFAR-10 ``split`` through the evaluation transform (no crop at 32 px): normalised float32 and labels."""
    images, labels = folder_tensors(cifar_root(root, split, per_class), img_size)
    return normalize(images), labels


def split_per_class(labels: torch.Tensor, holdout: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices of a labelled set split into train and held-out parts: the last ``holdout`` items of every class."""
    train, held = [], []
    for c in labels.unique(sorted=True).tolist():
        indices = (labels == c).nonzero().flatten()
        cut = len(indices) - holdout if holdout < len(indices) else len(indices)
        train.append(indices[:cut])
        held.append(indices[cut:])
    return torch.cat(train), torch.cat(held)


def subset_per_class(labels: torch.Tensor, per_class: int | None) -> torch.Tensor:
    """Indices of the first ``per_class`` items of every class (all of them for ``None``)."""
    if per_class is None:
        return torch.arange(len(labels))
    return torch.cat([(labels == c).nonzero().flatten()[:per_class] for c in labels.unique(sorted=True).tolist()])


# ----------------------------------------------------------------------------------------------------------------
# Batched augmentation on cached tensors


def random_resized_crop(
    images: torch.Tensor,
    out_size: int,
    *,
    scale: tuple[float, float],
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    hflip: float = 0.5,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """A batched RandomResizedCrop + horizontal flip of uint8 images, returned ImageNet-normalised.

    Each image gets its own crop: area fraction ``U(scale)``, log aspect ratio ``U(log ratio)`` (torchvision's
    distribution; a box larger than the image is shrunk to fit instead of re-drawn), a uniform position, and a flip
    with probability ``hflip``. The crop is resampled bilinearly at twice ``out_size`` and then averaged 2 x 2, an
    anti-aliased reduction for sources up to twice ``out_size`` (Tiny-ImageNet's 64 px to 32 px).

    Args:
        images: ``(B, 3, H, W)`` uint8.
        out_size: Output side length.
        scale: Crop area range, as fractions of the image area.
        ratio: Crop aspect-ratio (width / height) range.
        hflip: Flip probability.
        generator: Random source (a CPU generator, whatever the images' device).

    Returns:
        ``(B, 3, out_size, out_size)`` float32, ImageNet-normalised.
    """
    b = images.shape[0]
    u = torch.rand(b, 4, generator=generator)  # area, log-ratio, x position, y position
    flip = torch.rand(b, generator=generator) < hflip
    area = scale[0] + (scale[1] - scale[0]) * u[:, 0]
    log_r = math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * u[:, 1]
    aspect = log_r.exp()
    w = (area * aspect).sqrt().clamp(max=1.0)  # fractions of the side
    h = (area / aspect).sqrt().clamp(max=1.0)
    cx = (w - 1) + (2 - 2 * w) * u[:, 2]  # crop centre in [-1 + w, 1 - w] (normalised coordinates)
    cy = (h - 1) + (2 - 2 * h) * u[:, 3]
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0] = torch.where(flip, -w, w)
    theta[:, 0, 2] = cx
    theta[:, 1, 1] = h
    theta[:, 1, 2] = cy
    theta = theta.to(images.device)  # the random draws stay on the CPU generator; the resampling runs where images are
    x = normalize(images)
    grid = F.affine_grid(theta, [b, 3, 2 * out_size, 2 * out_size], align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    return F.avg_pool2d(x, 2)  # (B, 3, out_size, out_size)


def resize(images: torch.Tensor, out_size: int) -> torch.Tensor:
    """Whole uint8 images resized (bicubic, anti-aliased) to ``out_size``, ImageNet-normalised."""
    x = normalize(images)
    if x.shape[-1] == out_size and x.shape[-2] == out_size:
        return x
    return F.interpolate(x, size=(out_size, out_size), mode="bicubic", antialias=True, align_corners=False)
