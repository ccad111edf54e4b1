"""``milan knn``: weighted k-NN classification on frozen features (DINO protocol), batched and cached.

Both splits go through the evaluation view (Resize 256 bicubic + CenterCrop 224). The feature is the CLS token after
the encoder's final norm (``feature=avg``: the mean of the normed patch tokens). Each validation image takes its
``k`` most cosine-similar training images (default 20), which vote with weight ``exp(similarity / 0.07)``
(:mod:`milan.knn`). Several ``k`` are scored from one neighbour search.

Features are cached in ``cache_dir`` under a key that hashes the checkpoint's bytes, the dataset's files, the
transform and the feature type, so a second run (e.g. other ``k`` or temperature) skips the encoder entirely.
Under ``torchrun`` every process extracts its shard; the features are gathered, and the queries split again.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from milan import distributed as dist
from milan.data import ImageDataset, SkipReport, build_dataset, describe_found, eval_loader, eval_transform
from milan.jobs.encoder import input_size, load_pretrained_encoder
from milan.jobs.knn_features import (
    FeatureCache,
    FeatureFn,
    cache_key,
    dataset_fingerprint,
    extract_features,
    file_digest,
)
from milan.jobs.launch import add_run_arguments, run_job
from milan.knn import knn_neighbours, knn_vote
from milan.models.vit import VisionTransformer
from milan.train.config import KnnConfig, check_knn, save_config, to_dict
from milan.train.evaluation import TopKAccuracy
from milan.train.logging import RunLogger
from milan.train.loop import autocast_context
from milan.train.run import RunContext, seed_everything, start_run


@dataclass(frozen=True)
class KnnResult:
    """What ``milan knn`` reports."""

    run_dir: Path
    metrics: dict[int, dict[str, float]]  # k -> {"top1", "top5"}
    num_train: int
    num_val: int
    cache_hits: int  # splits read from the cache (0, 1 or 2)
    wall_time: float


def encoder_features(encoder: VisionTransformer, feature: Literal["cls", "avg"]) -> FeatureFn:
    """Images -> (B, D) frozen features: the CLS token after the final norm, or the mean of the patch tokens."""

    def fn(images: torch.Tensor) -> torch.Tensor:
        tokens = encoder.forward_features(images)  # (B, 1 + L, D), after the final norm
        return tokens[:, 0] if feature == "cls" else tokens[:, 1:].mean(dim=1)

    return fn


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
    """Top-1/top-5 of weighted k-NN for each ``k``; the queries are split over processes and the counts summed.

    Args:
        train: ``(features (N, D), labels (N,))``, the same on every process.
        val: ``(features (M, D), labels (M,))``, the same on every process.
        num_classes: Number of classes.
        ks: Neighbour counts to score.
        temperature: Vote temperature.
        device: Where to compute.
        query_chunk: Queries per similarity chunk.
        train_chunk: Train features per chunk.

    Returns:
        ``{k: {"top1": %, "top5": %}}``.
    """
    train_f, train_y = train[0].to(device), train[1].to(device)
    rank, world = dist.rank(), dist.world_size()
    query_f, query_y = val[0][rank::world].to(device), val[1][rank::world].to(device)
    sims, idx = knn_neighbours(train_f, query_f, max(ks), query_chunk=query_chunk, train_chunk=train_chunk)
    neighbour_labels = train_y[idx]  # (m, kmax), most similar first
    out: dict[int, dict[str, float]] = {}
    for k in ks:
        scores = knn_vote(sims[:, :k], neighbour_labels[:, :k], num_classes, temperature)  # (m, C)
        meter = TopKAccuracy((1, 5))
        meter.update(scores, query_y)
        meter.load_counts(dist.all_reduce_sum(meter.counts().to(device)).cpu())
        out[k] = meter.compute()
    return out


def knn(cfg: KnnConfig) -> KnnResult:
    """Runs the k-NN evaluation.

    Args:
        cfg: The validated config.

    Returns:
        The result (every process; only the main one writes files).
    """
    check_knn(cfg)
    with start_run(cfg.out_dir, cfg.runtime) as run:
        return _knn(cfg, run)


def _knn(cfg: KnnConfig, run: RunContext) -> KnnResult:
    device, dtype, run_dir = run.device, run.dtype, run.run_dir
    seed_everything(cfg.seed)
    encoder, encoder_desc = load_pretrained_encoder(cfg.encoder)
    encoder = encoder.to(device).eval()
    size = input_size(cfg.data.img_size, encoder)
    data = cfg.data
    pipeline = eval_transform(size, crop_pct=data.crop_pct, interpolation=data.interpolation)
    train_set = build_dataset(
        data.train, pipeline, key="data.train", labelled=True, per_class=data.train_per_class,
        max_pixels=data.max_image_pixels,
    )  # fmt: skip
    val_set = build_dataset(
        data.val, pipeline, key="data.val", labelled=True, classes=train_set.classes, per_class=data.val_per_class,
        max_pixels=data.max_image_pixels,
    )  # fmt: skip
    log = RunLogger(run_dir, enabled=dist.is_main(), total_steps=1, progress=cfg.log.progress, tensorboard=False)
    cache = FeatureCache(cfg.cache_dir, torch.float16 if cfg.cache_dtype == "float16" else torch.float32)
    weights = file_digest(cfg.encoder.pretrained) if cfg.encoder.pretrained else f"random:{cfg.encoder.model_name}"
    fn = encoder_features(encoder, cfg.feature)
    report = SkipReport(max_skip_fraction=data.max_skip_fraction)
    hits = 0
    if dist.is_main():
        save_config(cfg, run_dir / "config.yaml")
    log.info(run.header("knn"))
    log.info(f"encoder: {encoder_desc}; feature {cfg.feature}, {size} px")
    for name, split in (("train", train_set), ("val", val_set)):
        batches = -(-len(split) // (cfg.batch_size * dist.world_size()))
        log.info(f"{name}: {describe_found(split, unit=f'{batches} batches of {cfg.batch_size} per process')}")

    def features(name: str, dataset: ImageDataset) -> tuple[torch.Tensor, torch.Tensor]:
        nonlocal hits
        key = cache_key(
            weights=weights, num_heads=encoder.num_heads, data=dataset_fingerprint(dataset), transform=repr(pipeline),
            feature=cfg.feature, seed=cfg.seed if cfg.encoder.pretrained is None else None, version=1,
        )  # fmt: skip
        found = cache.load(key)
        if dist.broadcast_object(found is not None):  # every process takes the same branch
            if found is None:
                raise FileNotFoundError(f"feature cache entry {cache.path(key)} is visible to rank 0 only")
            hits += 1
            log.info(f"{name} features: {tuple(found[0].shape)} from the cache {cache.path(key)}")
            return found
        t0 = time.perf_counter()
        loader = eval_loader(dataset, cfg.batch_size, data.num_workers, device)
        ctx = lambda: autocast_context(device, dtype)  # noqa: E731
        progress = cfg.log.progress and dist.is_main()
        split_report = SkipReport(max_skip_fraction=data.max_skip_fraction)
        f, y = extract_features(
            fn, loader, device, autocast=ctx, report=split_report, desc=f"{name} features", progress=progress
        )
        split_report.all_reduce(device if device.type == "cuda" else None)
        split_report.check(f"data.{name}")  # no usable image, or too many skipped: DataError
        report.merge(split_report)
        f, y = dist.all_gather_rows(f.to(device)).cpu(), dist.all_gather_rows(y.to(device)).cpu()
        f = cache.round(f)
        if dist.is_main():
            cache.save(key, f, y, meta={"split": name, "source": dataset.source, "encoder": encoder_desc})
        log.info(f"{name} features: {tuple(f.shape)} extracted in {time.perf_counter() - t0:.1f} s")
        return f, y

    train = features("train", train_set)
    val = features("val", val_set)
    if report.skipped:
        log.warning(report.summary())
    metrics = knn_accuracy(
        train, val, len(train_set.classes), cfg.k, cfg.temperature, device, query_chunk=cfg.query_chunk,
        train_chunk=cfg.train_chunk,
    )  # fmt: skip
    wall = time.perf_counter() - run.t_start
    first = cfg.k[0]
    summary: dict[str, Any] = {
        "job": "knn", "top1": metrics[first]["top1"], "top5": metrics[first]["top5"], "k": first,
        "temperature": cfg.temperature, "feature": cfg.feature, "by_k": {str(k): v for k, v in metrics.items()},
        "num_train": int(train[0].shape[0]), "num_val": int(val[0].shape[0]), "cache_hits": hits, "wall_time": wall,
    }  # fmt: skip
    log.write({"event": "summary", "step": 0, **summary, "data": report.as_dict()})
    if dist.is_main():
        (run_dir / "results.json").write_text(json.dumps({**summary, "config": to_dict(cfg)}, indent=2) + "\n")
    for k, m in metrics.items():
        log.info(f"k-NN k={k} T={cfg.temperature}: top-1 {m['top1']:.2f}  top-5 {m['top5']:.2f}")
    log.info(
        f"done: k-NN top-1 {summary['top1']:.2f} (k={first}) on {summary['num_val']} images against "
        f"{summary['num_train']} in {wall:.1f} s; results {run_dir / 'results.json'}"
    )
    log.close()
    return KnnResult(run_dir, metrics, summary["num_train"], summary["num_val"], hits, wall)


# ----------------------------------------------------------------------------------------------------------------
# Command line


def add_arguments(parser: argparse.ArgumentParser, command: str) -> None:
    """Adds ``milan knn``'s arguments."""
    add_run_arguments(parser, "configs/knn/cifar10_tiny_cpu.yaml", resume=False)


def run(args: argparse.Namespace) -> int:
    """Runs ``milan knn``; returns the exit status."""

    def job(cfg: KnnConfig, a: argparse.Namespace) -> Any:
        return knn(cfg)

    return run_job("knn", KnnConfig, check_knn, job, args)


__all__ = ["KnnResult", "add_arguments", "encoder_features", "knn", "knn_accuracy", "run"]
