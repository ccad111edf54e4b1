"""Map-style image datasets. Every item is ``(image, label)`` or a :class:`~milan.data.decode.BadSample`.

Item contract (all datasets of :mod:`milan.data`, including the webdataset shards):

* a good sample is ``(image, label)``: ``image`` a ``(3, H, W)`` float32 tensor (normalised by the pipeline),
  ``label`` an ``int`` class index, ``-1`` when the source has no labels;
* a sample that cannot be decoded is a :class:`BadSample` ``(path, reason, detail)``: returned, not raised,
  so it crosses DataLoader worker processes and is counted by :func:`milan.data.collate_images`.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import torch
from torch.utils.data import Dataset

from milan.data.decode import DEFAULT_MAX_PIXELS, BadSample, ImageDecodeError, open_image
from milan.data.sources import (
    IMAGE_EXTENSIONS,
    ImageScan,
    describe_ignored,
    find_classes,
    is_image_file,
    read_file_list,
    scan_images,
)
from milan.data.transforms import ImagePipeline
from milan.models.teacher import IMAGENET_MEAN, IMAGENET_STD

Item = tuple[torch.Tensor, int] | BadSample
"""What a dataset returns for one index: ``(image (3, H, W), label)`` or a :class:`BadSample`."""

UNLABELLED = -1
"""The label of images from unlabelled sources."""

MAX_FILE_BYTES = 1 << 30
"""Files larger than this (1 GiB) are skipped as ``"too large"`` without being read."""


def _no_images_error(where: str, ignored: Counter[str] | None = None) -> FileNotFoundError:
    found = describe_ignored(ignored or Counter()) or "no files at all"
    accepted = ", ".join(IMAGE_EXTENSIONS[:8])
    return FileNotFoundError(
        f"no image files found in {where}: {found} (accepted: every format Pillow reads, e.g. {accepted})"
    )


class ImageDataset(Dataset[Item]):
    """Images at known paths with integer labels, decoded and transformed by an :class:`ImagePipeline`.

    Args:
        samples: ``(path, label)`` pairs.
        pipeline: Decode + transform applied to each image.
        classes: Class names indexed by label (empty for unlabelled data).
        max_pixels: Images larger than this are skipped as ``"too large"`` (decompression-bomb guard).
        ignored: Files the scan left out for their extension, by extension (see :func:`describe_ignored`).
    """

    def __init__(
        self,
        samples: Sequence[tuple[Path, int]],
        pipeline: ImagePipeline,
        *,
        classes: Sequence[str] = (),
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
        ignored: Counter[str] | None = None,
    ) -> None:
        self.samples = list(samples)
        self.pipeline = pipeline
        self.classes = list(classes)
        self.max_pixels = max_pixels
        self.ignored: Counter[str] = Counter(ignored or {})
        self.source = ""  # where the samples come from, as the user named it (for messages)

    def __len__(self) -> int:
        return len(self.samples)

    def read(self, index: int) -> tuple[bytes, int] | BadSample:
        """The encoded file of sample ``index`` and its label, or why it cannot be read (no decoding)."""
        path, label = self.samples[index]
        try:
            size = path.stat().st_size
            if size > MAX_FILE_BYTES:
                return BadSample(str(path), "too large", f"{size} bytes > {MAX_FILE_BYTES}")
            return path.read_bytes(), label
        except FileNotFoundError:
            return BadSample(str(path), "missing", "file not found")
        except IsADirectoryError:
            return BadSample(str(path), "not an image", "is a folder")
        except OSError as err:  # permissions, I/O errors
            return BadSample(str(path), "unreadable", f"{type(err).__name__}: {err.strerror or err}")

    def __getitem__(self, index: int) -> Item:
        read = self.read(index)
        if isinstance(read, BadSample):
            return read
        data, label = read
        path = self.samples[index][0]
        try:
            image = self.pipeline(open_image(data, max_pixels=self.max_pixels))
        except ImageDecodeError as err:
            return BadSample(str(path), err.reason, err.detail)
        return image, label

    def __repr__(self) -> str:
        return f"{type(self).__name__}(num_samples={len(self)}, num_classes={len(self.classes)}, {self.pipeline})"


class ImageFolderDataset(ImageDataset):
    """A labelled ``root/<class>/**/<image>`` tree; labels index the sorted class folder names.

    Class folders without images keep their index, so train and validation trees with the same class folders
    get the same labels even when a split lacks a class.

    Args:
        root: The tree's root folder.
        pipeline: Decode + transform.
        classes: Use these class names (and their order) instead of the sorted subfolders; images of other
            folders are left out.
        max_pixels: See :class:`ImageDataset`.
        per_class: Keep the first ``per_class`` images of every class, in natural name order (``img_2`` before
            ``img_10``; the rule :func:`milan.data.extract_archive_subset` applies to archives); ``None``: all.

    Raises:
        FileNotFoundError: No class folders, or no image files at all.
        ValueError: ``per_class`` is not positive.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        pipeline: ImagePipeline,
        *,
        classes: Sequence[str] | None = None,
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
        per_class: int | None = None,
    ) -> None:
        if per_class is not None and per_class < 1:
            raise ValueError(f"per_class must be >= 1 or None, got {per_class}")
        self.root = Path(root)
        names = list(classes) if classes is not None else find_classes(self.root)
        samples: list[tuple[Path, int]] = []
        ignored: Counter[str] = Counter()
        for label, name in enumerate(names):
            folder = self.root / name
            scan = scan_images(folder) if folder.is_dir() else ImageScan([], Counter())
            samples += [(path, label) for path in scan.paths[:per_class]]
            ignored += scan.ignored
        if not samples:
            raise _no_images_error(f"the class folders of {self.root}", ignored)
        super().__init__(samples, pipeline, classes=names, max_pixels=max_pixels, ignored=ignored)
        self.source = os.fspath(root)

    @property
    def class_to_idx(self) -> dict[str, int]:
        """Class name -> label."""
        return {name: label for label, name in enumerate(self.classes)}


def scan_sources(source: str | os.PathLike[str] | Sequence[str | os.PathLike[str]]) -> ImageScan:
    """Image paths from folders (scanned recursively), list files (one path per line) and image files.

    Args:
        source: One entry or a sequence of entries; each is a folder, an image file (by extension) or a text
            file listing images (relative paths resolved against the list's folder; listed files are not checked
            here, a missing one is a counted skip when it is loaded).

    Returns:
        The paths, entry by entry (folders in sorted order, lists in file order), and the folders' files ignored
        for their extension.

    Raises:
        FileNotFoundError: An entry does not exist, or no image files were found at all.
    """
    entries = [source] if isinstance(source, str | os.PathLike) else list(source)
    paths: list[Path] = []
    ignored: Counter[str] = Counter()
    for entry in entries:
        location = Path(entry)
        if location.is_dir():
            scan = scan_images(location)
            paths += scan.paths
            ignored += scan.ignored
        elif location.is_file():
            paths += [location] if is_image_file(location) else read_file_list(location)
        else:
            raise FileNotFoundError(f"image source not found: {location}")
    if not paths:
        where = ", ".join(str(Path(e)) for e in entries) or "an empty source list"
        raise _no_images_error(f"{where} (folders are searched recursively)", ignored)
    return ImageScan(paths, ignored)


def collect_image_paths(source: str | os.PathLike[str] | Sequence[str | os.PathLike[str]]) -> list[Path]:
    """The image paths of :func:`scan_sources` (without the ignored-file counts).

    Args:
        source: See :func:`scan_sources`.

    Returns:
        The paths.

    Raises:
        FileNotFoundError: An entry does not exist, or no image files were found at all.
    """
    return scan_sources(source).paths


class UnlabelledImages(ImageDataset):
    """Unlabelled images: every image under a folder (any depth, class folders optional) or listed in a file.

    Every item's label is ``-1``.

    Args:
        source: A folder, an image file, a text file with one image path per line (relative paths are resolved
            against the list's folder), or a sequence of these (see :func:`collect_image_paths`).
        pipeline: Decode + transform.
        max_pixels: See :class:`ImageDataset`.

    Raises:
        FileNotFoundError: ``source`` does not exist, or no image files were found.
    """

    def __init__(
        self,
        source: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
        pipeline: ImagePipeline,
        *,
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
    ) -> None:
        paths, ignored = scan_sources(source)
        super().__init__([(path, UNLABELLED) for path in paths], pipeline, max_pixels=max_pixels, ignored=ignored)
        entries = [source] if isinstance(source, str | os.PathLike) else list(source)
        self.source = ", ".join(os.fspath(e) for e in entries)


def describe_found(dataset: ImageDataset, where: str | None = None, *, unit: str = "") -> str:
    """The start-of-run line of a dataset: ``"found 1000 images (10 classes) in PATH"`` (+ ignored files).

    Args:
        dataset: The scanned dataset.
        where: The data source as the user gave it (default: ``dataset.source``).
        unit: Appended after a ``"; "`` (e.g. ``"31 steps per epoch"``).

    Returns:
        One line.
    """
    where = where if where is not None else dataset.source
    n = len(dataset)
    classes = f" ({len(dataset.classes)} class{'es' if len(dataset.classes) != 1 else ''})" if dataset.classes else ""
    text = f"found {n} image{'s' if n != 1 else ''}{classes} in {where}"
    ignored = describe_ignored(dataset.ignored)
    if ignored:
        text += f" ({ignored})"
    return text + (f"; {unit}" if unit else "")


class SyntheticImages(Dataset[Item]):
    """Deterministic synthetic images for tests and benchmarks: no files, no decoding.

    Image ``i`` has label ``i % num_classes``; its pixels are a class-specific colour plus per-image noise,
    normalised with ImageNet statistics, so a classifier can learn the labels.

    Args:
        n: Number of images.
        size: Side length.
        num_classes: Number of labels.
        seed: Changes every image.
    """

    def __init__(self, n: int, size: int, num_classes: int = 10, *, seed: int = 0) -> None:
        if n < 0 or size <= 0 or num_classes <= 0:
            raise ValueError(f"need n >= 0, size > 0, num_classes > 0; got {n}, {size}, {num_classes}")
        self.n = n
        self.size = size
        self.num_classes = num_classes
        self.seed = seed
        self.classes = [f"class_{k}" for k in range(num_classes)]
        palette = torch.Generator().manual_seed(seed)
        self._colours = torch.rand(num_classes, 3, 1, 1, generator=palette)  # (C, 3, 1, 1) in [0, 1]
        self._mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
        self._std = torch.tensor(IMAGENET_STD).view(3, 1, 1)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> Item:
        if not 0 <= index < self.n:
            raise IndexError(f"index {index} out of range for {self.n} images")
        label = index % self.num_classes
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + index + 1)
        noise = 0.15 * torch.randn(3, self.size, self.size, generator=gen)  # (3, S, S)
        pixels = (self._colours[label] + noise).clamp(0, 1)
        return (pixels - self._mean) / self._std, label
