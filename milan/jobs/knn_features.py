"""Frozen-feature extraction with an on-disk cache.

The cache key hashes everything the features depend on: the checkpoint's bytes, the dataset's file list
(paths, sizes, mtimes), the transform's ``repr`` and what is read out of the encoder. A changed checkpoint,
file or transform therefore misses the cache instead of silently reusing stale features.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import torch

from milan.checkpoint.io import CheckpointError, atomic_save, safe_load
from milan.data import Batch, SkipReport, eval_batches

FeatureFn = Callable[[torch.Tensor], torch.Tensor]


def file_digest(path: str | os.PathLike[str], chunk: int = 1 << 22) -> str:
    """SHA-256 of a file's bytes (hex)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def dataset_fingerprint(dataset: Any) -> str:
    """A hash of a dataset's identity.

    Uses ``dataset.samples`` (torchvision ``ImageFolder`` style ``(path, label)`` pairs) with each file's size and
    mtime when available, else the dataset's ``repr`` and length.

    Args:
        dataset: The dataset.

    Returns:
        Hex digest.
    """
    h = hashlib.sha256()
    samples = getattr(dataset, "samples", None)
    if samples is not None:
        for path, label in samples:
            st = os.stat(path)
            h.update(f"{os.path.abspath(path)}\0{label}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    else:
        h.update(f"{type(dataset).__name__}\0{len(dataset)}\0{dataset!r}".encode())
    return h.hexdigest()


def cache_key(**parts: Any) -> str:
    """A stable hex key for a set of named parts (JSON-serialised, unknown types through ``str``)."""
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


@torch.no_grad()
def extract_features(
    fn: FeatureFn,
    loader: Iterable[Batch],
    device: torch.device,
    *,
    autocast: Callable[[], AbstractContextManager[Any]] = nullcontext,
    report: SkipReport | None = None,
    desc: str = "features",
    progress: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Runs ``fn`` over a loader of :class:`~milan.data.Batch` objects (unreadable files are left out).

    Args:
        fn: Images (B, 3, H, W) on ``device`` -> features (B, D).
        loader: Yields batches (e.g. :func:`milan.data.eval_loader`: this process's shard).
        device: Device to run on.
        autocast: Factory of the autocast context (``nullcontext`` on CPU).
        report: Receives the skipped files.
        desc: Progress-bar label.
        progress: Show a progress bar.

    Returns:
        ((N, D) float32 features, (N,) int64 labels), on the CPU, in loader order.
    """
    feats: list[torch.Tensor] = []
    labels: list[torch.Tensor] = []
    for images, batch in eval_batches(loader, device, report=report, progress=progress, desc=desc):
        with autocast():
            out = fn(images)  # (B, D)
        feats.append(out.float().cpu())
        labels.append(batch.labels.long().cpu())
    if not feats:
        return torch.zeros(0, 0), torch.zeros(0, dtype=torch.long)
    return torch.cat(feats), torch.cat(labels)


class FeatureCache:
    """Features and labels stored as ``<folder>/<key>.pt`` (written atomically, read with ``weights_only=True``).

    Args:
        folder: The cache folder (``~`` expanded); ``None`` disables the cache.
        dtype: Storage dtype of the features (float16 halves the disk use; cosine k-NN is insensitive to it).
    """

    def __init__(self, folder: str | os.PathLike[str] | None, dtype: torch.dtype = torch.float16) -> None:
        self.folder = Path(folder).expanduser() if folder is not None else None
        self.dtype = dtype

    def path(self, key: str) -> Path | None:
        """Where ``key`` is stored (``None`` when disabled)."""
        return self.folder / f"{key}.pt" if self.folder is not None else None

    def load(self, key: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(features float32, labels)`` if cached and readable, else ``None``."""
        path = self.path(key)
        if path is None or not path.is_file():
            return None
        try:
            blob = safe_load(path)
            return blob["features"].float(), blob["labels"].long()
        except (CheckpointError, KeyError, TypeError, AttributeError):  # unreadable entry: recompute, overwrite
            return None

    def round(self, features: torch.Tensor) -> torch.Tensor:
        """``features`` as a later :meth:`load` returns them (rounded to the storage dtype).

        A first run and a cached run therefore compute on the same numbers.
        """
        return features.to(self.dtype).float()

    def save(self, key: str, features: torch.Tensor, labels: torch.Tensor, meta: dict[str, Any] | None = None) -> None:
        """Stores an entry (no-op when disabled); ``meta`` is a JSON-able description for humans."""
        path = self.path(key)
        if path is not None:
            blob = {"features": features.to(self.dtype), "labels": labels.long(), "meta": json.dumps(meta or {})}
            atomic_save(blob, path)
