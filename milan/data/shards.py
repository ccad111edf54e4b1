"""Tar shards (webdataset format) as an iterable dataset; needs the optional ``webdataset`` package.

A shard is a tar file in which the files of one sample share a key: ``000123.jpg`` (the image; any of the
accepted extensions) and optionally ``000123.cls`` (an integer label as text). Shards are split across
distributed ranks first, then across DataLoader workers, then shuffled (shard order and a sample buffer).

A shard that cannot be read to its end (truncated, corrupt, missing) does not stop the epoch: the samples read
before the damage are used, and the stream carries a :class:`BadSample` with reason ``"damaged shard"`` naming the
shard, the samples read from it and the error, which :class:`milan.data.SkipReport` counts apart from images.

Shell commands. webdataset runs ``pipe:CMD`` sources in a shell and fetches remote URLs (``http://``, ``gs://``,
...) with ``curl``/``gsutil`` commands; these sources are refused unless the caller opts in
(``allow_shell_pipes=True``, the config key ``data.allow_shell_pipes``). Local shards are opened as files.
"""

from __future__ import annotations

import itertools
import os
import re
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from types import ModuleType
from typing import Any

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from milan.data.datasets import UNLABELLED, Item
from milan.data.decode import DAMAGED_SHARD, DEFAULT_MAX_PIXELS, BadSample, ImageDecodeError, open_image
from milan.data.sources import IMAGE_EXTENSIONS
from milan.data.transforms import ImagePipeline

_IMAGE_KEYS = tuple(ext.lstrip(".") for ext in IMAGE_EXTENSIONS)

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]+):")  # two characters at least: "C:" is a drive letter
_DAMAGE_KEY = "__damaged_shard__"


def shell_sources(entries: Iterable[str | os.PathLike[str]]) -> list[str]:
    """The entries that webdataset would open by running a shell command: ``pipe:`` and remote URLs.

    Args:
        entries: Shard paths or URLs.

    Returns:
        Those with a scheme other than ``file:`` and ``builtin:`` (``pipe:``, ``http:``, ``https:``, ``gs:``, ...).
    """
    out = []
    for entry in entries:
        text = os.fspath(entry)
        match = _SCHEME.match(text)
        if match is not None and match.group(1).lower() not in ("file", "builtin"):
            out.append(text)
    return out


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
    """Whether a data source names tar shards: ``*.tar`` paths, brace patterns (``a-{000..009}.tar``), ``pipe:``.

    Only the names are looked at (``pipe:`` commands are not run here).
    """
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
        allow_shell_pipes: Accept ``pipe:`` sources and remote URLs, which webdataset opens by running shell
            commands (see the module docstring).

    Raises:
        ImportError: ``webdataset`` is not installed.
        ValueError: A ``pipe:`` or remote source without ``allow_shell_pipes``.
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
        allow_shell_pipes: bool = False,
    ) -> None:
        import_webdataset()  # fail early, in the main process
        self.urls: str | list[str] = urls if isinstance(urls, str) else [os.fspath(u) for u in urls]
        commands = shell_sources([self.urls] if isinstance(self.urls, str) else self.urls)
        if commands and not allow_shell_pipes:
            raise ValueError(
                f"{commands[0]!r} would run a shell command (webdataset opens pipe: sources and remote URLs with "
                "one); set data.allow_shell_pipes=true to allow it"
            )
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
        errors: list[tuple[str | None, str]] = []  # (shard or None, message), filled by the handler

        def handler(exn: Exception) -> bool:
            errors.append(_shard_error(exn))
            return True  # go on with the next shard

        dataset: Any = wds.WebDataset(
            self.urls,
            shardshuffle=100 if self.shuffle_shards else False,
            seed=seed,
            nodesplitter=wds.split_by_node,
            workersplitter=wds.split_by_worker,
            handler=handler,  # a damaged shard becomes a "damaged shard" marker (_mark_damage)
            empty_check=False,  # fewer shards than workers leaves some workers without data
        )
        dataset = dataset.compose(_mark_damage(errors))  # before the shuffle: counts in shard order
        if self.shuffle_buffer > 0:
            dataset = dataset.shuffle(self.shuffle_buffer, seed=seed)
        for sample in dataset:
            if _DAMAGE_KEY in sample:
                url, detail = sample[_DAMAGE_KEY]
                yield BadSample(url, DAMAGED_SHARD, detail)
            else:
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


_NAME_IN_REPR = re.compile(r"name='([^']*)'")


def _shard_error(exn: Exception) -> tuple[str | None, str]:
    """``(shard, message)`` of an exception webdataset hands to its handler (it appends the shard URL to ``args``).

    webdataset's tar reader appends ``" @ <file object>"`` to the message and its shard expander appends
    ``(stream, url)`` to ``args``; the URL is taken from there, else from the file object's name.
    """
    args = list(getattr(exn, "args", ()))
    url = args[-1] if len(args) > 1 and isinstance(args[-1], str) else None
    message = str(args[0]) if args else ""
    head, _, where = message.partition(" @ ")
    if url is None and where:
        found = _NAME_IN_REPR.search(where)
        url = found.group(1) if found else None
    return url, f"{type(exn).__name__}: {head or type(exn).__name__}"


def _mark_damage(
    errors: list[tuple[str | None, str]],
) -> Callable[[Iterator[dict[str, Any]]], Iterator[dict[str, Any]]]:
    """A webdataset pipeline stage that inserts one marker sample per damaged shard into the sample stream.

    The marker (``{_DAMAGE_KEY: (shard, detail)}``) comes once the stream has moved past the damaged shard (its last
    partial sample, which webdataset yields late, is counted with it) and says how many samples were read from it.
    """

    def stage(samples: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        read: Counter[str] = Counter()
        damaged: dict[str, str] = {}  # shard -> first error, in order
        reported: set[str] = set()
        current: str | None = None

        def markers(keep: str | None) -> Iterator[dict[str, Any]]:
            while errors:
                url, message = errors.pop(0)
                damaged.setdefault(url or current or "?", message)
            for url, message in damaged.items():
                if url != keep and url not in reported:
                    reported.add(url)
                    n = read[url]
                    detail = f"unreadable after {n} sample{'s' if n != 1 else ''} ({message}); the rest is lost"
                    yield {_DAMAGE_KEY: (url, detail)}

        for sample in samples:
            current = str(sample.get("__url__", "?"))
            yield from markers(keep=current)
            read[current] += 1
            yield sample
        yield from markers(keep=None)

    return stage
