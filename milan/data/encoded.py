"""Encoded samples for ``data.decode: device``: the workers read files, the training device decodes them.

The DataLoader workers only read each file, parse its header (Pillow, no pixel decoding: empty, non-image and
oversized files are skipped there, as on the CPU path) and draw the sample's augmentation seed;
:func:`collate_encoded` packs a batch's files back to back in one ``uint8`` tensor (one shared-memory block per
batch). In the main process :func:`decode_batch` decodes the batch on the training device
(:func:`~milan.data.device_decode.decode_on_device`) and applies the view there
(:class:`~milan.data.device_augment.DeviceAugment`), giving the usual :class:`~milan.data.batch.Batch` whose
``skipped`` also holds the files that failed to decode.

The seed is drawn from the global ``torch`` generator inside ``__getitem__``: under
:class:`milan.data.sampling.SeededSamples`, which seeds it per ``(seed, epoch, index)``, every sample's crop and
flip are reproducible on resume and independent of workers and processes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch.utils.data import Dataset

from milan.data.batch import Batch
from milan.data.datasets import ImageDataset
from milan.data.decode import BadSample, ImageDecodeError, open_image
from milan.data.device_augment import DeviceAugment
from milan.data.device_decode import decode_on_device

_SEED_RANGE = 1 << 62


class Encoded(NamedTuple):
    """One sample's file, as read by a worker."""

    data: bytes  # the encoded file
    seed: int  # the augmentation seed
    path: str


EncodedItem = tuple[Encoded, int] | BadSample
"""What :class:`EncodedImages` returns: ``(Encoded, label)`` or a :class:`BadSample`."""


class EncodedImages(Dataset[EncodedItem]):
    """The files of an :class:`~milan.data.datasets.ImageDataset`, read and header-checked but not decoded.

    Args:
        images: The dataset whose files are read (its pipeline is not used; its ``max_pixels`` is).
    """

    def __init__(self, images: ImageDataset) -> None:
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> EncodedItem:
        read = self.images.read(index)
        if isinstance(read, BadSample):
            return read
        data, label = read
        path = str(self.images.samples[index][0])
        try:
            open_image(data, max_pixels=self.images.max_pixels)  # the header only
        except ImageDecodeError as err:
            return BadSample(path, err.reason, err.detail)
        seed = int(torch.randint(_SEED_RANGE, (1,)).item())
        return Encoded(data, seed, path), label

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.images!r})"


@dataclass
class EncodedBatch:
    """A batch of encoded files plus the samples the workers already skipped.

    Attributes:
        data: ``(N,)`` uint8, the files back to back.
        offsets: ``B + 1`` byte offsets: file ``i`` is ``data[offsets[i]:offsets[i + 1]]``.
        seeds: ``B`` augmentation seeds.
        paths: ``B`` paths.
        labels: ``(B,)`` int64 labels.
        skipped: Samples skipped in the workers.
    """

    data: torch.Tensor
    offsets: list[int]
    seeds: list[int]
    paths: list[str]
    labels: torch.Tensor
    skipped: tuple[BadSample, ...] = ()

    def __len__(self) -> int:
        return len(self.seeds)

    def files(self) -> list[torch.Tensor]:
        """The ``B`` files, ``(N_i,)`` uint8 views of :attr:`data`."""
        return [self.data[a:b] for a, b in zip(self.offsets[:-1], self.offsets[1:], strict=True)]


def collate_encoded(items: Sequence[EncodedItem]) -> EncodedBatch:
    """DataLoader ``collate_fn`` for :class:`EncodedImages`: packs the files, keeps the bad samples aside.

    Args:
        items: Dataset items.

    Returns:
        The :class:`EncodedBatch` (possibly of no files).
    """
    bad = tuple(item for item in items if isinstance(item, BadSample))
    good = [item for item in items if not isinstance(item, BadSample)]
    offsets = [0]
    for encoded, _ in good:
        offsets.append(offsets[-1] + len(encoded.data))
    packed = bytearray(b"".join(encoded.data for encoded, _ in good))
    data = torch.frombuffer(packed, dtype=torch.uint8) if packed else torch.empty(0, dtype=torch.uint8)  # (N,)
    return EncodedBatch(
        data=data,
        offsets=offsets,
        seeds=[encoded.seed for encoded, _ in good],
        paths=[encoded.path for encoded, _ in good],
        labels=torch.tensor([label for _, label in good], dtype=torch.long),  # (B,)
        skipped=bad,
    )


def decode_batch(batch: EncodedBatch, augment: DeviceAugment, device: torch.device) -> tuple[Batch, torch.Tensor]:
    """Decodes and augments a batch on ``device``.

    Args:
        batch: From :func:`collate_encoded`.
        augment: The view.
        device: Where to decode and augment (CUDA: nvJPEG).

    Returns:
        ``(Batch, keep)``: the batch of the decodable images (``images`` ``(B_ok, 3, S, S)`` float32 on
        ``device``; ``skipped`` = the workers' plus the undecodable files) and the ``(B,)`` bool mask of the
        files kept (to select their rows of per-sample tensors such as the mask noise).
    """
    decoded = decode_on_device(batch.files(), batch.paths, device)
    keep = torch.tensor([not isinstance(d, BadSample) for d in decoded], dtype=torch.bool)  # (B,)
    images = [d for d in decoded if not isinstance(d, BadSample)]
    seeds = [s for s, d in zip(batch.seeds, decoded, strict=True) if not isinstance(d, BadSample)]
    failed = tuple(d for d in decoded if isinstance(d, BadSample))
    views = augment(images, seeds) if images else torch.empty(0, 3, 0, 0, device=device)  # (B_ok, 3, S, S)
    out = Batch(images=views, labels=batch.labels[keep].to(device), skipped=batch.skipped + failed)
    return out, keep
