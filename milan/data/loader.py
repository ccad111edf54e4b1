"""The DataLoader builder: skip-aware collation, reproducible per-worker and per-rank randomness.

Seeding. The loader gets a ``torch.Generator`` seeded from ``(seed, rank)``. PyTorch draws each epoch's
``base_seed`` from it and seeds worker ``w`` with ``base_seed + w`` (``torch``, ``random`` and ``numpy``), so
augmentations differ across workers and ranks and repeat exactly for the same ``seed``; the same generator
drives ``shuffle`` when no sampler is given. With ``num_workers=0`` the augmentations run in the main process
and draw from its global ``torch`` RNG: seed that (``torch.manual_seed``) for repeatable runs. ``seed=None``
gives no generator: PyTorch then draws ``base_seed`` from the global ``torch`` RNG (for datasets that seed each
sample themselves, such as :class:`milan.data.sampling.SeededSamples`, where the workers' seeds do not matter).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, Sampler

from milan.data.batch import collate_images


def _rank() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return 0


MAX_DEFAULT_WORKERS = 8


def available_cores() -> int:
    """CPU cores this process may run on (``os.sched_getaffinity``: respects taskset, cgroups' cpusets, SLURM)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def default_num_workers() -> int:
    """The DataLoader workers used when the config says ``null``: ``min(8, available cores)``."""
    return min(MAX_DEFAULT_WORKERS, available_cores())


def resolve_num_workers(num_workers: int | None) -> int:
    """``num_workers``, or :func:`default_num_workers` for ``None``."""
    return default_num_workers() if num_workers is None else num_workers


def loader_generator(seed: int, rank: int = 0) -> torch.Generator:
    """A generator whose stream is a pure function of ``(seed, rank)`` (distinct pairs give unrelated streams).

    Args:
        seed: The run's seed.
        rank: Distributed rank.

    Returns:
        A seeded CPU generator.
    """
    state = np.random.SeedSequence([seed, rank]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(state) & 0x7FFF_FFFF_FFFF_FFFF)


def build_loader(
    dataset: Dataset[Any],
    batch_size: int,
    *,
    shuffle: bool = False,
    num_workers: int | None = 0,
    sampler: Sampler[Any] | None = None,
    drop_last: bool = False,
    seed: int | None = 0,
    rank: int | None = None,
    pin_memory: bool | None = None,
    persistent_workers: bool | None = None,
    prefetch_factor: int | None = None,
    timeout: float = 0,
    collate_fn: Callable[[list[Any]], Any] = collate_images,
) -> DataLoader[Any]:
    """Builds a DataLoader that yields :class:`~milan.data.batch.Batch` objects (or what ``collate_fn`` makes).

    Args:
        dataset: A dataset of :data:`~milan.data.datasets.Item` (map-style or iterable, e.g. shards), or of
            whatever ``collate_fn`` takes.
        batch_size: Samples per batch (before dropping bad ones).
        shuffle: Shuffle a map-style dataset (ignored when ``sampler`` is given; pass a shuffling sampler).
        num_workers: Worker processes (0: load in the main process; ``None``: :func:`default_num_workers`).
        sampler: E.g. a ``DistributedSampler`` (call its ``set_epoch`` every epoch).
        drop_last: Drop the last incomplete batch.
        seed: Seed of shuffling and of the workers' augmentation randomness (``None``: the global ``torch`` RNG,
            see the module docstring).
        rank: Distributed rank mixed into the seed; default: the current ``torch.distributed`` rank, else 0.
        pin_memory: Page-locked batches for faster host-to-GPU copies; default: when CUDA is available.
        persistent_workers: Keep workers alive between epochs; default: when ``num_workers > 0``.
        prefetch_factor: Batches loaded in advance by each worker (PyTorch default 2).
        timeout: Seconds to wait for a worker's batch before raising (0: forever).
        collate_fn: Makes a batch from a list of samples (default :func:`~milan.data.batch.collate_images`;
            e.g. :func:`milan.data.sampling.keyed_collate` of it for seeded samples).

    Returns:
        The DataLoader.

    Raises:
        ValueError: Inconsistent options (``shuffle`` or ``sampler`` with an iterable dataset).
    """
    iterable = isinstance(dataset, IterableDataset)
    if iterable and (shuffle or sampler is not None):
        raise ValueError("an iterable dataset (e.g. webdataset shards) shuffles itself: pass shuffle=False, no sampler")
    num_workers = resolve_num_workers(num_workers)
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers}")
    extra: dict[str, Any] = {}
    if num_workers > 0:
        extra["persistent_workers"] = True if persistent_workers is None else persistent_workers
        if prefetch_factor is not None:
            extra["prefetch_factor"] = prefetch_factor
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle and sampler is None,
        sampler=sampler,
        num_workers=num_workers,
        collate_fn=collate_fn,
        pin_memory=torch.cuda.is_available() if pin_memory is None else pin_memory,
        drop_last=drop_last,
        timeout=timeout,
        generator=None if seed is None else loader_generator(seed, _rank() if rank is None else rank),
        **extra,
    )
