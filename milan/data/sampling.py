"""Reproducible, resumable sample order and per-sample randomness.

Every random choice made for a sample (its crop and flip, and the noise its mask is drawn from) comes from a
seed derived from ``(seed, epoch, index)`` alone. It therefore does not depend on the batch size, the number of
processes, the DataLoader workers, or whether the run was interrupted and resumed: a mid-epoch resume only needs
the epoch and the number of batches already consumed, and two processes with half the batch each see exactly the
samples, crops and masks that one process with the whole batch sees.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NamedTuple

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from milan import distributed as dist
from milan.data import build_loader, collate_images
from milan.data.decode import BadSample
from milan.train.config import ConfigError

SampleKey = tuple[int, int]
"""``(epoch, index)``: what :class:`EpochSampler` yields and :class:`SeededSamples` is indexed with."""

_MASK64 = (1 << 64) - 1


def _mix64(x: int) -> int:
    """SplitMix64 finaliser: a well-mixed 64-bit integer from any integer."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def sample_seed(seed: int, epoch: int, index: int, stream: int = 0) -> int:
    """A 63-bit seed for one sample in one epoch (``stream`` separates independent uses)."""
    return _mix64(_mix64(_mix64(_mix64(seed) ^ epoch) ^ index) ^ stream) >> 1


class EpochSampler(Sampler[SampleKey]):
    """Shuffled, rank-sharded ``(epoch, index)`` keys that can start mid-epoch.

    The order is :class:`torch.utils.data.DistributedSampler`'s: ``randperm(n)`` seeded with ``seed + epoch``,
    truncated to a multiple of ``world_size`` (``drop_last``) or padded by wrapping around, then every
    ``world_size``-th index from ``rank``.

    Args:
        num_samples: Dataset length.
        seed: Shuffle seed (the same on every process).
        rank: This process's rank.
        world_size: Number of processes.
        shuffle: Shuffle (otherwise the natural order).
        drop_last: Drop the tail that does not divide evenly among processes.
    """

    def __init__(
        self,
        num_samples: int,
        *,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = True,
        drop_last: bool = True,
    ) -> None:
        if num_samples < 1:
            raise ValueError("the dataset is empty")
        self.num_samples = num_samples
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.epoch = 0
        self.start = 0

    @property
    def per_rank(self) -> int:
        """Samples each process gets in a full epoch."""
        if self.drop_last:
            return self.num_samples // self.world_size
        return -(-self.num_samples // self.world_size)

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Selects the epoch (reshuffles) and skips its first ``start`` samples of this process (resume)."""
        self.epoch = epoch
        self.start = start

    def indices(self) -> list[int]:
        """This process's sample indices of the current epoch, from the start position."""
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.num_samples, generator=g).tolist()
        else:
            order = list(range(self.num_samples))
        total = self.per_rank * self.world_size
        if total > len(order):  # pad by wrapping around, as DistributedSampler does
            order += (order * (-(-total // len(order))))[: total - len(order)]
        return order[self.rank : total : self.world_size][self.start :]

    def __iter__(self) -> Iterator[SampleKey]:
        return iter([(self.epoch, i) for i in self.indices()])

    def __len__(self) -> int:
        return max(0, self.per_rank - self.start)


class Keyed(NamedTuple):
    """A dataset item plus the per-sample mask noise derived from its key."""

    item: Any
    noise: torch.Tensor  # (L,) uniform [0, 1)


class SeededSamples(Dataset[Keyed]):
    """Indexes a map-style dataset with ``(epoch, index)`` keys and makes its randomness a function of the key.

    The wrapped ``__getitem__`` (decoding plus augmentation, which draws from the global ``torch`` and
    ``random`` generators) runs with both generators seeded from :func:`sample_seed`; their previous states are
    restored afterwards. ``noise_len`` uniform numbers for the mask draw come from an independent stream.

    Args:
        dataset: Map-style dataset.
        seed: Run seed.
        noise_len: Length of the mask noise (number of patches); 0 for none.
    """

    def __init__(self, dataset: Dataset[Any], seed: int, noise_len: int = 0) -> None:
        self.dataset = dataset
        self.seed = seed
        self.noise_len = noise_len

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: SampleKey) -> Keyed:
        epoch, index = key
        s = sample_seed(self.seed, epoch, index)
        py_state = random.getstate()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(s)
            random.seed(s)
            item = self.dataset[index]
        random.setstate(py_state)
        g = torch.Generator().manual_seed(sample_seed(self.seed, epoch, index, stream=1))
        return Keyed(item, torch.rand(self.noise_len, generator=g))


def keyed_collate(
    collate: Callable[[list[Any]], Any],
) -> Callable[[Sequence[Keyed]], tuple[Any, torch.Tensor]]:
    """Wraps a collate function for :class:`SeededSamples` items.

    Args:
        collate: The data pipeline's collate, applied to the plain items; it may drop bad samples, which are
            are :class:`~milan.data.decode.BadSample` items, so that the noise rows stay aligned with the kept
            images.

    Returns:
        ``batch -> (collate(items), noise (B_kept, L))``.
    """

    def fn(batch: Sequence[Keyed]) -> tuple[Any, torch.Tensor]:
        items = [k.item for k in batch]
        noise = [k.noise for k in batch if not isinstance(k.item, BadSample)]
        stacked = torch.stack(noise) if noise else torch.empty(0, batch[0].noise.shape[0] if batch else 0)
        return collate(items), stacked

    return fn


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

    :class:`EpochSampler` keys, :class:`SeededSamples` items and :func:`keyed_collate` batches: the sample order and
    every random choice are functions of ``(seed, epoch, index)`` (see the module docstring).

    Args:
        dataset: Map-style dataset of :data:`~milan.data.datasets.Item`.
        batch_size: Samples per batch on each process (incomplete batches are dropped).
        seed: Run seed.
        noise_len: Per-sample mask-noise length (number of patches; 0: none).
        num_workers: DataLoader workers (``None``: ``min(8, available cores)``).
        device: Where batches go (pinned memory for CUDA).
        key: The data's config key and value, for the error message (``"data.train"``).
        collate: The dataset's collate function (e.g. :func:`milan.data.encoded.collate_encoded`).

    Returns:
        ``(loader, sampler, batches per epoch on each process)``; batches are ``(Batch, noise (B, noise_len))``.

    Raises:
        ConfigError: Fewer samples per process than one batch.
    """
    n = len(dataset)  # type: ignore[arg-type]
    sampler = EpochSampler(n, seed=seed, rank=dist.rank(), world_size=dist.world_size())
    if sampler.per_rank < batch_size:
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
    return loader, sampler, sampler.per_rank // batch_size
