"""Image data for pretraining and evaluation: sources, robust decoding, views, reproducible skip-aware loading.

``decode`` (bytes -> RGB, failures classified as skip reasons), ``sources`` (folders, lists, archives, shards),
``datasets`` (items and :func:`build_dataset`), ``transforms`` (the CPU views), ``device`` (``data.decode=device``),
``sampling`` (order, per-sample seeds, the loaders), ``report`` (``Batch``, ``SkipReport``, ``DataError``).
"""

from milan.data.datasets import ImageDataset, Item, ShardImages, build_dataset, describe_found
from milan.data.decode import DAMAGED_SHARD, BadSample, ImageDecodeError, decode_rgb, open_image
from milan.data.report import Batch, DataError, SkipReport, collate_images
from milan.data.sampling import build_loader, eval_batches, eval_loader, seeded_loader
from milan.data.sources import BUILTIN_SAMPLES, default_cache_dir, extract_archive_subset, scan_sources
from milan.data.transforms import ImagePipeline, eval_transform, finetune_transform, pretrain_transform

__all__ = [
    "BUILTIN_SAMPLES",
    "DAMAGED_SHARD",
    "BadSample",
    "Batch",
    "DataError",
    "ImageDataset",
    "ImageDecodeError",
    "ImagePipeline",
    "Item",
    "ShardImages",
    "SkipReport",
    "build_dataset",
    "build_loader",
    "collate_images",
    "decode_rgb",
    "default_cache_dir",
    "describe_found",
    "eval_batches",
    "eval_loader",
    "eval_transform",
    "extract_archive_subset",
    "finetune_transform",
    "open_image",
    "pretrain_transform",
    "scan_sources",
    "seeded_loader",
]
