"""The proxy's data: CIFAR-10 and the Tiny-ImageNet subset, unpacked once (cached) through ``milan.data``.

* ``../shared/data/cifar10_jpg/{train,test}.tar.gz``: 32 x 32 JPEGs, ``<split>/<class>/NNNN.jpg``;
* ``../shared/data/tiny_imagenet_subset/train100.tar.gz``: 64 x 64 JPEGs, ``train/<wnid>/images/*.JPEG``,
  202 classes x 100 images.

Subsets are the first ``per_class`` images of every class in natural name order (the same files everywhere), unpacked
by :func:`milan.data.extract_archive_subset` under ``$MILAN_CACHE/proxy`` (default ``~/.cache/milan/proxy``).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch.utils.data import Subset

from milan.data import ImageFolderDataset, build_loader, default_cache_dir, eval_transform, extract_archive_subset

REPO = Path(__file__).resolve().parents[2]
DEFAULT_DATA = REPO.parent / "shared" / "data"


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


def unpack(archive: Path, name: str, per_class: int | None) -> Path:
    """Unpacks (or reuses) the first ``per_class`` images of each class: an ImageFolder tree."""
    out = default_cache_dir() / "proxy" / f"{name}-{per_class or 'all'}"
    return extract_archive_subset(archive, out, per_class=per_class)


def cifar_root(root: Path, split: str, per_class: int | None) -> Path:
    return unpack(cifar_archive(root, split), f"cifar10-{split}", per_class)


def tiny_root(root: Path, per_class: int | None) -> Path:
    return unpack(tiny_archive(root), "tinyimagenet-train100", per_class)


def load_tensors(
    dataset: ImageFolderDataset | Subset[object], batch_size: int = 500, num_workers: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Decodes a labelled dataset once into memory.

    Returns:
        (N, 3, H, W) float32 images (as the dataset's transform gives them) and (N,) int64 labels.

    Raises:
        RuntimeError: Some image could not be decoded (the shared data is expected to be clean).
    """
    images, labels = [], []
    for batch in build_loader(dataset, batch_size, num_workers=num_workers, pin_memory=False):  # type: ignore[arg-type]
        if batch.skipped:
            raise RuntimeError(f"unreadable images in the proxy data: {[s.path for s in batch.skipped][:5]}")
        images.append(batch.images)
        labels.append(batch.labels)
    return torch.cat(images), torch.cat(labels)


def cifar_eval_tensors(
    root: Path, split: str, per_class: int | None, img_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """CIFAR-10 ``split`` at ``img_size`` with the evaluation transform (no crop at 32 px), in memory."""
    dataset = ImageFolderDataset(cifar_root(root, split, per_class), eval_transform(img_size, crop_pct=1.0))
    return load_tensors(dataset)


def split_per_class(dataset: ImageFolderDataset, holdout: int) -> tuple[list[int], list[int]]:
    """Indices of a class tree split into train and held-out parts: the last ``holdout`` images of every class."""
    by_class: dict[int, list[int]] = {}
    for index, (_, label) in enumerate(dataset.samples):
        by_class.setdefault(label, []).append(index)
    train, held = [], []
    for indices in by_class.values():
        cut = len(indices) - holdout if holdout < len(indices) else len(indices)
        train += indices[:cut]
        held += indices[cut:]
    return train, held
