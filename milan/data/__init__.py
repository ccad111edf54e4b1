"""Image data for pretraining and evaluation: sources, robust decoding, views, skip-aware loading.

Items are ``(image (3, H, W) float tensor, label int)`` with label ``-1`` for unlabelled sources, or a
:class:`BadSample` for a file that cannot be decoded; :func:`build_loader` collates them into :class:`Batch`
objects whose ``skipped`` field carries the bad samples to a :class:`SkipReport`.
"""

from milan.data.archive import default_cache_dir, extract_archive_subset
from milan.data.batch import Batch, SkipReport, collate_images
from milan.data.builders import (
    Source,
    build_eval_dataset,
    build_image_dataset,
    build_pretrain_dataset,
    resolve_source,
)
from milan.data.datasets import (
    UNLABELLED,
    ImageDataset,
    ImageFolderDataset,
    Item,
    SyntheticImages,
    UnlabelledImages,
    collect_image_paths,
)
from milan.data.decode import (
    DEFAULT_MAX_PIXELS,
    SKIP_REASONS,
    BadSample,
    ImageDecodeError,
    SkipReason,
    decode_rgb,
    load_rgb,
    open_image,
    to_rgb,
)
from milan.data.loader import build_loader, loader_generator
from milan.data.shards import ShardImages, is_shard_source
from milan.data.sources import (
    BUILTIN_SAMPLES,
    IMAGE_EXTENSIONS,
    find_classes,
    find_images,
    is_image_file,
    read_file_list,
    sample_images_dir,
)
from milan.data.transforms import (
    ImagePipeline,
    RandomResizedCropDecode,
    ResizeDecode,
    draft_to,
    eval_transform,
    pretrain_transform,
)

__all__ = [
    "BUILTIN_SAMPLES",
    "DEFAULT_MAX_PIXELS",
    "IMAGE_EXTENSIONS",
    "SKIP_REASONS",
    "UNLABELLED",
    "BadSample",
    "Batch",
    "ImageDataset",
    "ImageDecodeError",
    "ImageFolderDataset",
    "ImagePipeline",
    "Item",
    "RandomResizedCropDecode",
    "ResizeDecode",
    "ShardImages",
    "SkipReason",
    "SkipReport",
    "Source",
    "SyntheticImages",
    "UnlabelledImages",
    "build_eval_dataset",
    "build_image_dataset",
    "build_loader",
    "build_pretrain_dataset",
    "collate_images",
    "collect_image_paths",
    "decode_rgb",
    "default_cache_dir",
    "draft_to",
    "eval_transform",
    "extract_archive_subset",
    "find_classes",
    "find_images",
    "is_image_file",
    "is_shard_source",
    "load_rgb",
    "loader_generator",
    "open_image",
    "pretrain_transform",
    "read_file_list",
    "resolve_source",
    "sample_images_dir",
    "to_rgb",
]
