"""Every job's typed configuration, and how it is read: defaults, then a YAML preset, then dotted overrides.

A job's schema (:class:`PretrainConfig`, :class:`LinprobeConfig`, :class:`FinetuneConfig`, :class:`KnnConfig`,
:class:`SegmentConfig`) is a dataclass made of shared sections; the schemas differ only where the jobs differ, so
every key a job accepts is used by it. Reading validates against the annotations: an unknown key (with the key
probably meant), a value of the wrong type (``Literal`` choices, ``Optional``, tuples, lists, nested sections) or
outside the range its field declares (``mask_ratio: Fraction``, see :mod:`milan.ranges`) raises :class:`ConfigError`
naming the dotted key. A field's description is the comment beside (or right above) it: ``milan config JOB`` prints
them (:mod:`milan.jobs.config`), so keep one on every field. The resolved config is plain data (:func:`to_dict`),
written next to the run and stored in every checkpoint, and loads back to the same object. The merge is our own:
pydantic, dacite and OmegaConf neither suggest the key meant nor report our declared ranges.

Presets are YAML files ``configs/<job>/<name>.yaml``, package data in ``milan/configs`` (in a clone, a link to the
repository's ``configs/``): ``--config demo_cpu``, ``pretrain/demo_cpu`` and ``configs/pretrain/demo_cpu.yaml`` name
the same file from any folder; a path to an existing file wins.

Examples:
    >>> cfg = load_config(PretrainConfig, overrides=["model_name=milan_test_tiny", "optim.blr=3e-4"])
    >>> cfg.model.encoder.img_size, cfg.optim.blr
    (32, 0.0003)
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import math
import os
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar, Union

import yaml

from milan.checkpoint.io import atomic_path
from milan.data.sources import shell_sources
from milan.data.transforms import CropGeometry
from milan.errors import ConfigError as ConfigError  # re-exported: the config error of every job
from milan.models.factory import ModelConfig, check_model, list_models, model_config
from milan.ranges import (
    Fraction,
    NonNegative,
    NonNegativeFloat,
    Positive,
    PositiveFloat,
    Probability,
    Range,
    range_of,
)
from milan.train.lars import LarsVariant

T = TypeVar("T")

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")  # torch.compile's
TeacherDtype = Literal["auto", "fp32", "bf16", "fp16"]  # runtime.teacher_dtype (milan.jobs.pretrain)
Interpolation = Literal["bicubic", "bilinear"]

# ----------------------------------------------------------------------------------------------------------------
# Sections


@dataclass
class OptimConfig:
    """The learning rate (MAE's scaling rule), weight decay and gradient clipping of every optimizer."""

    blr: NonNegativeFloat = 1.5e-4  # base lr: lr = blr * effective batch / 256
    lr: NonNegativeFloat | None = None  # absolute peak lr; when set, blr is ignored
    weight_decay: NonNegativeFloat = 0.05  # AdamW: decoupled weight decay; LARS: added to the gradient
    clip_grad: PositiveFloat | None = None  # max global grad norm; None = no clipping (the reference)


@dataclass
class AdamWConfig(OptimConfig):
    """AdamW with MAE's learning-rate scaling rule."""

    betas: tuple[Fraction, Fraction] = (0.9, 0.95)  # AdamW's moving-average factors of the gradient and its square
    eps: PositiveFloat = 1e-8  # AdamW's denominator term
    # True: no decay on cls/mask tokens and pos embeds (mmpretrain, and both references' fine-tuning); False: decay
    # them (the original repo's pretraining). Biases and norm weights (all 1-D tensors) are never decayed.
    wd_exempt_tokens: bool = True
    # Fused AdamW kernel (one kernel for all parameters; differs from the for-loop AdamW at float rounding level).
    # None = fused wherever torch supports it for the parameters' device (CUDA, and CPU with torch >= 2.4).
    fused: bool | None = None


@dataclass
class LarsConfig(OptimConfig):
    """LARS for the linear probe (MAE's learning-rate scaling rule)."""

    blr: NonNegativeFloat = 0.1  # MAE default; the MILAN preset uses 0.05 (-> lr 3.2 at batch 16384)
    weight_decay: NonNegativeFloat = 0.0
    momentum: Fraction = 0.9  # SGD momentum
    trust_coefficient: PositiveFloat = 0.001  # eta of the layer-wise trust ratio
    lars_variant: LarsVariant = "mocov3"  # "mocov3": ORIG/MAE; "mmselfsup": trust ratio on the bias too
    # One head per factor, all trained in one pass (lr = factor x scheduled lr); [1.0] is the plain probe.
    lr_grid: list[float] = field(default_factory=lambda: [1.0])


@dataclass
class ScheduleConfig:
    """Per-iteration linear warm-up from 0, then half-cycle cosine to ``min_lr``."""

    epochs: Positive = 400  # length of the schedule (passes over the data)
    warmup_epochs: NonNegativeFloat = 40.0  # linear warm-up from lr 0, in epochs (may be fractional; <= epochs)
    min_lr: NonNegativeFloat = 0.0  # the lr the cosine ends at
    max_steps: Positive | None = None  # stop after this many optimizer steps (smoke runs); the schedule is unchanged


@dataclass
class RuntimeConfig:
    """Device, precision and processes."""

    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: cuda when available
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"  # auto: bf16 on CUDA, fp32 on CPU
    # Seconds a process waits in a collective (all-reduce, barrier) before giving up, e.g. when another process
    # froze; long enough for a checkpoint write on a slow disk and for torch.compile's first step (torch: 1800).
    dist_timeout_s: PositiveFloat = 600.0
    tf32: bool = True  # TF32 matmuls on Ampere+ (CUDA only)
    cpu_threads: Positive | None = None  # torch.set_num_threads on CPU; None = torch's default


@dataclass
class TrainRuntimeConfig(RuntimeConfig):
    """Device, precision, processes and the compilation of the trained model."""

    compile: bool = False  # torch.compile the trained model (pretraining: the student); eager fallback with a warning
    compile_mode: str | None = None  # torch.compile mode with compile=true; "reduce-overhead" = CUDA graphs
    grad_checkpointing: bool = False  # recompute encoder blocks in backward (saves memory)


@dataclass
class PretrainRuntimeConfig(TrainRuntimeConfig):
    """Device, precision, compilation and parallelism."""

    compile_teacher: bool = False  # with compile=true, also compile the teacher's forward
    # The teacher's weights and compute dtype (cast once after its weights are loaded; autocast off inside it).
    # auto: the run's compute dtype on CUDA when it is bf16/fp16 (runtime.precision), fp32 (no cast) on CPU.
    teacher_dtype: TeacherDtype = "auto"
    channels_last: bool = False  # channels-last input images
    strategy: Literal["ddp", "fsdp"] = "ddp"  # fsdp: FSDP2 fully_shard of the student's blocks (ViT-L/H)
    peak_tflops: PositiveFloat | None = None  # accelerator peak for MFU; None = look up by GPU name


@dataclass
class CheckpointConfig:
    """When to save and how many to keep. Every save refreshes ``last.pt``; the end of a run always saves."""

    every_epochs: NonNegative = 1  # save every N epochs: last.pt and a numbered copy epoch_NNNN.pt; 0 = only at the end
    every_steps: NonNegative = 0  # also refresh last.pt every N optimizer steps (mid-epoch resume points); 0 = off
    keep: NonNegative = 3  # numbered copies kept (oldest deleted first); 0 = only last.pt


@dataclass
class LogConfig:
    """Console."""

    progress: bool = True  # tqdm progress bar on the main process


@dataclass
class TrainLogConfig(LogConfig):
    """Console, JSONL, TensorBoard."""

    every_steps: Positive = 20  # JSONL / TensorBoard record every N optimizer steps
    tensorboard: bool = True  # TensorBoard scalars in the run folder's tb/ (tensorboard --logdir RUN_DIR)


@dataclass
class PlotLogConfig(TrainLogConfig):
    """Console, JSONL, TensorBoard and a plot at the end."""

    plot: bool = True  # pretraining: plot.png (loss, lr, throughput); linear probe: lr_grid.png (top-1 per lr)


@dataclass
class DataConfig:
    """Images, and what to do with unreadable ones."""

    img_size: int | None = None  # None = the encoder's input size (its position table is fixed)
    interpolation: Interpolation = "bicubic"  # resampling of the crops and resizes
    num_workers: int | None = None  # DataLoader workers per process; None = min(8, available CPU cores)
    max_image_pixels: int | None = 89_478_485  # decompression-bomb guard: larger images are skipped (Pillow's limit)
    # stop when more than this share of an epoch's (or a split's) images was skipped (none usable always stops)
    max_skip_fraction: Probability = 0.5


@dataclass
class PretrainDataConfig(DataConfig):
    """Unlabelled images and the recipe's augmentation."""

    # folder (ImageFolder or any tree), .txt file list, tar shards, builtin:samples; null: must be given
    path: str | None = "builtin:samples"
    scale: tuple[float, float] = (0.2, 1.0)  # RandomResizedCrop area range
    ratio: tuple[float, float] = (0.75, 1.3333333333333333)  # RandomResizedCrop aspect range (torchvision default)
    hflip: Probability = 0.5  # horizontal flip probability
    # JPEG draft decoding (libjpeg decodes at 1/2, 1/4, 1/8 scale when the crop still covers the output size): faster
    # decoding of large photos, slightly different pixels; off = the references' full decode (milan.data.transforms)
    draft: bool = False
    num_samples: int | None = None  # tar shards only: images per epoch (folders and lists are counted)
    # cpu: workers decode and augment; device: workers only read the files; JPEGs are decoded in batches on the
    # training device (nvJPEG on CUDA) and augmented there (folders and file lists only, not tar shards)
    decode: Literal["cpu", "device"] = "cpu"
    # accept pipe:CMD sources and remote shard URLs, which webdataset opens by running shell commands
    allow_shell_pipes: bool = False


@dataclass
class ClassifyDataConfig(DataConfig):
    """Labelled train / validation images.

    ``train`` and ``val`` are ImageFolder trees (``root/<class>/<image>``) or ``.tar``/``.tar.gz`` archives laid out
    as ``[<split>/]<class>/<image>``; an archive is unpacked once (the first ``*_per_class`` images of every class,
    in natural name order) into the cache folder (``$MILAN_CACHE`` or ``~/.cache/milan``); a folder uses the same
    first ``*_per_class`` images in place.
    """

    train: str | None = None  # required: ImageFolder tree or archive (null in the presets: the data is yours)
    val: str | None = None  # required
    train_per_class: Positive | None = None  # the first N images per class, in natural name order (None: all)
    val_per_class: Positive | None = None
    # eval: Resize(img_size / crop_pct) + CenterCrop(img_size): 256 -> 224
    crop_pct: Annotated[float, Range(0, 1, lo_open=True)] = 0.875
    max_image_pixels: int | None = 178_956_970  # decompression-bomb guard: larger images are skipped (2 x Pillow's)


@dataclass
class FinetuneDataConfig(ClassifyDataConfig):
    """Labelled train / validation images; the training view is timm's (see ``aug``)."""

    scale: tuple[float, float] = (0.08, 1.0)  # train RandomResizedCrop area range (torchvision default)
    hflip: Probability = 0.5  # horizontal flip probability of the training view


@dataclass
class ProbeDataConfig(FinetuneDataConfig):
    """Labelled train / validation images; the training view is a random resized crop and a flip."""

    # train crop box: byol = ORIG util/crop.py (one draw, sides clamped to the image, no retries); torchvision =
    # RandomResizedCrop.get_params (10 tries, then a centre crop; mmpretrain)
    crop_geometry: CropGeometry = "byol"
    # JPEG draft decoding of the training view (faster on large photos, slightly different pixels; not in the
    # references). Evaluation views always decode fully
    draft: bool = False


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
class AugmentConfig:
    """Fine-tuning augmentation (timm's implementations, as ORIG ``main_finetune.py``)."""

    auto_augment: str | None = "rand-m9-mstd0.5-inc1"  # timm RandAugment policy; None disables it
    color_jitter: NonNegativeFloat | None = None  # only used without auto_augment (timm ignores it otherwise)
    re_prob: Probability = 0.25  # random erasing probability
    re_mode: Literal["pixel", "rand", "const"] = "pixel"
    re_count: Positive = 1
    mixup: NonNegativeFloat = 0.8  # Mixup alpha (0 disables)
    cutmix: NonNegativeFloat = 1.0  # CutMix alpha (0 disables)
    mixup_prob: Probability = 1.0  # probability of applying mixup or cutmix to a batch
    switch_prob: Probability = 0.5  # probability of CutMix instead of Mixup when both are on
    mixup_mode: Literal["batch", "pair", "elem"] = "batch"
    label_smoothing: Fraction = 0.1


@dataclass
class EmaConfig:
    """Exponential moving average of the weights (not in the MILAN recipe; off by default)."""

    enabled: bool = False
    decay: float = 0.9999
    warmup: bool = False  # timm's decay warm-up: decay_t = min(decay, (1 + t) / (10 + t))


@dataclass
class SegDataConfig:
    """Image / label-map pairs (``milan.data.segmentation``) and the training view (mmsegmentation's ADE20K one)."""

    # Folder the four paths below are relative to (absolute paths ignore it). ADE20K: the ADEChallengeData2016 folder.
    root: str | None = None
    train_images: str = "images/training"  # training images (searched recursively)
    train_labels: str = "annotations/training"  # label PNGs matched to the images by relative path and stem
    val_images: str = "images/validation"  # evaluation images
    val_labels: str = "annotations/validation"  # their label PNGs
    train_limit: Positive | None = None  # only the first N training pairs (natural order); None: all
    val_limit: Positive | None = None  # only the first N evaluation pairs
    num_classes: Positive = 150  # classes 0 .. num_classes - 1 (after reduce_zero_label)
    ignore_index: int = 255  # label of pixels without a class (loss and metrics skip them; crops are padded with it)
    reduce_zero_label: bool = True  # stored 0 -> ignore, v -> v - 1 (ADE20K)
    class_names: list[str] | None = None  # for results.json and pictures; None: "0", "1", ...
    # square training crop (a multiple of 2 x the patch size); its grid sizes the position table
    crop_size: Positive = 512
    scale: tuple[Positive, Positive] = (2048, 512)  # RandomResize base (long, short) edge bound
    ratio_range: tuple[PositiveFloat, PositiveFloat] = (0.5, 2.0)  # RandomResize: the bound is scaled by a ratio in it
    # a crop is redrawn (up to 10 times) while one class fills this share of its labelled pixels
    cat_max_ratio: Annotated[float, Range(0, 1, lo_open=True)] = 0.75
    hflip: Probability = 0.5  # horizontal flip probability
    photometric: bool = True  # mmsegmentation's PhotoMetricDistortion
    num_workers: NonNegative | None = None  # DataLoader workers per process; None = min(8, available CPU cores)
    max_image_pixels: Positive | None = 178_956_970  # decompression-bomb guard (both files of a pair; 2 x Pillow's)
    # stop when more than this share of an epoch's (or the evaluation's) pairs was skipped (none usable always stops)
    max_skip_fraction: Probability = 0.5


@dataclass
class SegModelConfig:
    """The neck and heads on the encoder."""

    channels: Positive | None = None  # UperNet width; None: the encoder width (768 for ViT-B, the reference)
    aux_channels: NonNegative = 256  # auxiliary FCN head width; 0: no auxiliary head
    aux_weight: NonNegativeFloat = 0.4  # weight of the auxiliary head's loss
    pool_scales: list[Positive] = field(default_factory=lambda: [1, 2, 3, 6])  # PPM output sizes on the coarsest level
    dropout: Fraction = 0.1  # Dropout2d before both classifiers
    # LayerScale gamma init added to every block (mmsegmentation's MAE init_values); null: none
    layer_scale: PositiveFloat | None = 1.0


@dataclass
class SegEvalConfig:
    """Evaluation during and after training (one image at a time, single scale)."""

    scale: tuple[Positive, Positive] = (2048, 512)  # resize keeping the aspect: long side <= max, short side <= min
    mode: Literal["slide", "whole"] = "slide"  # overlapping windows, or the whole (padded) image in one pass
    crop: Positive | None = None  # sliding window side; None: data.crop_size
    stride: Positive = 341  # step between windows
    every_steps: NonNegative = 16_000  # evaluate every N optimizer steps (and always at the end); 0: only at the end


@dataclass
class SegmentScheduleConfig(ScheduleConfig):
    """mmsegmentation's iteration schedule: linear warm-up from ``warmup_ratio x lr``, then poly decay to ``min_lr``.

    ``iters`` (optimizer steps), when set, is the length of the run instead of ``epochs``, and ``warmup_iters``
    replaces ``warmup_epochs`` (as ``optim.lr`` replaces ``optim.blr``).
    """

    epochs: Positive = 100  # length in epochs, used only when iters is null
    warmup_epochs: NonNegativeFloat = 0.0  # warm-up in epochs, used only when warmup_iters is null
    iters: Positive | None = 160_000  # length in optimizer steps (mmseg's max_iters); null: epochs
    warmup_iters: NonNegative | None = 1_500  # linear warm-up steps; null: warmup_epochs
    warmup_ratio: Probability = 1e-6  # the warm-up starts at warmup_ratio x lr (mmengine LinearLR start_factor)
    power: PositiveFloat = 1.0  # poly decay exponent


# ----------------------------------------------------------------------------------------------------------------
# Jobs


@dataclass
class JobConfig:
    """What every job has: a run folder, a seed, a batch size (and its ``runtime`` and ``log`` sections)."""

    out_dir: str = "runs/milan"  # run folder: config.yaml, log.txt and results (training: metrics, checkpoints)
    seed: int = 0  # seeds the weights, the crops, flips and masks (each sample's from (seed, epoch, index))
    batch_size: Positive = 256  # per process


@dataclass
class RunConfig(JobConfig):
    """What every training job has; the jobs add their model and data sections."""

    accum_steps: Positive = 1  # micro-batches per optimizer step
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: TrainLogConfig = field(default_factory=TrainLogConfig)


@dataclass
class PretrainConfig(RunConfig):
    """A MILAN pretraining run (defaults: the ViT-B/16 ImageNet-1K recipe)."""

    runtime: PretrainRuntimeConfig = field(default_factory=PretrainRuntimeConfig)
    log: PlotLogConfig = field(default_factory=PlotLogConfig)
    optim: AdamWConfig = field(default_factory=AdamWConfig)
    # A variant from milan.models.list_models(); fills `model` before the config's explicit `model` values.
    model_name: str | None = "milan_vit_base_patch16"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: PretrainDataConfig = field(default_factory=PretrainDataConfig)

    @classmethod
    def defaults_from(cls, raw: Mapping[str, Any]) -> PretrainConfig:
        """The defaults a raw config is merged onto: ``model`` comes from ``model_name``'s variant."""
        cfg = cls()
        name = raw.get("model_name", cfg.model_name)
        if isinstance(name, _Override):
            name = name.parsed
        if name is not None:
            if not isinstance(name, str) or name not in list_models():
                raise ConfigError(f"model_name: unknown variant {name!r}; choose one of {', '.join(list_models())}")
            cfg.model = model_config(name)
        return cfg


@dataclass
class ClassifierConfig(RunConfig):
    """What the linear probe and fine-tuning share: a pretrained encoder, labelled data, periodic evaluation."""

    encoder: EncoderSource = field(default_factory=EncoderSource)
    num_classes: Positive | None = None  # None = the number of class folders of data.train
    data: ClassifyDataConfig = field(default_factory=ClassifyDataConfig)
    eval_every: Positive = 1  # evaluate on data.val every N epochs (and always after the last)


@dataclass
class LinprobeConfig(ClassifierConfig):
    """A linear-probe run (defaults: the MILAN ViT-B/16 recipe on 8 processes)."""

    out_dir: str = "runs/linprobe"
    batch_size: Positive = 2048  # per process; x 8 processes = 16384
    log: PlotLogConfig = field(default_factory=PlotLogConfig)
    optim: LarsConfig = field(default_factory=LarsConfig)
    schedule: ScheduleConfig = field(default_factory=lambda: ScheduleConfig(epochs=100, warmup_epochs=10.0))
    data: ProbeDataConfig = field(default_factory=ProbeDataConfig)


@dataclass
class FinetuneConfig(ClassifierConfig):
    """A fine-tuning run (defaults: the MILAN ViT-B/16 recipe, 8 processes x 128)."""

    out_dir: str = "runs/finetune"
    batch_size: Positive = 128  # per process; x 8 processes = 1024
    runtime: TrainRuntimeConfig = field(default_factory=TrainRuntimeConfig)
    optim: AdamWConfig = field(default_factory=lambda: AdamWConfig(blr=1e-4, betas=(0.9, 0.999)))
    schedule: ScheduleConfig = field(default_factory=lambda: ScheduleConfig(epochs=100, warmup_epochs=5.0, min_lr=1e-6))
    drop_path_rate: Fraction = 0.1  # ViT-L: 0.2
    layer_decay: Annotated[float, Range(0, 1, lo_open=True)] = 0.65  # ViT-L: 0.75
    global_pool: Literal["avg", "token"] = "avg"  # mean of the patch tokens -> new LayerNorm (the recipe)
    data: FinetuneDataConfig = field(default_factory=FinetuneDataConfig)
    aug: AugmentConfig = field(default_factory=AugmentConfig)
    ema: EmaConfig = field(default_factory=EmaConfig)


@dataclass
class KnnConfig(JobConfig):
    """A weighted k-NN evaluation on frozen features (DINO protocol)."""

    out_dir: str = "runs/knn"
    batch_size: Positive = 256  # per process, feature extraction
    encoder: EncoderSource = field(default_factory=EncoderSource)
    data: ClassifyDataConfig = field(default_factory=ClassifyDataConfig)  # both splits in the evaluation view
    k: list[int] = field(default_factory=lambda: [20])  # several values are evaluated from one top-k search
    temperature: PositiveFloat = 0.07
    feature: Literal["cls", "avg"] = "cls"  # CLS token after the final norm, or the mean of the normed patch tokens
    cache_dir: str | None = "~/.cache/milan/features"  # None disables the feature cache
    cache_dtype: Literal["float16", "float32"] = "float16"
    query_chunk: Positive = 256  # test features per similarity chunk
    train_chunk: Positive | None = None  # train features per chunk (None: all at once)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    log: LogConfig = field(default_factory=LogConfig)


@dataclass
class SegmentConfig(RunConfig):
    """A segmentation run: UperNet on a pretrained encoder (defaults: the ViT-B/16 ADE20K recipe, 8 processes x 2)."""

    out_dir: str = "runs/segment"
    batch_size: Positive = 2  # per process; x 8 processes = 16
    encoder: EncoderSource = field(default_factory=EncoderSource)
    drop_path_rate: Fraction = 0.1  # stochastic depth of the encoder
    layer_decay: Annotated[float, Range(0, 1, lo_open=True)] = 0.65  # layer-wise lr decay (milan finetune's exponents)
    model: SegModelConfig = field(default_factory=SegModelConfig)
    data: SegDataConfig = field(default_factory=SegDataConfig)
    eval: SegEvalConfig = field(default_factory=SegEvalConfig)
    # AdamW; lr is absolute (mmseg's 1e-4 at batch 16), not scaled with the batch
    optim: AdamWConfig = field(default_factory=lambda: AdamWConfig(lr=1e-4, betas=(0.9, 0.999), weight_decay=0.05))
    schedule: SegmentScheduleConfig = field(default_factory=SegmentScheduleConfig)
    runtime: TrainRuntimeConfig = field(default_factory=TrainRuntimeConfig)


# ----------------------------------------------------------------------------------------------------------------
# Derived values


@dataclass(frozen=True)
class Derived:
    """Values computed from the config and the launch, in one place (and logged)."""

    world_size: int
    effective_batch: int  # batch_size * accum_steps * world_size
    lr: float  # peak lr
    steps_per_epoch: int  # optimizer steps
    total_steps: int  # optimizer steps of the whole schedule
    warmup_steps: int
    stop_step: int  # where this launch stops: total_steps, or schedule.max_steps if smaller
    epochs: int  # the epochs the schedule spans (a schedule in iterations: the last one partial)


def derive(cfg: RunConfig, world_size: int, batches_per_epoch: int) -> Derived:
    """The effective batch, the absolute lr (``blr * effective batch / 256``) and the step counts.

    ``batches_per_epoch``: micro-batches per epoch on each of the ``world_size`` processes. A schedule in iterations
    (:class:`SegmentScheduleConfig`) counts its steps from ``iters`` / ``warmup_iters`` where they are set.

    Raises:
        ConfigError: An epoch has fewer micro-batches than ``accum_steps``.
    """
    steps_per_epoch = batches_per_epoch // cfg.accum_steps
    if steps_per_epoch < 1:
        raise ConfigError(
            f"an epoch has {batches_per_epoch} batch(es) per process but accum_steps={cfg.accum_steps}: "
            "use more data, a smaller batch_size or fewer accum_steps"
        )
    effective_batch = cfg.batch_size * cfg.accum_steps * world_size
    lr = cfg.optim.lr if cfg.optim.lr is not None else cfg.optim.blr * effective_batch / 256
    s = cfg.schedule
    iters, warmup_iters = getattr(s, "iters", None), getattr(s, "warmup_iters", None)
    total = iters if iters is not None else s.epochs * steps_per_epoch
    warmup = warmup_iters if warmup_iters is not None else round(s.warmup_epochs * steps_per_epoch)
    stop = total if s.max_steps is None else min(total, s.max_steps)
    epochs = math.ceil(total / steps_per_epoch)
    return Derived(world_size, effective_batch, lr, steps_per_epoch, total, min(warmup, total), stop, epochs)


# ----------------------------------------------------------------------------------------------------------------
# Value checks: what one field's annotation cannot say. Each raises ConfigError naming the key and the fix.


def check_pretrain(cfg: PretrainConfig) -> None:
    _check_sections(cfg)
    check_model(cfg.model, prefix="model.")
    d, enc = cfg.data, cfg.model.encoder
    if d.img_size is not None and d.img_size != enc.img_size:
        raise ConfigError(
            f"data.img_size={d.img_size} differs from model.encoder.img_size={enc.img_size} "
            "(the position embedding is fixed); set both, or leave data.img_size null"
        )
    if d.path is None or not d.path.strip():
        raise ConfigError(
            "data.path is not set: pass data.path=PATH (a folder of images, a .txt list of image paths, or tar shards)"
        )
    if not 0 < d.ratio[0] <= d.ratio[1]:
        raise ConfigError(f"data.ratio must satisfy 0 < min <= max, got {list(d.ratio)}")
    if d.num_samples is not None and d.num_samples < 1:
        raise ConfigError(f"data.num_samples must be >= 1 or null, got {d.num_samples}")
    if shell_sources([d.path]) and not d.allow_shell_pipes:
        raise ConfigError(
            f"data.path={d.path!r} would run a shell command (webdataset opens pipe: sources and remote URLs with "
            "one); set data.allow_shell_pipes=true to allow it"
        )


def check_linprobe(cfg: LinprobeConfig) -> None:
    _check_sections(cfg)
    if not cfg.optim.lr_grid or any(f <= 0 for f in cfg.optim.lr_grid):
        raise ConfigError(f"optim.lr_grid must be a non-empty list of positive factors, got {cfg.optim.lr_grid}")
    _check_data_given(cfg)


def check_finetune(cfg: FinetuneConfig) -> None:
    _check_sections(cfg)
    if (cfg.aug.mixup > 0 or cfg.aug.cutmix > 0) and cfg.batch_size % 2:
        raise ConfigError(f"mixup/cutmix pair samples within a batch: batch_size must be even, got {cfg.batch_size}")
    if cfg.ema.enabled and not 0 < cfg.ema.decay < 1:
        raise ConfigError(f"ema.decay must be in (0, 1), got {cfg.ema.decay}")
    _check_data_given(cfg)


def check_knn(cfg: KnnConfig) -> None:
    _check_sections(cfg)
    if not cfg.k or any(k < 1 for k in cfg.k):
        raise ConfigError(f"k must be a non-empty list of positive ints, got {cfg.k}")
    _check_data_given(cfg)


def check_segment(cfg: SegmentConfig) -> None:
    _check_sections(cfg)
    d, m, s = cfg.data, cfg.model, cfg.schedule
    if 0 <= d.ignore_index < d.num_classes:
        raise ConfigError(f"data.ignore_index={d.ignore_index} is one of the classes 0..{d.num_classes - 1}")
    if d.class_names is not None and len(d.class_names) != d.num_classes:
        raise ConfigError(f"data.class_names has {len(d.class_names)} names for data.num_classes={d.num_classes}")
    if not d.ratio_range[0] <= d.ratio_range[1]:
        raise ConfigError(f"data.ratio_range must satisfy min <= max, got {list(d.ratio_range)}")
    if not m.pool_scales:
        raise ConfigError("model.pool_scales must hold at least one size")
    if s.iters is not None and s.warmup_iters is not None and s.warmup_iters > s.iters:
        raise ConfigError(f"schedule.warmup_iters={s.warmup_iters} is longer than schedule.iters={s.iters}")
    _check_data_given(cfg)


def _check_sections(cfg: PretrainConfig | ClassifierConfig | KnnConfig | SegmentConfig) -> None:
    """The checks of the shared sections a job's config has (schedule, runtime, data, encoder)."""
    from_dict(type(cfg), to_dict(cfg))  # types and declared ranges, as if read from a file (configs built in Python)
    if isinstance(cfg, RunConfig) and cfg.schedule.warmup_epochs > cfg.schedule.epochs:
        sch, w = cfg.schedule, cfg.schedule.warmup_epochs
        warmup = int(w) if float(w).is_integer() else w
        raise ConfigError(
            f"schedule.warmup_epochs={warmup} is longer than schedule.epochs={sch.epochs}: "
            f"lower schedule.warmup_epochs to at most {sch.epochs}, or raise schedule.epochs"
        )
    rt = cfg.runtime
    if isinstance(rt, TrainRuntimeConfig):
        if rt.compile_mode is not None and rt.compile_mode not in COMPILE_MODES:
            raise ConfigError(
                f"runtime.compile_mode must be null or one of {', '.join(COMPILE_MODES)}, got {rt.compile_mode!r}"
            )
        teacher = isinstance(rt, PretrainRuntimeConfig) and rt.compile_teacher
        if not rt.compile and (rt.compile_mode is not None or teacher):
            key = "runtime.compile_mode" if rt.compile_mode is not None else "runtime.compile_teacher"
            raise ConfigError(f"{key} is set but runtime.compile is false: set runtime.compile=true too")
    encoder = getattr(cfg, "encoder", None)
    if encoder is not None and encoder.pretrained is None and encoder.model_name is None:
        raise ConfigError(
            "encoder.pretrained is not set: pass encoder.pretrained=PATH (a pretraining checkpoint), or "
            "encoder.model_name=NAME for a randomly initialised encoder (a baseline, not a pretrained model)"
        )
    d = cfg.data
    if not isinstance(d, DataConfig):
        return
    if d.num_workers is not None and d.num_workers < 0:
        raise ConfigError(f"data.num_workers must be >= 0 or null (min(8, CPU cores)), got {d.num_workers}")
    if d.max_image_pixels is not None and d.max_image_pixels < 1:
        raise ConfigError(f"data.max_image_pixels must be >= 1 or null (no limit), got {d.max_image_pixels}")
    if isinstance(d, (PretrainDataConfig, FinetuneDataConfig)) and not 0 < d.scale[0] <= d.scale[1] <= 1:
        raise ConfigError(f"data.scale must satisfy 0 < min <= max <= 1, got {list(d.scale)}")


def _check_data_given(cfg: ClassifierConfig | KnnConfig | SegmentConfig) -> None:
    """The data paths are given (checked last: the presets leave them to the user)."""
    d = cfg.data
    if isinstance(d, SegDataConfig):
        folders = [getattr(d, f"{split}_{kind}") for split in ("train", "val") for kind in ("images", "labels")]
        if d.root is None and not all(Path(f).expanduser().is_absolute() for f in folders):
            raise ConfigError(
                f"data.root is not set: pass data.root=DIR, the folder that holds {', '.join(folders)} (or give "
                "absolute paths)"
            )
        return
    for key in ("train", "val"):
        value = getattr(d, key)
        if value is None or not str(value).strip():
            raise ConfigError(
                f"data.{key} is not set: pass data.{key}=PATH (an ImageFolder tree root/<class>/<image>, or a "
                ".tar/.tar.gz archive of one)"
            )


# ----------------------------------------------------------------------------------------------------------------
# Reading, merging, writing


@dataclass(frozen=True)
class _Override:
    """A command-line value: parsed as YAML, or used verbatim where a string is expected."""

    text: str
    parsed: Any


def load_config(cls: type[T], path: str | os.PathLike[str] | None = None, overrides: Sequence[str] = ()) -> T:
    """Defaults, then a YAML preset, then ``key.sub=value`` overrides, validated against ``cls``.

    If ``cls`` has a ``defaults_from(raw)`` classmethod, it provides the defaults (e.g. from ``model_name``).

    Args:
        cls: The config dataclass.
        path: A YAML file (a mapping of the dataclass's fields), or the name of a preset (see
            :func:`resolve_preset`); ``None`` for defaults only.
        overrides: ``dotted.key=value`` strings; values are parsed as YAML (``null``, ``[0.2, 1.0]``, ``1e-4``).

    Raises:
        ConfigError: Unreadable file, unknown key, wrong type or a value outside its declared range (the message
            names the dotted key).
    """
    job = cls.__name__.removesuffix("Config").lower()  # PretrainConfig -> the presets in configs/pretrain
    raw = read_yaml(resolve_preset(path, job)) if path is not None else {}
    return from_dict(cls, raw, overrides)


def from_dict(cls: type[T], raw: Mapping[str, Any], overrides: Sequence[str] = ()) -> T:
    """``cls`` from plain data (e.g. the config a checkpoint stores), with ``overrides`` on top, validated."""
    raw = _merge(dict(raw), parse_overrides(overrides))
    factory = getattr(cls, "defaults_from", None)
    base: T = factory(raw) if factory is not None else cls()
    cfg: T = _convert(raw, cls, "", base)
    return cfg


def read_yaml(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Reads a YAML mapping; an empty file is ``{}``."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"cannot parse {p}: {e}") from e
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{p} must hold a mapping of config keys, got {type(data).__name__}")
    return data


def parse_overrides(items: Sequence[str]) -> dict[str, Any]:
    """``["a.b=1", "c=x"]`` -> ``{"a": {"b": 1}, "c": "x"}`` (values parsed as YAML; ``null`` is None)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key or any(not part for part in key.split(".")):
            raise ConfigError(f"override {item!r} must look like dotted.key=value")
        try:
            parsed: Any = yaml.safe_load(text)
        except yaml.YAMLError:
            parsed = text
        node = out
        *parents, leaf = key.split(".")
        for part in parents:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {item!r} conflicts with an earlier override of {part!r}")
            node = child
        node[leaf] = _Override(text, parsed)
    return out


def to_dict(cfg: Any) -> Any:
    """Plain data (dicts, lists, scalars) of a config; tuples become lists."""
    if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, (list, tuple)):
        return [to_dict(v) for v in cfg]
    if isinstance(cfg, dict):
        return {k: to_dict(v) for k, v in cfg.items()}
    return cfg


def to_yaml(cfg: Any) -> str:
    """The config as YAML text (field order kept)."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False, default_flow_style=False)


def save_config(cfg: Any, path: str | os.PathLike[str]) -> Path:
    """Writes the resolved config as YAML (readable back with :func:`load_config`), atomically."""
    with atomic_path(Path(path)) as tmp:
        tmp.write_text(to_yaml(cfg))
    return Path(path)


def field_types(cls: type) -> dict[str, Any]:
    """A config dataclass's field annotations in field order, resolved, with their declared ranges (``Annotated``)."""
    hints = typing.get_type_hints(cls, include_extras=True)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def type_name(tp: Any) -> str:
    """An annotation in words: ``float in [0, 1)``, ``int >= 1 | null``, ``one of 'cpu', 'device'``."""
    origin = typing.get_origin(tp)
    if origin is Annotated:
        rng = range_of(tuple(tp.__metadata__))
        return type_name(typing.get_args(tp)[0]) + (f" {rng}" if rng is not None else "")
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join("null" if a is type(None) else type_name(a) for a in typing.get_args(tp))
    if origin in (tuple, list):
        return f"{origin.__name__}[{', '.join(type_name(a) for a in typing.get_args(tp))}]"
    return getattr(tp, "__name__", str(tp))


def _merge(a: dict[str, Any], b: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(v, Mapping) and isinstance(out.get(k), Mapping) else v
    return out


def _describe(value: Any) -> str:
    if isinstance(value, _Override):
        value = value.parsed
    return f"{value!r} ({type(value).__name__})"


def _convert(value: Any, tp: Any, key: str, current: Any = None) -> Any:
    """``value`` checked against annotation ``tp`` and converted (lists to tuples, ints to floats).

    ``current`` is the value it replaces: a section merges into it, and a range error suggests it.
    """
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if isinstance(value, _Override):
        try:
            return _convert(value.parsed, tp, key, current)
        except ConfigError:
            if tp is str or (origin in (Union, types.UnionType) and str in args):  # out_dir=2024, a path with ':'
                return value.text
            raise
    wrong = ConfigError(f"config key {key!r} expects {type_name(tp)}, got {_describe(value)}")
    if origin is Annotated:  # a base type and its declared range
        converted = _convert(value, args[0], key, current)
        rng = range_of(tuple(tp.__metadata__))
        if rng is not None:
            rng.check(converted, key, current)
        return converted
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):  # a section: merged into the one it replaces
        if not isinstance(value, Mapping):
            raise wrong
        hints, prefix = field_types(tp), f"{key}." if key else ""
        for name in value:
            if name not in hints:
                close = difflib.get_close_matches(str(name), list(hints), n=1)
                hint = f" (did you mean {prefix + close[0]!r}?)" if close else f"; known keys: {', '.join(hints)}"
                raise ConfigError(f"unknown config key {prefix + str(name)!r}{hint}")
        section = current if isinstance(current, tp) else tp()
        changes = {k: _convert(v, hints[k], prefix + k, getattr(section, k)) for k, v in value.items()}
        return dataclasses.replace(section, **changes)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in (a for a in args if a is not type(None)):
            try:  # the first branch whose base type fits; its range error (if any) is the message
                _convert(value, typing.get_args(arg)[0] if typing.get_origin(arg) is Annotated else arg, key)
            except ConfigError:
                continue
            return _convert(value, arg, key, current)
        raise wrong
    if origin is Literal:
        if any(value == choice and type(value) is type(choice) for choice in args):
            return value
        raise wrong
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise wrong
        if origin is list:
            return [_convert(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
        if len(value) != len(args):
            raise ConfigError(f"config key {key!r} expects {len(args)} values ({type_name(tp)}), got {value!r}")
        return tuple(_convert(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args, strict=True)))
    if tp is float and isinstance(value, str):  # YAML 1.1 reads "1e-4" (no dot) as a string
        with contextlib.suppress(ValueError):
            value = float(value) if math.isfinite(float(value)) else value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, tp) or (tp is not bool and isinstance(value, bool)):
        raise wrong
    return value


# ----------------------------------------------------------------------------------------------------------------
# Presets

_PACKAGE = Path(__file__).resolve().parents[1]  # the milan package folder


def presets_dir() -> Path | None:
    """The folder holding ``<job>/<name>.yaml`` presets (``None`` if this install has none)."""
    for candidate, marker in ((_PACKAGE / "configs", None), (_PACKAGE.parent / "configs", "pyproject.toml")):
        if marker is not None and not (candidate.parent / marker).is_file():
            continue  # outside a clone, a sibling "configs" folder is someone else's
        if candidate.is_dir() and any(candidate.glob("*/*.yaml")):
            return candidate
    return None


def list_presets(job: str | None = None) -> list[str]:
    """Preset names as ``job/name`` (only ``job``'s when given), sorted."""
    root = presets_dir()
    if root is None:
        return []
    return sorted(p.relative_to(root).with_suffix("").as_posix() for p in root.glob(f"{job or '*'}/*.yaml"))


def resolve_preset(path: str | os.PathLike[str], job: str | None = None) -> Path:
    """The YAML file that ``--config PATH`` names.

    Args:
        path: An existing file, or a preset: ``name``, ``job/name``, with or without ``.yaml``, optionally
            starting with ``configs/`` (the repository's paths work outside a clone).
        job: The job whose presets a bare ``name`` is looked up among first (e.g. ``pretrain``).

    Raises:
        ConfigError: Neither a file nor a preset (the message lists the job's presets), or a name that several
            jobs' presets share (the message says how to pick one).
    """
    p = Path(path).expanduser()
    if p.is_file():
        return p
    if p.is_dir():
        raise ConfigError(f"config {str(path)!r} is a folder; pass a YAML file or a preset name")
    found = _find_preset(p, job)
    if found is not None:
        return found
    known = list_presets(job) or list_presets()
    names = ", ".join(n.split("/", 1)[1] if job and n.startswith(f"{job}/") else n for n in known)
    hint = f"; presets: {names}" if names else ""
    raise ConfigError(f"config file not found: {path} (not a file, nor a preset{hint})")


def _find_preset(p: Path, job: str | None) -> Path | None:
    root = presets_dir()
    if root is None or p.is_absolute():
        return None
    parts = list(p.parts)
    if "configs" in parts:  # configs/pretrain/demo_cpu.yaml from outside the clone
        parts = parts[len(parts) - parts[::-1].index("configs") :]
    if not parts or any(part in ("..", ".") for part in parts):
        return None
    name = "/".join(parts).removesuffix(".yaml").removesuffix(".yml")
    if "/" in name:
        candidate = root / f"{name}.yaml"
        return candidate if candidate.is_file() else None
    if job is not None and (root / job / f"{name}.yaml").is_file():
        return root / job / f"{name}.yaml"
    matches = sorted(root.glob(f"*/{name}.yaml"))
    if len(matches) > 1:
        jobs = ", ".join(m.parent.name for m in matches)
        raise ConfigError(f"preset {name!r} exists for {jobs}: name one, e.g. --config {matches[0].parent.name}/{name}")
    return matches[0] if matches else None
