"""``milan knn``: weighted k-NN classification on frozen features (DINO protocol), batched and cached.

Both splits go through the evaluation view (Resize 256 bicubic + CenterCrop 224). The feature is the CLS token after
the encoder's final norm (``feature=avg``: the mean of the normed patch tokens). Each validation image takes its
``k`` most cosine-similar training images (default 20), which vote with weight ``exp(similarity / 0.07)``
(:mod:`milan.knn`). Several ``k`` are scored from one neighbour search.

Features are cached in ``cache_dir`` under a key that hashes everything they depend on: the checkpoint's bytes, the
dataset's files (paths, sizes, modification times), the transform and the feature type, so a second run (e.g. other
``k`` or temperature) skips the encoder entirely, and a changed file misses the cache instead of reusing stale
features. Under ``torchrun`` every process extracts its shard; the features are gathered, and the queries split again.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from milan import distributed as dist
from milan.checkpoint.io import CheckpointError, atomic_save, safe_load
from milan.data import Batch, SkipReport, describe_found, eval_batches, eval_loader, eval_transform
from milan.jobs.classifier import input_size, labelled_splits, load_pretrained_encoder
from milan.jobs.launch import add_run_arguments, run_job
from milan.knn import knn_neighbours, knn_vote
from milan.models.vit import VisionTransformer
from milan.train.config import KnnConfig, check_knn, save_config, to_dict
from milan.train.evaluation import TopKAccuracy
from milan.train.logging import RunLogger
from milan.train.loop import autocast_context
from milan.train.run import seed_everything, start_run

COMMANDS = {"knn": "weighted k-NN evaluation on frozen features"}


@dataclass(frozen=True)
class KnnResult:
    """What ``milan knn`` reports."""

    run_dir: Path
    metrics: dict[int, dict[str, float]]  # k -> {"top1", "top5"}
    num_train: int
    num_val: int
    cache_hits: int  # splits read from the cache (0, 1 or 2)
    wall_time: float


def knn(cfg: KnnConfig) -> KnnResult:
    """Runs the k-NN evaluation; returns the result on every process (only the main one writes files)."""
    check_knn(cfg)
    with start_run(cfg.out_dir, cfg.runtime) as run:
        seed_everything(cfg.seed)
        encoder, encoder_desc = load_pretrained_encoder(cfg.encoder)
        encoder = encoder.to(run.device).eval()
        size, data = input_size(cfg.data.img_size, encoder), cfg.data
        pipeline = eval_transform(size, crop_pct=data.crop_pct, interpolation=data.interpolation)
        train_set, val_set, _ = labelled_splits(data, pipeline, size, None)  # both splits in the evaluation view
        sets = {"train": train_set, "val": val_set}
        log = RunLogger(
            run.run_dir, enabled=dist.is_main(), total_steps=1, progress=cfg.log.progress, tensorboard=False
        )
        if dist.is_main():
            save_config(cfg, run.run_dir / "config.yaml")
        log.info(run.header("knn"))
        log.info(f"encoder: {encoder_desc}; feature {cfg.feature}, {size} px")
        for name, split in sets.items():
            batches = -(-len(split) // (cfg.batch_size * dist.world_size()))
            log.info(f"{name}: {describe_found(split, unit=f'{batches} batches of {cfg.batch_size} per process')}")
        cache = FeatureCache(cfg.cache_dir, torch.float16 if cfg.cache_dtype == "float16" else torch.float32)
        report = SkipReport(max_skip_fraction=data.max_skip_fraction)
        weights = f"random:{cfg.encoder.model_name}"
        if cfg.encoder.pretrained:  # the checkpoint's bytes
            h = hashlib.sha256()  # hashlib.file_digest needs Python 3.11
            with open(cfg.encoder.pretrained, "rb") as file:
                while block := file.read(1 << 22):
                    h.update(block)
            weights = h.hexdigest()
        key = {"weights": weights, "num_heads": encoder.num_heads, "transform": repr(pipeline), "feature": cfg.feature,
               "seed": cfg.seed if cfg.encoder.pretrained is None else None, "version": 1}  # fmt: skip
        splits, hits = {}, 0
        for name, dataset in sets.items():  # (features (N, D), labels (N,)) on every process
            entry = cache_key(**key, data=dataset_fingerprint(dataset))
            found = cache.load(entry)
            if dist.broadcast_object(found is not None):  # every process takes the same branch
                if found is None:
                    raise FileNotFoundError(f"feature cache entry {cache.path(entry)} is visible to rank 0 only")
                log.info(f"{name} features: {tuple(found[0].shape)} from the cache {cache.path(entry)}")
                splits[name], hits = found, hits + 1
                continue
            t0 = time.perf_counter()
            loader = eval_loader(dataset, cfg.batch_size, data.num_workers, run.device)
            split_report = SkipReport(max_skip_fraction=data.max_skip_fraction)
            fn = functools.partial(encoder_features, encoder, cfg.feature)
            f, y = extract_features(
                fn, loader, run.device, run.dtype, report=split_report, desc=f"{name} features",
                progress=cfg.log.progress and dist.is_main(),
            )  # fmt: skip
            split_report.all_reduce(run.device if run.device.type == "cuda" else None)
            split_report.check(f"data.{name}")  # no usable image, or too many skipped: DataError
            report.merge(split_report)
            f, y = dist.all_gather_rows(f.to(run.device)).cpu(), dist.all_gather_rows(y.to(run.device)).cpu()
            splits[name] = cache.round(f), y
            if dist.is_main():
                meta = {"split": name, "encoder": encoder_desc, "source": dataset.source}
                cache.save(entry, *splits[name], meta=meta)
            log.info(f"{name} features: {tuple(f.shape)} extracted in {time.perf_counter() - t0:.1f} s")
        train, val = splits["train"], splits["val"]
        if report.skipped:
            log.warning(report.summary())
        metrics = knn_accuracy(
            train, val, len(train_set.classes), cfg.k, cfg.temperature, run.device, query_chunk=cfg.query_chunk,
            train_chunk=cfg.train_chunk,
        )  # fmt: skip
        wall = time.perf_counter() - run.t_start
        first = cfg.k[0]
        summary: dict[str, Any] = {
            "job": "knn", "top1": metrics[first]["top1"], "top5": metrics[first]["top5"], "k": first,
            "temperature": cfg.temperature, "feature": cfg.feature, "by_k": {str(k): v for k, v in metrics.items()},
            "num_train": int(train[0].shape[0]), "num_val": int(val[0].shape[0]), "cache_hits": hits,
            "wall_time": wall,
        }  # fmt: skip
        log.write({"event": "summary", "step": 0, **summary, "data": report.as_dict()})
        if dist.is_main():
            (run.run_dir / "results.json").write_text(json.dumps({**summary, "config": to_dict(cfg)}, indent=2) + "\n")
        for k, m in metrics.items():
            log.info(f"k-NN k={k} T={cfg.temperature}: top-1 {m['top1']:.2f}  top-5 {m['top5']:.2f}")
        log.info(
            f"done: k-NN top-1 {summary['top1']:.2f} (k={first}) on {summary['num_val']} images against "
            f"{summary['num_train']} in {wall:.1f} s; results {run.run_dir / 'results.json'}"
        )
        log.close()
        return KnnResult(run.run_dir, metrics, summary["num_train"], summary["num_val"], hits, wall)


def encoder_features(encoder: VisionTransformer, feature: Literal["cls", "avg"], images: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) images -> (B, D) frozen features: the CLS token after the final norm, or the mean of the patches."""
    tokens = encoder.forward_features(images)  # (B, 1 + L, D), after the final norm
    return tokens[:, 0] if feature == "cls" else tokens[:, 1:].mean(dim=1)


@torch.no_grad()
def extract_features(
    fn: Callable[[torch.Tensor], torch.Tensor],
    loader: Iterable[Batch],
    device: torch.device,
    dtype: torch.dtype = torch.float32,
    *,
    report: SkipReport | None = None,
    desc: str = "features",
    progress: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``fn`` (images (B, 3, H, W) on ``device`` -> (B, D)) over a loader of :class:`~milan.data.Batch` objects.

    Unreadable files are left out (and go to ``report``); ``dtype`` is the autocast dtype on CUDA.

    Returns:
        ((N, D) float32 features, (N,) int64 labels), on the CPU, in loader order.
    """
    feats: list[torch.Tensor] = []
    labels: list[torch.Tensor] = []
    for images, batch in eval_batches(loader, device, report=report, progress=progress, desc=desc):
        with autocast_context(device, dtype):
            feats.append(fn(images).float().cpu())  # (B, D)
        labels.append(batch.labels.long().cpu())
    if not feats:
        return torch.zeros(0, 0), torch.zeros(0, dtype=torch.long)
    return torch.cat(feats), torch.cat(labels)


def knn_accuracy(
    train: tuple[torch.Tensor, torch.Tensor],
    val: tuple[torch.Tensor, torch.Tensor],
    num_classes: int,
    ks: list[int],
    temperature: float,
    device: torch.device,
    *,
    query_chunk: int = 256,
    train_chunk: int | None = None,
) -> dict[int, dict[str, float]]:
    """``{k: {"top1": %, "top5": %}}`` of weighted k-NN for each of ``ks``, from one neighbour search.

    ``train`` and ``val`` are ``(features (N, D), labels (N,))``, the same on every process; the queries are split
    over the processes and the counts summed. ``query_chunk`` and ``train_chunk`` bound the similarity matrix.
    """
    train_f, train_y = train[0].to(device), train[1].to(device)
    rank, world = dist.rank(), dist.world_size()
    query_f, query_y = val[0][rank::world].to(device), val[1][rank::world].to(device)
    sims, idx = knn_neighbours(train_f, query_f, max(ks), query_chunk=query_chunk, train_chunk=train_chunk)
    neighbour_labels = train_y[idx]  # (m, kmax), most similar first
    out: dict[int, dict[str, float]] = {}
    for k in ks:
        scores = knn_vote(sims[:, :k], neighbour_labels[:, :k], num_classes, temperature)  # (m, C)
        meter = TopKAccuracy()
        meter.update(scores, query_y)
        meter.load_counts(dist.all_reduce_sum(meter.counts().to(device)).cpu())
        out[k] = meter.compute()
    return out


# ----------------------------------------------------------------------------------------------------------------
# The feature cache


def dataset_fingerprint(dataset: Any) -> str:
    """A hash of a dataset's files: its ``samples`` (``(path, label)``) with their sizes and mtimes, else its repr."""
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
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:32]


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
        """``features`` as a later :meth:`load` returns them, so that a first and a cached run compute alike."""
        return features.to(self.dtype).float()

    def save(self, key: str, features: torch.Tensor, labels: torch.Tensor, meta: dict[str, Any] | None = None) -> None:
        """Stores an entry (no-op when disabled); ``meta`` is a JSON-able description for humans."""
        path = self.path(key)
        if path is not None:
            blob = {"features": features.to(self.dtype), "labels": labels.long(), "meta": json.dumps(meta or {})}
            atomic_save(blob, path)


def add_arguments(parser: argparse.ArgumentParser, command: str) -> None:
    add_run_arguments(parser, "configs/knn/cifar10_tiny_cpu.yaml", resume=False)


def run(args: argparse.Namespace) -> int:
    return run_job(args, KnnConfig, check_knn, knn)
