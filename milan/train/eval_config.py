"""Typed configs of the evaluation jobs (``milan linprobe``, ``milan finetune``, ``milan knn``).

They extend the engine's :class:`~milan.train.config.RunConfig` (batch, optimizer, schedule, runtime, checkpoints,
logging), so presets, dotted overrides, validation and the saved ``config.yaml`` work exactly as for pretraining.
Defaults are the MILAN ViT-B/16 ImageNet-1K recipes (the original code, github.com/zejiangh/MILAN, and mmpretrain
1.2.0's ``configs/milan/benchmarks/``); the presets in
``configs/{linprobe,finetune,knn}/`` repeat them with their sources.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from milan.data.transforms import CropGeometry
from milan.ranges import Range
from milan.train.config import (
    ConfigError,
    LogConfig,
    OptimConfig,
    RunConfig,
    RuntimeConfig,
    ScheduleConfig,
    check_ranges,
    check_run,
)
from milan.train.lars import LarsVariant

Interp = Literal["bicubic", "bilinear"]


@dataclass
class ClassifyDataConfig:
    """Labelled train / validation images.

    ``train`` and ``val`` are ImageFolder trees (``root/<class>/<image>``) or ``.tar``/``.tar.gz`` archives laid out
    as ``[<split>/]<class>/<image>``; an archive is unpacked once (the first ``*_per_class`` images of every class,
    in natural name order) into the cache folder (``$MILAN_CACHE`` or ``~/.cache/milan``); a folder uses the same
    first ``*_per_class`` images in place.
    """

    train: str | None = None  # required: ImageFolder tree or archive (null in the presets: the data is yours)
    val: str | None = None  # required
    train_per_class: int | None = None  # the first N images per class, in natural name order (None: all)
    val_per_class: int | None = None
    img_size: int | None = None  # None = the encoder's input size (its position table is fixed)
    scale: tuple[float, float] = (0.08, 1.0)  # train RandomResizedCrop area range (torchvision default)
    # linear probe's train crop box: byol = ORIG util/crop.py (one draw, sides clamped to the image, no retries);
    # torchvision = RandomResizedCrop.get_params (10 tries, then a centre crop; mmpretrain). Fine-tuning uses timm's
    crop_geometry: CropGeometry = "byol"
    # linear probe's train view: JPEG draft decoding (faster on large photos, slightly different pixels; not in the
    # references). Evaluation views always decode fully
    draft: bool = False
    hflip: float = 0.5
    crop_pct: float = 0.875  # eval: Resize(img_size / crop_pct) + CenterCrop(img_size): 256 -> 224
    interpolation: Interp = "bicubic"  # train crop and eval resize (ORIG; MMSelfSup uses bilinear for the probe)
    num_workers: int | None = None  # DataLoader workers per process; None = min(8, available CPU cores)
    max_image_pixels: int | None = 178_956_970  # decompression-bomb guard
    max_skip_fraction: float = 0.5  # stop when more than this share of a split's (or an epoch's) images was skipped


@dataclass
class EncoderSource:
    """Where the encoder comes from."""

    # Any checkpoint milan.checkpoint reads: ours (milan pretrain), mmpretrain / MMSelfSup, original MILAN/MAE, timm.
    pretrained: str | None = None
    num_heads: int | None = None  # for files that do not record it (default: the standard ViT table)
    # Only without `pretrained`: a variant of milan.models.list_models() built with RANDOM weights (smoke tests and
    # the random-encoder baseline).
    model_name: str | None = None


@dataclass
class LinprobeOptimConfig(OptimConfig):
    """LARS for the linear probe (``betas``, ``eps``, ``fused`` and ``wd_exempt_tokens`` are AdamW-only: unused)."""

    blr: float = 0.1  # MAE default; the MILAN preset uses 0.05 (-> lr 3.2 at batch 16384)
    weight_decay: float = 0.0
    momentum: float = 0.9
    trust_coefficient: float = 0.001
    lars_variant: LarsVariant = "mocov3"  # "mocov3": ORIG/MAE; "mmselfsup": trust ratio on the bias too
    # One head per factor, all trained in one pass (lr = factor x scheduled lr); [1.0] is the plain probe.
    lr_grid: list[float] = field(default_factory=lambda: [1.0])


@dataclass
class LinprobeConfig(RunConfig):
    """A linear-probe run (defaults: the MILAN ViT-B/16 recipe on 8 processes)."""

    out_dir: str = "runs/linprobe"
    batch_size: int = 2048  # per process; x 8 processes = 16384
    encoder: EncoderSource = field(default_factory=EncoderSource)
    num_classes: int | None = None  # None = the number of class folders of data.train
    data: ClassifyDataConfig = field(default_factory=ClassifyDataConfig)
    optim: LinprobeOptimConfig = field(default_factory=LinprobeOptimConfig)
    schedule: ScheduleConfig = field(default_factory=lambda: ScheduleConfig(epochs=100, warmup_epochs=10.0))
    eval_every: int = 1  # evaluate on data.val every N epochs (and always after the last)


@dataclass
class AugmentConfig:
    """Fine-tuning augmentation (timm's implementations, as ORIG ``main_finetune.py``)."""

    auto_augment: str | None = "rand-m9-mstd0.5-inc1"  # timm RandAugment policy; None disables it
    color_jitter: float | None = None  # only used without auto_augment (timm ignores it otherwise)
    re_prob: float = 0.25  # random erasing probability
    re_mode: Literal["pixel", "rand", "const"] = "pixel"
    re_count: int = 1
    mixup: float = 0.8  # Mixup alpha (0 disables)
    cutmix: float = 1.0  # CutMix alpha (0 disables)
    mixup_prob: float = 1.0  # probability of applying mixup or cutmix to a batch
    switch_prob: float = 0.5  # probability of CutMix instead of Mixup when both are on
    mixup_mode: Literal["batch", "pair", "elem"] = "batch"
    label_smoothing: float = 0.1


@dataclass
class EmaConfig:
    """Exponential moving average of the weights (not in the MILAN recipe; off by default)."""

    enabled: bool = False
    decay: float = 0.9999
    warmup: bool = False  # timm's decay warm-up: decay_t = min(decay, (1 + t) / (10 + t))


@dataclass
class FinetuneConfig(RunConfig):
    """A fine-tuning run (defaults: the MILAN ViT-B/16 recipe, 8 processes x 128)."""

    out_dir: str = "runs/finetune"
    batch_size: int = 128  # per process; x 8 processes = 1024
    encoder: EncoderSource = field(default_factory=EncoderSource)
    num_classes: int | None = None  # None = the number of class folders of data.train
    drop_path_rate: float = 0.1  # ViT-L: 0.2
    layer_decay: float = 0.65  # ViT-L: 0.75
    global_pool: Literal["avg", "token"] = "avg"  # mean of the patch tokens -> new LayerNorm (the recipe)
    data: ClassifyDataConfig = field(default_factory=ClassifyDataConfig)
    aug: AugmentConfig = field(default_factory=AugmentConfig)
    ema: EmaConfig = field(default_factory=EmaConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(blr=1e-4, betas=(0.9, 0.999), weight_decay=0.05))
    schedule: ScheduleConfig = field(default_factory=lambda: ScheduleConfig(epochs=100, warmup_epochs=5.0, min_lr=1e-6))
    eval_every: int = 1


@dataclass
class KnnConfig:
    """A weighted k-NN evaluation on frozen features (DINO protocol)."""

    out_dir: str = "runs/knn"
    seed: int = 0
    batch_size: int = 256  # per process, feature extraction
    encoder: EncoderSource = field(default_factory=EncoderSource)
    data: ClassifyDataConfig = field(default_factory=ClassifyDataConfig)  # both splits use the eval transform
    k: list[int] = field(default_factory=lambda: [20])  # several values are evaluated from one top-k search
    temperature: float = 0.07
    feature: Literal["cls", "avg"] = "cls"  # CLS token after the final norm, or the mean of the normed patch tokens
    cache_dir: str | None = "~/.cache/milan/features"  # None disables the feature cache
    cache_dtype: Literal["float16", "float32"] = "float16"
    query_chunk: int = 256  # test features per similarity chunk
    train_chunk: int | None = None  # train features per chunk (None: all at once)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    log: LogConfig = field(default_factory=LogConfig)


def check_data_sources(data: ClassifyDataConfig) -> None:
    """``data.train`` and ``data.val`` are given (checked last: the presets leave them to the user)."""
    for key in ("train", "val"):
        value = getattr(data, key)
        if value is None or not str(value).strip():
            raise ConfigError(
                f"data.{key} is not set: pass data.{key}=PATH (an ImageFolder tree root/<class>/<image>, or a "
                ".tar/.tar.gz archive of one)"
            )


def check_data(data: ClassifyDataConfig) -> None:
    """Value checks of the data section; raises :class:`ConfigError` naming the key."""
    lo, hi = data.scale
    if not 0 < lo <= hi <= 1:
        raise ConfigError(f"data.scale must satisfy 0 < min <= max <= 1, got {list(data.scale)}")
    if not 0 < data.crop_pct <= 1:
        raise ConfigError(f"data.crop_pct must be in (0, 1], got {data.crop_pct}")
    if not 0 <= data.hflip <= 1:
        raise ConfigError(f"data.hflip is a probability, got {data.hflip}")
    if data.num_workers is not None and data.num_workers < 0:
        raise ConfigError(f"data.num_workers must be >= 0 or null (min(8, CPU cores)), got {data.num_workers}")
    if data.max_image_pixels is not None and data.max_image_pixels < 1:
        raise ConfigError(f"data.max_image_pixels must be >= 1 or null (no limit), got {data.max_image_pixels}")
    if not 0.0 <= data.max_skip_fraction <= 1.0:
        raise ConfigError(f"data.max_skip_fraction must be in [0, 1], got {data.max_skip_fraction}")
    for key in ("train_per_class", "val_per_class"):
        value = getattr(data, key)
        if value is not None and value < 1:
            raise ConfigError(f"data.{key} must be >= 1 or null, got {value}")


def check_encoder(src: EncoderSource) -> None:
    """Either a checkpoint or a variant name must be given."""
    if src.pretrained is None and src.model_name is None:
        raise ConfigError(
            "encoder.pretrained is not set: pass encoder.pretrained=PATH (a pretraining checkpoint), or "
            "encoder.model_name=NAME for a randomly initialised encoder (a baseline, not a pretrained model)"
        )


def _check_classifier_run(cfg: LinprobeConfig | FinetuneConfig) -> None:
    """The checks every classifier job shares: run, data and encoder sections, ``eval_every``."""
    check_run(cfg)
    check_data(cfg.data)
    check_encoder(cfg.encoder)
    if cfg.eval_every < 1:
        raise ConfigError(f"eval_every must be >= 1, got {cfg.eval_every}")
    check_ranges(cfg, {"num_classes": Range(1)})


def check_linprobe(cfg: LinprobeConfig) -> None:
    """Value checks of a linear-probe config."""
    _check_classifier_run(cfg)
    nonneg, fraction, positive = Range(0), Range(0, 1, hi_open=True), Range(0, lo_open=True)
    ranges = {"optim.blr": nonneg, "optim.weight_decay": nonneg, "optim.momentum": fraction}
    check_ranges(cfg, {**ranges, "optim.trust_coefficient": positive})
    if not cfg.optim.lr_grid or any(f <= 0 for f in cfg.optim.lr_grid):
        raise ConfigError(f"optim.lr_grid must be a non-empty list of positive factors, got {cfg.optim.lr_grid}")
    check_data_sources(cfg.data)


def check_finetune(cfg: FinetuneConfig) -> None:
    """Value checks of a fine-tuning config."""
    _check_classifier_run(cfg)
    if not 0 < cfg.layer_decay <= 1:
        raise ConfigError(f"layer_decay must be in (0, 1], got {cfg.layer_decay}")
    if not 0 <= cfg.drop_path_rate < 1:
        raise ConfigError(f"drop_path_rate must be in [0, 1), got {cfg.drop_path_rate}")
    a = cfg.aug
    for key in ("re_prob", "mixup_prob", "switch_prob"):
        if not 0 <= getattr(a, key) <= 1:
            raise ConfigError(f"aug.{key} is a probability, got {getattr(a, key)}")
    if a.mixup < 0 or a.cutmix < 0 or not 0 <= a.label_smoothing < 1:
        raise ConfigError("aug.mixup and aug.cutmix must be >= 0 and aug.label_smoothing in [0, 1)")
    if (a.mixup > 0 or a.cutmix > 0) and cfg.batch_size % 2:
        raise ConfigError(f"mixup/cutmix pair samples within a batch: batch_size must be even, got {cfg.batch_size}")
    if cfg.ema.enabled and not 0 < cfg.ema.decay < 1:
        raise ConfigError(f"ema.decay must be in (0, 1), got {cfg.ema.decay}")
    check_ranges(cfg, {"aug.re_count": Range(1), "aug.color_jitter": Range(0)})
    check_data_sources(cfg.data)


def check_knn(cfg: KnnConfig) -> None:
    """Value checks of a k-NN config."""
    check_ranges(cfg)  # the runtime and log sections' declared ranges
    check_data(cfg.data)
    check_encoder(cfg.encoder)
    if cfg.batch_size < 1 or cfg.query_chunk < 1 or (cfg.train_chunk is not None and cfg.train_chunk < 1):
        raise ConfigError("batch_size, query_chunk and train_chunk must be >= 1")
    if not cfg.k or any(k < 1 for k in cfg.k):
        raise ConfigError(f"k must be a non-empty list of positive ints, got {cfg.k}")
    if cfg.temperature <= 0:
        raise ConfigError(f"temperature must be > 0, got {cfg.temperature}")
    check_data_sources(cfg.data)
