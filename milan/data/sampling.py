"""Sample order, per-sample seeds and the DataLoaders.

Training (:func:`seeded_loader`): every random choice made for a sample (its crop and flip, the noise its mask is
drawn from) comes from a seed derived from ``(seed, epoch, index)`` alone (:func:`mix_seeds`). It does not depend on
the batch size, the number of processes, the DataLoader workers, or whether the run was interrupted: a mid-epoch
resume only needs the epoch and the batches already consumed, and two processes with half the batch each see exactly
the samples, crops and masks that one process with the whole batch sees. Evaluation (:func:`eval_loader`): every
process takes the indices ``rank, rank + world_size, ...`` in order, without padding, so summed counts are exact.
Streams (tar shards) order themselves; :func:`build_loader` seeds their workers from ``(seed, rank)``.
"""

from __future__ import annotations

import os
import random
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, NamedTuple

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, IterableDataset, Sampler
from tqdm import tqdm

from milan import distributed as dist
from milan.data.decode import BadSample
from milan.data.report import Batch, SkipReport, collate_images
from milan.errors import ConfigError

SampleKey = tuple[int, int]  # (epoch, index): what EpochSampler yields and SeededSamples is indexed with

_MASK64 = (1 << 64) - 1


def _mix64(x: int) -> int:
    """SplitMix64 finaliser: a well-mixed 64-bit integer from any integer."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def mix_seeds(*parts: int) -> int:
    """A 63-bit seed, a pure function of ``parts`` (seed, epoch, index, stream ...); distinct tuples are unrelated.

    The one seed derivation of the data pipeline: samples, loader workers and shard shuffles. SplitMix64 rather than
    numpy's ``SeedSequence``: about 20x cheaper per sample, and defined for negative integers.
    """
    x = _mix64(parts[0])
    for part in parts[1:]:
        x = _mix64(x ^ part)
    return x >> 1


class EpochSampler(DistributedSampler[int]):
    """Shuffled, rank-sharded ``(epoch, index)`` keys that can start mid-epoch: the training sampler.

    torch's :class:`~torch.utils.data.DistributedSampler` order (``randperm(n)`` seeded with ``seed + epoch``,
    truncated to a multiple of ``world_size`` or padded by wrapping around, every ``world_size``-th index from
    ``rank``), each index keyed with its epoch, from the resume position ``start`` on.
    """

    def __init__(
        self,
        num_samples: int,
        *,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        drop_last: bool = True,
    ) -> None:
        if num_samples < 1:
            raise ValueError("the dataset is empty")
        indices: Any = range(num_samples)  # a Sized stand-in for the dataset: only its length is read
        super().__init__(indices, num_replicas=world_size, rank=rank, seed=seed, drop_last=drop_last)
        self.start = 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Selects the epoch (reshuffles) and skips its first ``start`` samples of this process (resume)."""
        super().set_epoch(epoch)
        self.start = start

    def __iter__(self) -> Iterator[SampleKey]:  # type: ignore[override]
        return iter([(self.epoch, i) for i in list(super().__iter__())[self.start :]])

    def __len__(self) -> int:
        return max(0, self.num_samples - self.start)


class Keyed(NamedTuple):
    """A dataset item plus the per-sample mask noise derived from its key."""

    item: Any
    noise: torch.Tensor  # (L,) uniform [0, 1)


class SeededSamples(Dataset[Keyed]):
    """Indexes a map-style dataset with ``(epoch, index)`` keys and makes its randomness a function of the key.

    The wrapped ``__getitem__`` (decoding plus augmentation, which draws from the global ``torch`` and ``random``
    generators) runs with both seeded from ``mix_seeds(seed, epoch, index, 0)``; their previous states are restored
    afterwards. ``noise_len`` uniform numbers for the mask draw come from the independent stream 1.
    """

    def __init__(self, dataset: Dataset[Any], seed: int, noise_len: int = 0) -> None:
        self.dataset = dataset
        self.seed = seed
        self.noise_len = noise_len

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: SampleKey) -> Keyed:
        epoch, index = key
        s = mix_seeds(self.seed, epoch, index, 0)
        py_state = random.getstate()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(s)
            random.seed(s)
            item = self.dataset[index]
        random.setstate(py_state)
        g = torch.Generator().manual_seed(mix_seeds(self.seed, epoch, index, 1))
        return Keyed(item, torch.rand(self.noise_len, generator=g))


def keyed_collate(collate: Callable[[list[Any]], Any]) -> Callable[[Sequence[Keyed]], tuple[Any, torch.Tensor]]:
    """``collate`` for :class:`SeededSamples` items: ``batch -> (collate(items), noise (B_kept, L))``.

    The noise rows of :class:`~milan.data.decode.BadSample` items, which ``collate`` drops, are dropped too, so that
    they stay aligned with the kept images.
    """

    def fn(batch: Sequence[Keyed]) -> tuple[Any, torch.Tensor]:
        noise = [k.noise for k in batch if not isinstance(k.item, BadSample)]
        stacked = torch.stack(noise) if noise else torch.empty(0, batch[0].noise.shape[0] if batch else 0)
        return collate([k.item for k in batch]), stacked

    return fn


def default_num_workers() -> int:
    """The DataLoader workers of ``data.num_workers: null``: min(8, the cores this process may run on)."""
    try:
        cores = len(os.sched_getaffinity(0))  # respects taskset, cgroups' cpusets, SLURM
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return min(8, max(1, cores))


def build_loader(
    dataset: Dataset[Any],
    batch_size: int,
    *,
    sampler: Sampler[Any] | Iterable[Any] | None = None,
    num_workers: int | None = 0,
    drop_last: bool = False,
    seed: int | None = 0,
    rank: int | None = None,
    pin_memory: bool | None = None,
    persistent_workers: bool | None = None,
    collate_fn: Callable[[list[Any]], Any] = collate_images,
) -> DataLoader[Any]:
    """A DataLoader of :class:`~milan.data.report.Batch` objects (or what ``collate_fn`` makes), in order.

    Args:
        dataset: Map-style (in the order of ``sampler``, else its own) or a stream (no sampler).
        batch_size: Samples per batch, before dropping bad ones.
        sampler: The indices or keys to load (e.g. an :class:`EpochSampler`).
        num_workers: Worker processes (0: the main process; ``None``: :func:`default_num_workers`).
        drop_last: Drop the last incomplete batch.
        seed: The workers' random streams: PyTorch seeds worker ``w`` (``torch``, ``random``, ``numpy``) with
            ``base_seed + w``, drawn each epoch from a generator seeded with ``mix_seeds(seed, rank)``, so
            augmentations differ across workers and ranks and repeat for the same seed (``num_workers=0``: the main
            process's global RNG). ``None``: from the global ``torch`` RNG (datasets that seed each sample).
        rank: Mixed into ``seed``; default: the current distributed rank.
        pin_memory: Page-locked batches for faster host-to-GPU copies; default: when CUDA is available.
        persistent_workers: Keep workers alive between epochs; default: when ``num_workers > 0``.
        collate_fn: Makes a batch from a list of items.
    """
    if isinstance(dataset, IterableDataset) and sampler is not None:
        raise ValueError("an iterable dataset (e.g. webdataset shards) orders itself: pass no sampler")
    num_workers = default_num_workers() if num_workers is None else num_workers
    rank = dist.rank() if rank is None else rank
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        collate_fn=collate_fn,
        pin_memory=torch.cuda.is_available() if pin_memory is None else pin_memory,
        drop_last=drop_last,
        generator=None if seed is None else torch.Generator().manual_seed(mix_seeds(seed, rank)),
        persistent_workers=num_workers > 0 and (persistent_workers is None or persistent_workers),
    )


def seeded_loader(
    dataset: Dataset[Any],
    *,
    batch_size: int,
    seed: int,
    noise_len: int = 0,
    num_workers: int | None = 0,
    device: torch.device,
    key: str,
    collate: Callable[[list[Any]], Any] = collate_images,
) -> tuple[DataLoader[Any], EpochSampler, int]:
    """The resumable training loader of a map-style dataset, sharded over the processes.

    Args:
        dataset: Map-style dataset of items.
        batch_size: Samples per batch on each process (incomplete batches are dropped).
        seed: Run seed.
        noise_len: Per-sample mask-noise length (number of patches; 0: none).
        num_workers: DataLoader workers (``None``: :func:`default_num_workers`).
        device: Where batches go (pinned memory for CUDA).
        key: The data's config key and value, for the error message (``"data.train"``).
        collate: The dataset's collate function (e.g. :func:`milan.data.device.collate_encoded`).

    Returns:
        ``(loader, sampler, batches per epoch on each process)``; batches are ``(Batch, noise (B, noise_len))``.

    Raises:
        ConfigError: Fewer samples per process than one batch.
    """
    n = len(dataset)  # type: ignore[arg-type]
    sampler = EpochSampler(n, seed=seed, rank=dist.rank(), world_size=dist.world_size())
    if sampler.num_samples < batch_size:
        raise ConfigError(
            f"{key} has {n} images: fewer than batch_size={batch_size} per process ({dist.world_size()} "
            "process(es)); lower batch_size or use more data"
        )
    loader = build_loader(
        SeededSamples(dataset, seed, noise_len=noise_len),  # indexed by (epoch, index) keys
        batch_size,
        sampler=sampler,
        drop_last=True,
        collate_fn=keyed_collate(collate),
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
        seed=None,  # every sample seeds itself: the workers' seeds do not matter
    )
    return loader, sampler, sampler.num_samples // batch_size


def eval_loader(
    dataset: Dataset[Any],
    batch_size: int,
    num_workers: int | None,
    device: torch.device,
    collate: Callable[[list[Any]], Any] = collate_images,
) -> DataLoader[Any]:
    """This process's share of an evaluation set (indices ``rank::world_size``, in order, no padding)."""
    shard = range(dist.rank(), len(dataset), dist.world_size())  # type: ignore[arg-type]
    pin = device.type == "cuda"
    return build_loader(
        dataset, batch_size, sampler=shard, num_workers=num_workers, pin_memory=pin, persistent_workers=False,
        collate_fn=collate,
    )  # fmt: skip


def eval_batches(
    loader: Iterable[Batch],
    device: torch.device,
    *,
    report: SkipReport | None = None,
    progress: bool = False,
    desc: str = "eval",
) -> Iterator[tuple[torch.Tensor, Batch]]:
    """``(images (B, 3, H, W) on device, batch)`` of a loader's batches; unreadable files go to ``report``.

    Batches that lost every image are passed over; ``progress`` shows a bar labelled ``desc`` (on a terminal).
    """
    bar = tqdm(loader, desc=desc, disable=not (progress and sys.stderr.isatty()), leave=False, dynamic_ncols=True)
    for batch in bar:
        if report is not None:
            report.update(batch)
        if not batch.empty:
            yield batch.images.to(device, non_blocking=True), batch
