"""Tar shards (webdataset format) as an iterable dataset; needs the optional ``webdataset`` package.

A shard is a tar file in which the files of one sample share a key: ``000123.jpg`` (the image; any of the
accepted extensions) and optionally ``000123.cls`` (an integer label as text). Shards are split across
distributed ranks first, then across DataLoader workers, then shuffled (shard order and a sample buffer).
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator, Sequence
from types import ModuleType
from typing import Any

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from milan.data.datasets import UNLABELLED, Item
from milan.data.decode import DEFAULT_MAX_PIXELS, BadSample, ImageDecodeError, open_image
from milan.data.sources import IMAGE_EXTENSIONS
from milan.data.transforms import ImagePipeline

_IMAGE_KEYS = tuple(ext.lstrip(".") for ext in IMAGE_EXTENSIONS)


def import_webdataset() -> ModuleType:
    """Imports ``webdataset``, with an actionable error when it is not installed.

    Returns:
        The ``webdataset`` module.

    Raises:
        ImportError: The package is missing.
    """
    try:
        import webdataset
    except ImportError as err:
        raise ImportError(
            "reading tar shards needs the optional 'webdataset' package: pip install 'milan-pretrain[webdataset]'"
        ) from err
    module: ModuleType = webdataset
    return module


def is_shard_source(source: str | os.PathLike[str] | Sequence[str | os.PathLike[str]]) -> bool:
    """Whether a data source names tar shards: ``*.tar`` paths, brace patterns (``a-{000..009}.tar``), ``pipe:``."""
    entries = [source] if isinstance(source, str | os.PathLike) else list(source)
    if not entries:
        return False
    for entry in entries:
        text = os.fspath(entry)
        if not (text.startswith("pipe:") or text.endswith(".tar") or ("{" in text and ".tar" in text)):
            return False
    return True


class ShardImages(IterableDataset[Item]):
    """Images (and optional integer labels) streamed from webdataset tar shards.

    Args:
        urls: Shard paths/URLs: one string (brace patterns allowed) or a sequence.
        pipeline: Decode + transform for each image.
        shuffle_buffer: Samples held for shuffling (0: keep the shard order).
        shuffle_shards: Shuffle the shard order each epoch.
        label_key: Extension of the label file (``"cls"``); absent labels give ``-1``.
        seed: Seed of the shard and sample shuffles (mixed with the epoch, rank and worker).
        num_samples: The number of samples, if known (``len()`` raises otherwise).
        max_pixels: Decompression-bomb guard, see :func:`milan.data.decode.open_image`.

    Raises:
        ImportError: ``webdataset`` is not installed.
    """

    def __init__(
        self,
        urls: str | Sequence[str],
        pipeline: ImagePipeline,
        *,
        shuffle_buffer: int = 0,
        shuffle_shards: bool = True,
        label_key: str = "cls",
        seed: int = 0,
        num_samples: int | None = None,
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
    ) -> None:
        import_webdataset()  # fail early, in the main process
        self.urls: str | list[str] = urls if isinstance(urls, str) else [os.fspath(u) for u in urls]
        self.pipeline = pipeline
        self.shuffle_buffer = shuffle_buffer
        self.shuffle_shards = shuffle_shards
        self.label_key = label_key
        self.seed = seed
        self.num_samples = num_samples
        self.max_pixels = max_pixels
        self.epoch = 0
        self._iterations = 0  # counts epochs inside persistent workers, where set_epoch cannot reach

    def set_epoch(self, epoch: int) -> None:
        """Changes the shuffles for a new epoch (call before creating the epoch's iterator)."""
        self.epoch = epoch

    def __len__(self) -> int:
        if self.num_samples is None:
            raise TypeError("the number of samples in the shards is unknown: pass num_samples=")
        return self.num_samples

    def _stream_seed(self) -> int:
        info = get_worker_info()
        worker = info.id if info is not None else 0
        dist = torch.distributed
        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        state = np.random.SeedSequence([self.seed, self.epoch + self._iterations, rank, worker])
        return int(state.generate_state(1)[0])

    def __iter__(self) -> Iterator[Item]:
        wds = import_webdataset()
        seed = self._stream_seed()
        self._iterations += 1
        dataset: Any = wds.WebDataset(
            self.urls,
            shardshuffle=100 if self.shuffle_shards else False,
            seed=seed,
            nodesplitter=wds.split_by_node,
            workersplitter=wds.split_by_worker,
            handler=wds.warn_and_continue,  # an unreadable shard is warned about and skipped
            empty_check=False,  # fewer shards than workers leaves some workers without data
        )
        if self.shuffle_buffer > 0:
            dataset = dataset.shuffle(self.shuffle_buffer, seed=seed)
        for sample in dataset:
            yield self._decode(sample)

    def _decode(self, sample: dict[str, Any]) -> Item:
        name = f"{sample.get('__url__', '?')}:{sample.get('__key__', '?')}"
        keys = (key for key in sample if not key.startswith("__") and key.lower().rsplit(".", 1)[-1] in _IMAGE_KEYS)
        image_key = next(itertools.islice(keys, 1), None)
        if image_key is None:
            return BadSample(name, "not an image", f"no image file in the sample (keys: {sorted(sample)})")
        label = UNLABELLED
        if self.label_key in sample:
            try:
                label = int(bytes(sample[self.label_key]).decode().strip())
            except ValueError:
                return BadSample(name, "corrupt", f"label file .{self.label_key} is not an integer")
        try:
            image = self.pipeline(open_image(bytes(sample[image_key]), max_pixels=self.max_pixels))
        except ImageDecodeError as err:
            return BadSample(f"{name}.{image_key}", err.reason, err.detail)
        return image, label
