"""One-call dataset builders for the CLI and configs: a data source string -> dataset with the right view.

Data source strings (``source`` below):

* ``"builtin:samples"``: the ~32 JPEGs bundled with the package (the CPU demo);
* a folder: every image under it, at any depth (pretraining), or an ImageFolder class tree (labelled eval);
* a text file: one image path per line (relative to the list's folder); an image file: just that image;
* tar shards: ``*.tar`` paths, brace patterns like ``data/train-{000000..000127}.tar`` or a list of them
  (webdataset format, optional ``webdataset`` package); ``pipe:CMD`` and remote URLs only with
  ``allow_shell_pipes=True`` (webdataset runs shell commands for them);
* a list/tuple of the above: their images concatenated (unlabelled only).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from milan.data.datasets import ImageDataset, ImageFolderDataset, UnlabelledImages
from milan.data.decode import DEFAULT_MAX_PIXELS
from milan.data.encoded import EncodedImages
from milan.data.shards import ShardImages, is_shard_source, shell_sources
from milan.data.sources import BUILTIN_SAMPLES, sample_images_dir
from milan.data.transforms import (
    DEFAULT_CROP_PCT,
    CropGeometry,
    ImagePipeline,
    Interpolation,
    eval_transform,
    pretrain_transform,
)

Source = str | os.PathLike[str] | Sequence[str | os.PathLike[str]]
"""A data source: see the module docstring."""


def resolve_source(source: str | os.PathLike[str]) -> Path:
    """Maps ``"builtin:samples"`` to the bundled folder and expands ``~``; other strings become paths.

    Args:
        source: One data source entry.

    Returns:
        A local path.
    """
    text = os.fspath(source)
    if text == BUILTIN_SAMPLES:
        return sample_images_dir()
    if text.startswith("builtin:"):
        raise ValueError(f"unknown built-in data source {text!r}; available: {BUILTIN_SAMPLES!r}")
    return Path(text).expanduser()


def _entries(source: Source) -> list[str | os.PathLike[str]]:
    return [source] if isinstance(source, str | os.PathLike) else list(source)


def build_image_dataset(
    source: Source,
    pipeline: ImagePipeline,
    *,
    labelled: bool,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    shuffle: bool = False,
    shuffle_buffer: int = 0,
    seed: int = 0,
    num_samples: int | None = None,
    allow_shell_pipes: bool = False,
) -> ImageDataset | ShardImages:
    """Builds the dataset for a source with any pipeline (e.g. a timm fine-tuning transform).

    Args:
        source: See the module docstring.
        pipeline: Decode + transform.
        labelled: Folders are ImageFolder class trees with labels; otherwise every image is unlabelled (-1).
        max_pixels: Decompression-bomb guard (pixels).
        shuffle: Shards only: shuffle the shard order (map-style datasets are shuffled by the loader).
        shuffle_buffer: Shards only: sample shuffle buffer.
        seed: Shards only: shuffle seed.
        num_samples: Shards only: the number of samples, if known.
        allow_shell_pipes: Shards only: accept ``pipe:CMD`` sources and remote URLs (shell commands).

    Returns:
        A map-style dataset (folders, lists) or a :class:`ShardImages` stream.

    Raises:
        FileNotFoundError: A source that does not exist or holds no images.
        ValueError: Labels requested from a source that has none; a shell source without ``allow_shell_pipes``.
    """
    entries = _entries(source)
    if not entries:
        raise ValueError("empty data source list")
    if is_shard_source(entries) or shell_sources(entries):
        commands = set(shell_sources(entries))
        urls = [os.fspath(e) if os.fspath(e) in commands else os.fspath(resolve_source(e)) for e in entries]
        return ShardImages(
            urls[0] if len(urls) == 1 else urls,
            pipeline,
            shuffle_buffer=shuffle_buffer,
            shuffle_shards=shuffle,
            seed=seed,
            num_samples=num_samples,
            max_pixels=max_pixels,
            allow_shell_pipes=allow_shell_pipes,
        )
    paths = [resolve_source(entry) for entry in entries]
    if not labelled:
        return UnlabelledImages(paths, pipeline, max_pixels=max_pixels)
    if len(paths) != 1:
        raise ValueError("several labelled sources cannot be combined: their class indices would collide")
    if not paths[0].exists():
        raise FileNotFoundError(f"data source not found: {paths[0]}")
    if not paths[0].is_dir():
        raise ValueError(f"labels need an ImageFolder tree (root/<class>/<image>), got the file {paths[0]}")
    return ImageFolderDataset(paths[0], pipeline, max_pixels=max_pixels)


def build_pretrain_dataset(
    source: Source,
    img_size: int = 224,
    *,
    scale: tuple[float, float] = (0.2, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    interpolation: Interpolation = "bicubic",
    hflip: float = 0.5,
    draft: bool = False,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    shuffle_buffer: int = 1000,
    seed: int = 0,
    num_samples: int | None = None,
    decode: Literal["cpu", "device"] = "cpu",
    crop: CropGeometry = "torchvision",
    allow_shell_pipes: bool = False,
) -> ImageDataset | ShardImages | EncodedImages:
    """The pretraining dataset: unlabelled images with the MILAN view (:func:`pretrain_transform`).

    Class folders, if any, are ignored: every image found is used, with label ``-1``. With ``decode="device"``
    the items are the encoded files (:class:`~milan.data.encoded.EncodedImages`), to be decoded and augmented on
    the training device by :func:`milan.data.encoded.decode_batch`.

    Args:
        source: See the module docstring.
        img_size: Output side length.
        scale: RandomResizedCrop area range.
        ratio: RandomResizedCrop aspect-ratio range.
        interpolation: Crop resampling.
        hflip: Flip probability.
        draft: JPEG draft decoding when the crop allows it (not in the references; see
            :mod:`milan.data.transforms`).
        max_pixels: Decompression-bomb guard (pixels).
        shuffle_buffer: Shards only: sample shuffle buffer (shard order is shuffled too).
        seed: Shards only: shuffle seed.
        num_samples: Shards only: the number of samples, if known.
        decode: ``"cpu"``: decode and augment in the dataset; ``"device"``: only read the files (not for shards).
        crop: The crop box rule (:data:`~milan.data.transforms.CropGeometry`; MILAN pretraining: torchvision's).
        allow_shell_pipes: Shards only: accept ``pipe:CMD`` sources and remote URLs (shell commands).

    Returns:
        Items ``(image (3, img_size, img_size), -1)`` or :class:`BadSample` (``decode="device"``: ``(Encoded,
        -1)`` or :class:`BadSample`).

    Raises:
        ValueError: ``decode="device"`` with tar shards.
    """
    pipeline = pretrain_transform(
        img_size, scale=scale, ratio=ratio, interpolation=interpolation, hflip=hflip, draft=draft, crop=crop
    )
    if decode == "device":
        if is_shard_source(_entries(source)):
            raise ValueError("data.decode='device' does not support tar shards; use data.decode=cpu")
        images = build_image_dataset(source, pipeline, labelled=False, max_pixels=max_pixels)
        assert isinstance(images, ImageDataset)
        return EncodedImages(images)
    return build_image_dataset(
        source,
        pipeline,
        labelled=False,
        max_pixels=max_pixels,
        shuffle=True,
        shuffle_buffer=shuffle_buffer,
        seed=seed,
        num_samples=num_samples,
        allow_shell_pipes=allow_shell_pipes,
    )


def build_eval_dataset(
    source: Source,
    img_size: int = 224,
    *,
    crop_pct: float = DEFAULT_CROP_PCT,
    interpolation: Interpolation = "bicubic",
    labelled: bool = True,
    draft: bool = False,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    num_samples: int | None = None,
) -> ImageDataset | ShardImages:
    """The evaluation dataset: Resize + CenterCrop (:func:`eval_transform`), labelled by class folder.

    Args:
        source: See the module docstring (labelled: an ImageFolder tree, or shards with ``.cls`` files).
        img_size: Output side length.
        crop_pct: Center-crop fraction (0.875: 256 -> 224).
        interpolation: Resize resampling.
        labelled: Read labels from class folders; ``False``: any image source, labels ``-1``.
        draft: JPEG draft decoding that keeps the resize exact in size.
        max_pixels: Decompression-bomb guard (pixels).
        num_samples: Shards only: the number of samples, if known.

    Returns:
        Items ``(image (3, img_size, img_size), label)`` or :class:`BadSample`.
    """
    pipeline = eval_transform(img_size, crop_pct=crop_pct, interpolation=interpolation, draft=draft)
    return build_image_dataset(source, pipeline, labelled=labelled, max_pixels=max_pixels, num_samples=num_samples)
