"""Datasets, and :func:`build_dataset`: the one place that turns a user's data source into a dataset.

Every item (of every dataset here) is ``(image (3, H, W) float32, label)``, the label an ``int`` class index or
``-1`` for unlabelled sources, or a :class:`~milan.data.decode.BadSample` for a sample that cannot be used: returned,
not raised, so that it crosses DataLoader worker processes and is counted by :class:`milan.data.report.SkipReport`.
"""

from __future__ import annotations

import os
import re
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Literal, overload

import torch
from torch.utils.data import Dataset, IterableDataset, get_worker_info

from milan import distributed as dist
from milan.data.decode import DAMAGED_SHARD, DEFAULT_MAX_PIXELS, BadSample, ImageDecodeError, open_file, open_image
from milan.data.sampling import mix_seeds
from milan.data.sources import (
    ARCHIVE_SUFFIXES,
    IMAGE_EXTENSIONS,
    ImageScan,
    Source,
    describe_ignored,
    entries_of,
    extract_archive_subset,
    is_shard_source,
    no_images_error,
    resolve_source,
    scan_images,
    scan_sources,
    shell_sources,
)
from milan.data.transforms import ImagePipeline
from milan.errors import ConfigError

Item = tuple[torch.Tensor, int] | BadSample
UNLABELLED = -1


class ImageDataset(Dataset[Item]):
    """Images at known paths with integer labels, decoded and transformed by an :class:`ImagePipeline`.

    Args:
        classes: Class names indexed by label (empty for unlabelled data).
        max_pixels: Larger images are skipped as ``"too large"`` (decompression-bomb guard).
        ignored: Files the scan left out for their extension, by extension.
        source: Where the samples come from, as the user named it (for messages).
    """

    def __init__(
        self,
        samples: Sequence[tuple[Path, int]],
        pipeline: ImagePipeline,
        *,
        classes: Sequence[str] = (),
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
        ignored: Counter[str] | None = None,
        source: str = "",
    ) -> None:
        self.samples = list(samples)
        self.pipeline = pipeline
        self.classes = list(classes)
        self.max_pixels = max_pixels
        self.ignored: Counter[str] = Counter(ignored or {})
        self.source = source

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> Item:
        path, label = self.samples[index]
        opened = open_file(path, self.max_pixels)
        if isinstance(opened, BadSample):
            return opened
        try:
            return self.pipeline(opened[1]), label
        except ImageDecodeError as err:
            return err.skip(path)


def describe_found(dataset: ImageDataset, *, unit: str = "") -> str:
    """The start-of-run line: ``"found 1000 images (10 classes) in SOURCE (ignored ...); UNIT"``.

    ``unit`` (e.g. ``"31 steps per epoch"``) follows a ``"; "``.
    """
    n, k = len(dataset), len(dataset.classes)
    classes = f" ({k} class{'es' if k != 1 else ''})" if k else ""
    text = f"found {n} image{'s' if n != 1 else ''}{classes} in {dataset.source}"
    ignored = describe_ignored(dataset.ignored)
    return text + (f" ({ignored})" if ignored else "") + (f"; {unit}" if unit else "")


# ----------------------------------------------------------------------------------------------------------------
# Tar shards (webdataset format)


_IMAGE_KEYS = tuple(ext.lstrip(".") for ext in IMAGE_EXTENSIONS)
_DAMAGE_KEY = "__damaged_shard__"
_NAME_IN_REPR = re.compile(r"name='([^']*)'")


class ShardImages(IterableDataset[Item]):
    """Images (and optional integer labels) streamed from webdataset tar shards; needs ``webdataset``.

    A sample's files share a key: ``000123.jpg`` (any accepted extension) and optionally ``000123.cls`` (an integer
    label as text; absent: -1). Shards are split across ranks, then DataLoader workers, then shuffled (shard order
    and a sample buffer). A shard that cannot be read to its end does not stop the epoch: the samples read before the
    damage are used, and the stream carries a ``"damaged shard"`` :class:`BadSample` naming the shard, the samples
    read from it and the error. ``pipe:CMD`` sources and remote URLs, which webdataset opens by running shell
    commands (``curl``, ``gsutil``), are refused unless ``allow_shell_pipes``.

    Args:
        urls: Shard paths/URLs: one string (brace patterns allowed) or a sequence.
        shuffle_buffer: Samples held for shuffling; 0 keeps the shards' order and theirs.
        seed: Seed of the shuffles (mixed with the epoch, rank and worker).
        num_samples: The number of samples, if known (``len()`` raises otherwise).
        allow_shell_pipes: Accept ``pipe:`` sources and remote URLs.
    """

    def __init__(
        self,
        urls: str | Sequence[str],
        pipeline: ImagePipeline,
        *,
        shuffle_buffer: int = 0,
        seed: int = 0,
        num_samples: int | None = None,
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
        allow_shell_pipes: bool = False,
    ) -> None:
        try:  # fail early, in the main process
            import webdataset  # noqa: F401
        except ImportError as err:
            raise ImportError(
                "reading tar shards needs the optional 'webdataset' package: pip install 'milan-pretrain[webdataset]'"
            ) from err
        self.urls: str | list[str] = urls if isinstance(urls, str) else [os.fspath(u) for u in urls]
        commands = shell_sources(entries_of(self.urls))
        if commands and not allow_shell_pipes:
            raise ValueError(
                f"{commands[0]!r} would run a shell command (webdataset opens pipe: sources and remote URLs with "
                "one); set data.allow_shell_pipes=true to allow it"
            )
        self.pipeline = pipeline
        self.shuffle_buffer = shuffle_buffer
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

    def __iter__(self) -> Iterator[Item]:
        import webdataset as wds

        info = get_worker_info()
        seed = mix_seeds(self.seed, self.epoch + self._iterations, dist.rank(), info.id if info is not None else 0)
        self._iterations += 1
        errors: list[tuple[str | None, str]] = []  # (shard or None, message), filled by the handler

        def handler(exn: Exception) -> bool:
            errors.append(_shard_error(exn))
            return True  # go on with the next shard

        dataset: Any = wds.WebDataset(
            self.urls,
            shardshuffle=100 if self.shuffle_buffer > 0 else False,
            seed=seed,
            nodesplitter=wds.split_by_node,
            workersplitter=wds.split_by_worker,
            handler=handler,
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
        image_key = next(keys, None)
        if image_key is None:
            return BadSample(name, "not an image", f"no image file in the sample (keys: {sorted(sample)})")
        label = UNLABELLED
        if "cls" in sample:
            try:
                label = int(bytes(sample["cls"]).decode().strip())
            except ValueError:
                return BadSample(name, "corrupt", "label file .cls is not an integer")
        try:
            return self.pipeline(open_image(bytes(sample[image_key]), max_pixels=self.max_pixels)), label
        except ImageDecodeError as err:
            return err.skip(f"{name}.{image_key}")


def _shard_error(exn: Exception) -> tuple[str | None, str]:
    """``(shard, message)`` of an exception webdataset hands to its handler.

    webdataset's tar reader appends ``" @ <file object>"`` to the message and its shard expander appends
    ``(stream, url)`` to ``args``; the URL is taken from there, else from the file object's name.
    """
    args = list(getattr(exn, "args", ()))
    url = args[-1] if len(args) > 1 and isinstance(args[-1], str) else None
    head, _, where = (str(args[0]) if args else "").partition(" @ ")
    if url is None and where:
        found = _NAME_IN_REPR.search(where)
        url = found.group(1) if found else None
    return url, f"{type(exn).__name__}: {head or type(exn).__name__}"


def _mark_damage(
    errors: list[tuple[str | None, str]],
) -> Callable[[Iterator[dict[str, Any]]], Iterator[dict[str, Any]]]:
    """A webdataset stage that inserts one marker sample per damaged shard into the stream.

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


# ----------------------------------------------------------------------------------------------------------------
# The builder


@overload
def build_dataset(
    source: Source | None,
    pipeline: ImagePipeline,
    *,
    key: str = ...,
    labelled: Literal[True],
    classes: Sequence[str] | None = ...,
    per_class: int | None = ...,
    max_pixels: int | None = ...,
) -> ImageDataset: ...


@overload
def build_dataset(
    source: Source | None,
    pipeline: ImagePipeline,
    *,
    key: str = ...,
    labelled: Literal[False] = ...,
    max_pixels: int | None = ...,
    shuffle_buffer: int = ...,
    seed: int = ...,
    num_samples: int | None = ...,
    allow_shell_pipes: bool = ...,
) -> ImageDataset | ShardImages: ...


def build_dataset(
    source: Source | None,
    pipeline: ImagePipeline,
    *,
    key: str = "data.path",
    labelled: bool = False,
    classes: Sequence[str] | None = None,
    per_class: int | None = None,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    shuffle_buffer: int = 0,
    seed: int = 0,
    num_samples: int | None = None,
    allow_shell_pipes: bool = False,
) -> ImageDataset | ShardImages:
    """The dataset of a data source (see :mod:`milan.data.sources`) with a view.

    Args:
        source: As the user gave it (``None``: not set).
        pipeline: Decode + transform (:mod:`milan.data.transforms`).
        key: The source's config key, for the messages (``data.train``, ``--data``).
        labelled: Labels index the class folders of an ImageFolder tree or an archive of one (its first
            ``per_class`` images of every class are unpacked once into the cache); otherwise every image of every
            entry (folders at any depth, lists, shards), with label -1.
        classes: Labelled: these class names, in this order, instead of the sorted subfolders (other folders are
            left out; a class without a folder keeps its index).
        per_class: Labelled: the first N images of every class, in natural name order (``img_2`` before ``img_10``).
        max_pixels: Decompression-bomb guard.
        shuffle_buffer: Shards: sample shuffle buffer, and shard order shuffled (0: neither).
        seed: Shards: shuffle seed.
        num_samples: Shards: the number of samples, if known.
        allow_shell_pipes: Shards: accept ``pipe:CMD`` sources and remote URLs (shell commands).

    Raises:
        ConfigError: Naming ``key``: a source that is not set, missing, holds no images, cannot be labelled, needs
            ``webdataset`` or runs a shell command without ``allow_shell_pipes``.
    """
    tree = "an ImageFolder tree root/<class>/<image>"
    what = f"{tree} or a .tar.gz" if labelled else "a folder of images, a .txt list or tar shards"
    if source is None:
        raise ConfigError(f"{key} is not set: pass {key}=PATH ({what})")
    entries = entries_of(source)
    try:
        if not entries:
            raise ValueError("empty data source list")
        commands = shell_sources(entries)  # pipe: and URLs: kept as written (a path would collapse their "//")
        if not labelled and (commands or is_shard_source(entries)):
            urls = [os.fspath(e) if os.fspath(e) in commands else os.fspath(resolve_source(e)) for e in entries]
            return ShardImages(
                urls[0] if len(urls) == 1 else urls, pipeline, shuffle_buffer=shuffle_buffer, seed=seed,
                num_samples=num_samples, max_pixels=max_pixels, allow_shell_pipes=allow_shell_pipes,
            )  # fmt: skip
        if not labelled:
            paths, ignored = scan_sources(entries)
            samples = [(path, UNLABELLED) for path in paths]
            where = ", ".join(os.fspath(e) for e in entries)
            return ImageDataset(samples, pipeline, max_pixels=max_pixels, ignored=ignored, source=where)
        if len(entries) != 1:
            raise ValueError("several labelled sources cannot be combined: their class indices would collide")
        first = resolve_source(entries[0])
        if not first.exists():
            raise FileNotFoundError(f"not found ({what})")
        if first.is_file() and first.name.endswith(ARCHIVE_SUFFIXES):
            first, per_class = extract_archive_subset(first, None, per_class=per_class), None
        elif not first.is_dir():
            raise NotADirectoryError(f"not a folder or a .tar/.tar.gz archive (labels need {tree})")
        if per_class is not None and per_class < 1:
            raise ValueError(f"per_class must be >= 1 or None, got {per_class}")
        if classes is None:  # ImageFolder's classes: the non-hidden subfolders, sorted
            classes = sorted(e.name for e in os.scandir(first) if e.is_dir() and not e.name.startswith("."))
            if not classes:
                raise FileNotFoundError(
                    f"no class subfolders in {first}: a labelled dataset needs one folder per class "
                    "(root/<class>/<image>)"
                )
        names = list(classes)
        samples, ignored = [], Counter()
        for label, name in enumerate(names):
            folder = first / name
            scan = scan_images(folder) if folder.is_dir() else ImageScan([], Counter())
            samples += [(path, label) for path in scan.paths[:per_class]]
            ignored += scan.ignored
        if not samples:
            raise no_images_error(f"the class folders of {first}", ignored)
        return ImageDataset(
            samples, pipeline, classes=names, max_pixels=max_pixels, ignored=ignored, source=os.fspath(entries[0])
        )
    except (FileNotFoundError, NotADirectoryError, ValueError, ImportError) as e:
        raise ConfigError(f"{key}={source!r}: {e}") from e


def match_classes(dataset: ImageDataset, names: Sequence[str], num_classes: int) -> list[str]:
    """Relabels a labelled dataset with a classifier's class indices, matched by folder name.

    Args:
        dataset: From :func:`build_dataset` (``labelled=True``).
        names: The classifier's class names in index order (empty: unknown; the folders' sorted order is then
            taken as the index order, and a note says so).
        num_classes: The classifier's output width.

    Returns:
        Notes for the user: the assumed order, or the classes the folder lacks (it is evaluated on those it has).

    Raises:
        ConfigError: A class folder the classifier does not know (named), or more folders than outputs.
    """
    where, folders = dataset.source, dataset.classes
    if not names:
        if len(folders) > num_classes:
            raise ConfigError(f"{where} has {len(folders)} class folders but the classifier has {num_classes} outputs")
        return [
            f"class names: the classifier does not store them; the folder's sorted class order is assumed to be its "
            f"output order ({folders[0]} = 0, {folders[-1]} = {len(folders) - 1})"
        ]
    unknown = [f for f in folders if f not in names]
    if unknown:
        known = ", ".join(names[:8]) + (", ..." if len(names) > 8 else "")
        raise ConfigError(
            f"{where}: class folder(s) {', '.join(unknown[:8])}{' ...' if len(unknown) > 8 else ''} unknown to "
            f"the classifier, which knows {len(names)} classes ({known})"
        )
    index = {name: i for i, name in enumerate(names)}
    dataset.samples = [(path, index[folders[label]]) for path, label in dataset.samples]
    dataset.classes = list(names)
    missing = [n for n in names if n not in folders]
    if not missing:
        return []
    return [
        f"{where} lacks {len(missing)} of the classifier's {len(names)} classes ({', '.join(missing[:8])}"
        f"{', ...' if len(missing) > 8 else ''}): evaluated on the {len(folders)} it has, matched by name"
    ]
