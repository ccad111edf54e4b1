"""Semantic-segmentation data: image / label-map pairs, mmsegmentation's ADE20K pipelines, skip-aware batches.

**Layout.** An images folder and a label folder; each image ``IMAGES/<rel>/<stem>.<ext>`` pairs with the label map
``LABELS/<rel>/<stem>.png``. The ADE20K release is this layout with ``images/training`` + ``annotations/training``
(and ``validation``); CamVid's SegNet split is ``train/images`` + ``train/labels``.

**Labels.** Single-channel PNGs (8- or 16-bit greyscale, or palette indices). With ``reduce_zero_label``
(ADE20K) the stored 0 ("other") becomes the ignore index and every other value ``v`` becomes ``v - 1``. A value that
is then neither a class (``0 .. num_classes - 1``) nor the ignore index is a configuration error: the sample carries
it to the main process, where :func:`check_labels` stops the run naming the file and the value.

**Bad pairs.** An unreadable image or label map, a missing label, or a pair whose sizes differ is a
:class:`~milan.data.BadSample` (reasons ``corrupt``, ``truncated``, ``missing``, ``mismatched``, ...), counted by the
:class:`~milan.data.SkipReport` like any other bad file.

**Training view** (:class:`TrainTransform`; mmsegmentation's ``ade20k.py``): RandomResize of ``scale`` by a ratio in
``ratio_range`` keeping the aspect (bilinear image, nearest label), RandomCrop with ``cat_max_ratio``, horizontal flip,
PhotoMetricDistortion, ImageNet normalisation, then padding to the crop (image 0, label the ignore index) as
mmsegmentation's data preprocessor does. Every random draw comes from Python's ``random`` module, which
:class:`~milan.data.sampling.SeededSamples` seeds per sample. **Evaluation view** (:class:`EvalTransform`): the image
resized to ``scale`` keeping the aspect; the label map stays at its original size (metrics are computed there).
"""

from __future__ import annotations

import os
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch.utils.data import Dataset

from milan.data.decode import (
    DEFAULT_MAX_PIXELS,
    BadSample,
    ImageDecodeError,
    _classify,
    load_rgb,
    open_file,
    open_image,
    read_file,
)
from milan.data.report import Batch, collate_images
from milan.data.sources import no_images_error, scan_images
from milan.errors import ConfigError

_LABEL_MODES = ("L", "P", "I", "I;16", "I;16L", "I;16B")


class LabelError(ConfigError):
    """A label map holds a value that is neither a class nor the ignore index, or is not a label map at all.

    A config error: the data and ``data.num_classes`` / ``ignore_index`` / ``reduce_zero_label`` disagree.
    """


@dataclass(frozen=True)
class LabelSpec:
    """How stored label values map to classes.

    Attributes:
        num_classes: Classes ``0 .. num_classes - 1`` (after the reduction).
        ignore_index: Label of pixels without a class (skipped by the loss and the metrics).
        reduce_zero_label: Stored 0 -> ignore, stored ``v`` -> ``v - 1`` (ADE20K).
    """

    num_classes: int
    ignore_index: int = 255
    reduce_zero_label: bool = False

    def convert(self, raw: np.ndarray) -> np.ndarray:
        """(H, W) stored values -> (H, W) int64 classes / ignore index (values are checked by :meth:`invalid`)."""
        labels = raw.astype(np.int64)
        if self.reduce_zero_label:
            ignored = (labels == 0) | (labels == self.ignore_index)
            labels = np.where(ignored, self.ignore_index, labels - 1)
        return labels

    def invalid(self, labels: np.ndarray) -> list[int]:
        """The values of converted ``labels`` that are neither a class nor the ignore index."""
        values = np.unique(labels)
        bad = values[((values < 0) | (values >= self.num_classes)) & (values != self.ignore_index)]
        return [int(v) for v in bad]

    def describe(self) -> str:
        """One line for the start-up log: ``150 classes, ignore index 255, reduce_zero_label (...)``."""
        return f"{self.num_classes} classes, ignore index {self.ignore_index}" + (
            ", reduce_zero_label (stored 0 -> ignore, v -> v - 1)" if self.reduce_zero_label else ""
        )


class LabelProblem(NamedTuple):
    """A sample whose label map holds an invalid value; the main process stops with :attr:`message` (naming it)."""

    message: str


@dataclass
class SegBatch(Batch):
    """A :class:`~milan.data.Batch` whose ``labels`` are (B, H, W) label maps.

    Attributes:
        label_errors: Messages of samples with invalid label values (see :func:`check_labels`).
    """

    label_errors: tuple[str, ...] = ()


def find_pairs(images: str | os.PathLike[str], labels: str | os.PathLike[str]) -> list[tuple[Path, Path]]:
    """Every image under ``images`` (any depth, natural order) with the label map ``labels/<rel>/<stem>.png``.

    The folders exist (the callers check them); a label path may not (the sample is then skipped as ``missing``).

    Raises:
        FileNotFoundError: ``images`` holds no images.
    """
    images, labels = Path(images), Path(labels)
    scan = scan_images(images)
    if not scan.paths:
        raise no_images_error(str(images), scan.ignored)
    return [(p, labels / p.relative_to(images).with_suffix(".png")) for p in scan.paths]


def find_label(image: Path) -> Path | None:
    """The label map of an image outside a dataset: ``labels/`` or ``annotations/`` in place of its ``images/``."""
    parts = image.parts
    for i in range(len(parts) - 2, -1, -1):
        if parts[i] == "images":
            for folder in ("labels", "annotations"):
                candidate = Path(*parts[:i], folder, *parts[i + 1 :]).with_suffix(".png")
                if candidate.is_file():
                    return candidate
            break
    return None


def eval_folders(data: str | os.PathLike[str]) -> tuple[Path, Path]:
    """The images and labels folders of an evaluation set given as one folder (``milan evaluate --data``).

    Accepted: the ADE20K release folder (``images/validation`` + ``annotations/validation``), or a split folder with
    ``images/`` + ``labels/`` (CamVid's ``test/``) or ``images/`` + ``annotations/``.

    Raises:
        ConfigError: None of these layouts.
    """
    root = Path(data).expanduser()
    for images, labels in (("images/validation", "annotations/validation"), ("images", "labels"),
                           ("images", "annotations")):  # fmt: skip
        if (root / images).is_dir() and (root / labels).is_dir():
            return root / images, root / labels
    raise ConfigError(
        f"--data {data}: expected ADEChallengeData2016/ (images/validation + annotations/validation) or a folder with "
        "images/ and labels/ (or annotations/) subfolders"
    )


def read_label(data: bytes, path: str, max_pixels: int | None) -> np.ndarray:
    """Decodes a single-channel label PNG into an (H, W) array of its stored values.

    Raises:
        ImageDecodeError: Unreadable bytes (a skip).
        LabelError: Not a single-channel label map (an RGB or RGBA image: a configuration error).
    """
    img = open_image(data, max_pixels=max_pixels)
    if img.mode not in _LABEL_MODES:
        raise LabelError(
            f"{path}: a {img.mode} image, not a single-channel label map (8/16-bit greyscale or palette indices)"
        )
    try:
        img.load()
    except Exception as err:
        raise _classify(err) from None
    return np.asarray(img)


Pair = tuple[torch.Tensor, torch.Tensor]
SegItem = Pair | BadSample | LabelProblem


class SegmentationDataset(Dataset[SegItem]):
    """Image / label-map pairs (:func:`find_pairs`) through a paired transform; ``max_pixels`` guards both files."""

    def __init__(
        self,
        pairs: Sequence[tuple[Path, Path]],
        transform: TrainTransform | EvalTransform,
        spec: LabelSpec,
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
    ) -> None:
        self.pairs = list(pairs)
        self.transform = transform
        self.spec = spec
        self.max_pixels = max_pixels

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> SegItem:
        image_path, label_path = self.pairs[index]
        if not label_path.exists():
            return BadSample(str(image_path), "missing", f"no label map {label_path}")
        opened, label_bytes = open_file(image_path, self.max_pixels), read_file(label_path)
        if isinstance(opened, BadSample):
            return opened
        if isinstance(label_bytes, BadSample):
            return label_bytes
        try:
            image = load_rgb(opened[1])
        except ImageDecodeError as e:
            return e.skip(image_path)
        try:
            raw = read_label(label_bytes, str(label_path), self.max_pixels)
        except ImageDecodeError as e:
            return e.skip(label_path)
        except LabelError as e:
            return LabelProblem(str(e))
        if raw.shape != (image.height, image.width):
            detail = f"label {raw.shape[1]}x{raw.shape[0]} but image {image.width}x{image.height}"
            return BadSample(str(image_path), "mismatched", detail)
        labels = self.spec.convert(raw)
        bad = self.spec.invalid(labels)
        if bad:
            s = self.spec
            what = "after reduce_zero_label " if s.reduce_zero_label else ""
            return LabelProblem(
                f"{label_path}: label value {bad[0] + int(s.reduce_zero_label)} ({what}{bad[0]}) is neither a class "
                f"(0..{s.num_classes - 1}) nor the ignore index {s.ignore_index}; check data.num_classes, "
                "data.ignore_index and data.reduce_zero_label",
            )
        return self.transform(image, labels)


def collate_segmentation(items: Sequence[SegItem]) -> SegBatch:
    """DataLoader ``collate_fn``: :func:`~milan.data.collate_images` of the pairs, the label problems kept aside."""
    batch = collate_images([i for i in items if not isinstance(i, LabelProblem)])  # labels (B, H, W)
    problems = tuple(i.message for i in items if isinstance(i, LabelProblem))
    return SegBatch(images=batch.images, labels=batch.labels, skipped=batch.skipped, label_errors=problems)


def check_labels(batch: Batch) -> Batch:
    """``batch``, unless a sample of it had an invalid label value: then :class:`LabelError` stops the run."""
    errors = getattr(batch, "label_errors", ())
    if errors:
        raise LabelError(errors[0])
    return batch


# ----------------------------------------------------------------------------------------------------------------
# Transforms (mmsegmentation's / mmcv's semantics; tensors on the CPU)

_MEAN = torch.tensor(IMAGENET_DEFAULT_MEAN).view(3, 1, 1) * 255  # 123.675, 116.28, 103.53
_STD = torch.tensor(IMAGENET_DEFAULT_STD).view(3, 1, 1) * 255  # 58.395, 57.12, 57.375


def rescale_size(width: int, height: int, scale: tuple[int, int]) -> tuple[int, int]:
    """``(width, height)`` rescaled as mmcv's ``rescale_size``: aspect kept, long <= max(scale), short <= min(scale).

    Each new side is ``int(side * factor + 0.5)``.
    """
    factor = min(max(scale) / max(width, height), min(scale) / min(width, height))
    return int(width * factor + 0.5), int(height * factor + 0.5)


def resize_image(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(3, H, W) 0..255 float -> (3, h, w) bilinear (``align_corners=False``, no antialias, as OpenCV), rounded."""
    if tuple(image.shape[1:]) == size:
        return image
    out = F.interpolate(image[None], size=size, mode="bilinear", align_corners=False)[0]
    return out.round_().clamp_(0, 255)


def resize_labels(labels: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(H, W) int64 -> (h, w) nearest (OpenCV's ``INTER_NEAREST`` pixel choice)."""
    if tuple(labels.shape) == size:
        return labels
    return F.interpolate(labels[None, None].float(), size=size, mode="nearest")[0, 0].long()


def photometric_distortion(image: np.ndarray) -> np.ndarray:
    """The ``PhotoMetricDistortion`` of mmsegmentation on an (H, W, 3) uint8 RGB array, each step with probability 0.5.

    Brightness ``+U(-32, 32)``; contrast ``x U(0.5, 1.5)`` (before or after the HSV steps, at random); saturation
    ``x U(0.5, 1.5)``; hue shift of ``randint(-18, 17)`` OpenCV units (2 degrees each). Brightness and contrast clip
    and truncate to uint8 as the reference does; the HSV steps run in floating point (OpenCV's uint8 HSV rounds).
    """

    def convert(x: np.ndarray, alpha: float = 1.0, beta: float = 0.0) -> np.ndarray:
        out: np.ndarray = np.clip(x.astype(np.float32) * alpha + beta, 0, 255).astype(np.uint8)
        return out

    def contrast(x: np.ndarray) -> np.ndarray:
        return convert(x, alpha=random.uniform(0.5, 1.5)) if random.randint(0, 1) else x

    from matplotlib.colors import hsv_to_rgb, rgb_to_hsv

    if random.randint(0, 1):
        image = convert(image, beta=random.uniform(-32, 32))
    contrast_first = random.randint(0, 1) == 1
    if contrast_first:
        image = contrast(image)
    saturation = random.uniform(0.5, 1.5) if random.randint(0, 1) else None
    hue = random.randint(-18, 17) if random.randint(0, 1) else None
    if saturation is not None or hue is not None:
        hsv = rgb_to_hsv(image.astype(np.float32) / 255)
        if saturation is not None:
            hsv[..., 1] = np.clip(hsv[..., 1] * saturation, 0, 1)
        if hue is not None:
            hsv[..., 0] = (hsv[..., 0] + hue / 180) % 1.0
        image = np.clip(np.rint(np.asarray(hsv_to_rgb(hsv)) * 255), 0, 255).astype(np.uint8)
    if not contrast_first:
        image = contrast(image)
    return image


def normalize(image: torch.Tensor) -> torch.Tensor:
    """(3, H, W) 0..255 -> ImageNet-normalised (mmsegmentation's mean/std in 0..255 units)."""
    return (image - _MEAN) / _STD


def _to_tensor(image: Image.Image | np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.array(image, dtype=np.float32)).permute(2, 0, 1)  # (3, H, W) 0..255


@dataclass(frozen=True)
class TrainTransform:
    """The training view (see the module docstring); the defaults are the ADE20K recipe's.

    Attributes:
        scale: RandomResize base scale ``(long, short)``, scaled by a ratio drawn from ``ratio_range``.
        cat_max_ratio: A crop is redrawn (up to 10 times) while one class fills this share of its labelled pixels.
        ignore_index: Label of padded and ignored pixels.
    """

    crop_size: int = 512
    scale: tuple[int, int] = (2048, 512)
    ratio_range: tuple[float, float] = (0.5, 2.0)
    cat_max_ratio: float = 0.75
    hflip: float = 0.5
    photometric: bool = True
    ignore_index: int = 255

    def crop_box(self, labels: np.ndarray) -> tuple[int, int, int, int]:
        """The RandomCrop box of mmsegmentation ``(y1, y2, x1, x2)`` with its ``cat_max_ratio`` retries."""
        h, w = labels.shape
        c = self.crop_size

        def draw() -> tuple[int, int, int, int]:
            y, x = random.randint(0, max(h - c, 0)), random.randint(0, max(w - c, 0))
            return y, min(y + c, h), x, min(x + c, w)

        box = draw()
        if self.cat_max_ratio < 1.0:
            for _ in range(10):
                y1, y2, x1, x2 = box
                values, counts = np.unique(labels[y1:y2, x1:x2], return_counts=True)
                counts = counts[values != self.ignore_index]
                if len(counts) > 1 and counts.max() / counts.sum() < self.cat_max_ratio:
                    break
                box = draw()
        return box

    def __call__(self, image: Image.Image, labels: np.ndarray) -> Pair:
        """``(RGB image, (H, W) int64 labels) -> ((3, c, c) normalised image, (c, c) int64 labels)``."""
        ratio = random.random() * (self.ratio_range[1] - self.ratio_range[0]) + self.ratio_range[0]
        target = (int(self.scale[0] * ratio), int(self.scale[1] * ratio))
        w, h = rescale_size(image.width, image.height, target)
        x = resize_image(_to_tensor(image), (h, w))  # (3, h, w) 0..255
        y = resize_labels(torch.from_numpy(labels), (h, w))  # (h, w)
        y1, y2, x1, x2 = self.crop_box(y.numpy())
        x, y = x[:, y1:y2, x1:x2], y[y1:y2, x1:x2]
        if random.random() < self.hflip:
            x, y = x.flip(-1), y.flip(-1)
        if self.photometric:
            distorted = photometric_distortion(x.permute(1, 2, 0).numpy().astype(np.uint8))
            x = _to_tensor(distorted)
        x = normalize(x)
        pad_h, pad_w = self.crop_size - x.shape[1], self.crop_size - x.shape[2]
        x = F.pad(x, (0, pad_w, 0, pad_h), value=0.0)
        y = F.pad(y, (0, pad_w, 0, pad_h), value=self.ignore_index)
        return x.contiguous(), y.contiguous()


@dataclass(frozen=True)
class EvalTransform:
    """The evaluation view: the image resized to the ``(long, short)`` bound ``scale``, aspect kept; labels as is."""

    scale: tuple[int, int] = (2048, 512)

    def __call__(self, image: Image.Image, labels: np.ndarray) -> Pair:
        """``(RGB image, (H, W) labels) -> ((3, h, w) normalised resized image, (H, W) int64 labels)``."""
        w, h = rescale_size(image.width, image.height, self.scale)
        return normalize(resize_image(_to_tensor(image), (h, w))), torch.from_numpy(labels)
