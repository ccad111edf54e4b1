"""Labelled data for the evaluation jobs: split sources, the recipes' views, and resumable/sharded loaders.

Training loaders are the pretraining ones (:func:`milan.data.sampling.seeded_loader`): the sample order and every
augmentation are functions of ``(seed, epoch, index)``, so a resumed run sees exactly the batches it would have seen.
Evaluation loaders shard the set over processes *without padding* (:class:`ShardSampler`), so summed counts are
exact.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, cast

import torch
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm import tqdm

from milan import distributed as dist
from milan.data import (
    DEFAULT_MAX_PIXELS,
    Batch,
    ImageFolderDataset,
    ImagePipeline,
    SkipReport,
    build_loader,
    describe_found,
    eval_transform,
    extract_archive_subset,
    find_classes,
    pretrain_transform,
)
from milan.train.config import AugmentConfig, ClassifyDataConfig, ConfigError, FinetuneDataConfig, ProbeDataConfig

_ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz")


def resolve_split(source: str | None, per_class: int | None, key: str) -> tuple[Path, int | None]:
    """An ImageFolder root for a split: the folder itself, or a class-balanced subset unpacked from an archive.

    Args:
        source: Folder or archive (see :class:`~milan.train.config.ClassifyDataConfig`).
        per_class: Images per class (``None``: all): an archive's subset is unpacked with it; a folder's is
            selected when it is read (the same rule: the first ``per_class`` images in natural name order).
        key: The config key, for error messages (``data.train``).

    Returns:
        ``(folder, per_class still to apply when reading it)``: ``per_class`` for a folder, ``None`` for an
        unpacked archive subset.

    Raises:
        ConfigError: Missing source.
    """
    if source is None:
        raise ConfigError(f"{key} is not set: pass {key}=PATH (an ImageFolder tree root/<class>/<image> or a .tar.gz)")
    path = Path(source).expanduser()
    if not path.exists():
        raise ConfigError(f"{key}={source!r}: not found (an ImageFolder tree root/<class>/<image> or a .tar.gz)")
    if path.is_file() and path.name.endswith(_ARCHIVE_SUFFIXES):
        return extract_archive_subset(path, None, per_class=per_class), None
    if not path.is_dir():
        raise ConfigError(f"{key}={source!r}: not a folder or a .tar/.tar.gz archive")
    return path, per_class


def image_folder(
    source: str | None,
    per_class: int | None,
    pipeline: ImagePipeline,
    key: str,
    cfg: ClassifyDataConfig,
    classes: list[str] | None = None,
) -> ImageFolderDataset:
    """An :class:`~milan.data.ImageFolderDataset` for a split source, with a clear error for an empty tree."""
    root, keep = resolve_split(source, per_class, key)
    try:
        dataset = ImageFolderDataset(root, pipeline, classes=classes, max_pixels=cfg.max_image_pixels, per_class=keep)
    except (FileNotFoundError, NotADirectoryError) as e:
        raise ConfigError(f"{key}={source!r}: {e}") from e
    dataset.source = str(source)  # as the user gave it (an archive, not its unpacked subset)
    return dataset


def folder_by_names(
    root: str | os.PathLike[str],
    names: Sequence[str],
    num_classes: int,
    pipeline: ImagePipeline,
    *,
    per_class: int | None = None,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
) -> tuple[ImageFolderDataset, list[str]]:
    """A labelled folder whose labels are a classifier's indices, matched by class name.

    Args:
        root: ``root/<class>/<image>`` tree.
        names: The classifier's class names in index order (empty: unknown; the folder's sorted order is then
            taken as the index order, and a note says so).
        num_classes: The classifier's output width.
        pipeline: The evaluation view.
        per_class: The first N images of every class (natural name order); ``None``: all.
        max_pixels: Decompression-bomb guard.

    Returns:
        The dataset (``classes``: the classifier's names) and notes for the user: the assumed order, or the
        classes the folder lacks (it is evaluated on those it has).

    Raises:
        ConfigError: A class folder the classifier does not know (named), or more folders than outputs.
    """
    root = Path(root)
    folders = find_classes(root)
    notes: list[str] = []
    if names:
        unknown = [f for f in folders if f not in names]
        if unknown:
            known = ", ".join(names[:8]) + (", ..." if len(names) > 8 else "")
            raise ConfigError(
                f"{root}: class folder(s) {', '.join(unknown[:8])}{' ...' if len(unknown) > 8 else ''} unknown to "
                f"the classifier, which knows {len(names)} classes ({known})"
            )
        missing = [n for n in names if n not in folders]
        if missing:
            notes.append(
                f"{root} lacks {len(missing)} of the classifier's {len(names)} classes ({', '.join(missing[:8])}"
                f"{', ...' if len(missing) > 8 else ''}): evaluated on the {len(folders)} it has, matched by name"
            )
    else:
        if len(folders) > num_classes:
            raise ConfigError(f"{root} has {len(folders)} class folders but the classifier has {num_classes} outputs")
        notes.append(
            f"class names: the classifier does not store them; the folder's sorted class order is assumed to be its "
            f"output order ({folders[0]} = 0, {folders[-1]} = {len(folders) - 1})"
        )
    try:
        dataset = ImageFolderDataset(
            root, pipeline, classes=list(names) or folders, per_class=per_class, max_pixels=max_pixels
        )
    except FileNotFoundError as e:
        raise ConfigError(str(e)) from e
    return dataset, notes


def probe_pipeline(cfg: ProbeDataConfig, img_size: int) -> ImagePipeline:
    """Linear-probe training view: RandomResizedCrop (``cfg.scale``, ``cfg.crop_geometry``, bicubic) + flip + norm.

    JPEG draft decoding if ``cfg.draft``.
    """
    return pretrain_transform(
        img_size, scale=cfg.scale, interpolation=cfg.interpolation, hflip=cfg.hflip, draft=cfg.draft,
        crop=cfg.crop_geometry,
    )  # fmt: skip


def eval_pipeline(cfg: ClassifyDataConfig, img_size: int) -> ImagePipeline:
    """Evaluation view: Resize(``img_size / crop_pct``, bicubic) + CenterCrop(``img_size``) + normalisation."""
    return eval_transform(img_size, crop_pct=cfg.crop_pct, interpolation=cfg.interpolation)


def finetune_pipeline(cfg: FinetuneDataConfig, aug: AugmentConfig, img_size: int) -> ImagePipeline:
    """Fine-tuning training view: timm's ``create_transform(is_training=True)`` with RandAugment and erasing.

    As ORIG ``util/datasets.py``: bicubic RandomResizedCrop (``cfg.scale``), flip, ``rand-m9-mstd0.5-inc1``
    (colour jitter off, as timm does when an auto-augment policy is set), ImageNet normalisation, then
    RandomErasing (probability 0.25, per-pixel noise, one box).
    """
    from timm.data.transforms_factory import create_transform

    from milan.models.teacher import IMAGENET_MEAN, IMAGENET_STD

    transform = create_transform(
        input_size=img_size,
        is_training=True,
        scale=cfg.scale,
        hflip=cfg.hflip,
        color_jitter=cast(Any, aug.color_jitter),
        auto_augment=aug.auto_augment,
        interpolation=cfg.interpolation,
        mean=tuple(IMAGENET_MEAN),
        std=tuple(IMAGENET_STD),
        re_prob=aug.re_prob,
        re_mode=aug.re_mode,
        re_count=aug.re_count,
    )
    return ImagePipeline(transform=pillow_safe_posterize(transform))


def posterize(img: Any, bits_to_keep: int, **_: Any) -> Any:
    """Posterize that keeps Pillow < 11's result for 0 bits (a black image) instead of raising.

    timm's ``PosterizeIncreasing`` maps magnitude level 10 to 0 bits; with ``rand-m9-mstd0.5`` the noisy magnitude
    reaches 10, and recent Pillow's ``ImageOps.posterize`` raises ``ValueError`` for ``bits < 1`` (older Pillow
    returned a black image, which is what the reference runs saw).
    """
    from PIL import Image, ImageOps

    if bits_to_keep >= 8:
        return img
    if bits_to_keep <= 0:
        return Image.new(img.mode, img.size)  # all zeros: mask ~(2**8 - 1) keeps no bit
    return ImageOps.posterize(img, bits_to_keep)


def pillow_safe_posterize(transform: Any) -> Any:
    """Points the posterize ops of timm RandAugment/AutoAugment inside ``transform`` to :func:`posterize`."""
    from timm.data.auto_augment import AugmentOp

    for t in getattr(transform, "transforms", []):
        for op in getattr(t, "ops", []):
            if isinstance(op, AugmentOp) and op.name.startswith("Posterize"):
                op.aug_fn = posterize
    return transform


class ShardSampler(Sampler[int]):
    """Indices ``rank, rank + world_size, ...`` in order: every sample exactly once over all processes.

    Args:
        num_samples: Dataset length.
        rank: This process's rank (default: the current one).
        world_size: Number of processes (default: the current one).
    """

    def __init__(self, num_samples: int, rank: int | None = None, world_size: int | None = None) -> None:
        self.num_samples = num_samples
        self.rank = dist.rank() if rank is None else rank
        self.world_size = dist.world_size() if world_size is None else world_size

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.num_samples, self.world_size))

    def __len__(self) -> int:
        return len(range(self.rank, self.num_samples, self.world_size))


def eval_loader(
    dataset: Dataset[Any], batch_size: int, num_workers: int | None, device: torch.device
) -> DataLoader[Any]:
    """A sharded, unshuffled loader of :class:`~milan.data.Batch` objects (no padding, no dropped tail)."""
    n = len(dataset)  # type: ignore[arg-type]
    return build_loader(
        dataset,
        batch_size,
        sampler=ShardSampler(n),
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
        persistent_workers=False,
    )


def eval_batches(
    loader: Iterable[Batch],
    device: torch.device,
    *,
    report: SkipReport | None = None,
    progress: bool = False,
    desc: str = "eval",
) -> Iterator[tuple[torch.Tensor, Batch]]:
    """The images of a loader's batches on ``device`` (with their batch), for evaluation.

    Batches that lost every image are passed over; unreadable files go to ``report``.

    Args:
        loader: Yields :class:`~milan.data.Batch` objects (e.g. :func:`eval_loader`: this process's shard).
        device: Where the images go.
        report: Receives the skipped files.
        progress: Show a progress bar (on a terminal).
        desc: Its label.

    Yields:
        ``(images (B, 3, H, W) on device, batch)``.
    """
    bar = tqdm(loader, desc=desc, disable=not (progress and sys.stderr.isatty()), leave=False, dynamic_ncols=True)
    for batch in bar:
        if report is not None:
            report.update(batch)
        if batch.empty:
            continue
        yield batch.images.to(device, non_blocking=True), batch


def num_classes_of(dataset: ImageFolderDataset, requested: int | None) -> int:
    """The head width: ``requested``, else the number of class folders (checked against the labels)."""
    found = len(dataset.classes)
    if requested is None:
        return found
    if requested < found:
        raise ConfigError(f"num_classes={requested} but the training set has {found} class folders")
    return requested


def describe_split(dataset: ImageFolderDataset, unit: str = "") -> str:
    """``"found 1000 images (10 classes) in PATH"`` (the path as given; files ignored for their extension; ``unit``)."""
    return describe_found(dataset, unit=unit)
