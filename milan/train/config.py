"""Typed run configuration: dataclasses with defaults, YAML presets merged over them, dotted overrides last.

The merge is validated against the dataclass annotations: an unknown key or a value of the wrong type (including
``Literal`` choices, ``Optional``, tuples, lists and nested dataclasses) raises :class:`ConfigError` naming the full
dotted key, and so does a value outside the range its field declares (``mask_ratio: Fraction``, see
:mod:`milan.ranges`). A field's description is the comment beside (or right above) it: ``milan config JOB`` prints
them (:mod:`milan.jobs.config`), so keep one on every field. The resolved config is plain data (:func:`to_dict`),
written next to the run and stored in every checkpoint, and loads back to the same object.

Shared sections (:class:`OptimConfig`, :class:`ScheduleConfig`, :class:`RuntimeConfig`, :class:`CheckpointConfig`,
:class:`LogConfig`, gathered in :class:`RunConfig`) are reused by the evaluation jobs; :class:`PretrainConfig` adds
the model and the data.

Examples:
    >>> cfg = load_config(PretrainConfig, overrides=["model_name=milan_test_tiny", "optim.blr=3e-4"])
    >>> cfg.model.encoder.img_size, cfg.optim.blr
    (32, 0.0003)
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar, Union, cast

import yaml

from milan.data.sources import shell_sources
from milan.errors import ConfigError as ConfigError  # re-exported: the config error of every job
from milan.models.factory import ModelConfig, check_model, list_models, model_config
from milan.ranges import Fraction, NonNegative, NonNegativeFloat, Positive, PositiveFloat, Range, range_of
from milan.train.presets import resolve_preset

T = TypeVar("T")


# ``torch.compile``'s modes (``runtime.compile_mode``).
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


# ``runtime.teacher_dtype`` (see milan.jobs.pretrain.teacher_compute_dtype).
TeacherDtype = Literal["auto", "fp32", "bf16", "fp16"]


# ----------------------------------------------------------------------------------------------------------------
# Shared sections


@dataclass
class OptimConfig:
    """AdamW with MAE's learning-rate scaling rule."""

    blr: NonNegativeFloat = 1.5e-4  # base lr: lr = blr * effective batch / 256
    lr: NonNegativeFloat | None = None  # absolute peak lr; when set, blr is ignored
    betas: tuple[Fraction, Fraction] = (0.9, 0.95)  # AdamW's moving-average factors of the gradient and its square
    eps: PositiveFloat = 1e-8  # AdamW's denominator term
    weight_decay: NonNegativeFloat = 0.05  # decoupled (AdamW) weight decay
    # True: no decay on cls/mask tokens and pos embeds (mmpretrain); False: decay cls/mask tokens (original repo).
    # Biases and norm weights (all 1-D tensors) are never decayed.
    wd_exempt_tokens: bool = True
    clip_grad: PositiveFloat | None = None  # max global grad norm; None = no clipping (the reference)
    # Fused AdamW kernel (one kernel for all parameters; differs from the for-loop AdamW at float rounding level).
    # None = fused wherever torch supports it for the parameters' device (CUDA, and CPU with torch >= 2.4).
    fused: bool | None = None


@dataclass
class ScheduleConfig:
    """Per-iteration linear warm-up from 0, then half-cycle cosine to ``min_lr``."""

    epochs: Positive = 400  # length of the schedule (passes over the data)
    warmup_epochs: NonNegativeFloat = 40.0  # linear warm-up from lr 0, in epochs (may be fractional; <= epochs)
    min_lr: NonNegativeFloat = 0.0  # the lr the cosine ends at
    max_steps: Positive | None = None  # stop after this many optimizer steps (smoke runs); the schedule is unchanged


@dataclass
class RuntimeConfig:
    """Device, precision, compilation and parallelism."""

    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: cuda when available
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"  # auto: bf16 on CUDA, fp32 on CPU
    compile: bool = False  # torch.compile the trained model (pretraining: the student); eager fallback with a warning
    compile_mode: str | None = None  # torch.compile mode with compile=true; "reduce-overhead" = CUDA graphs
    compile_teacher: bool = False  # with compile=true, also compile the teacher's forward
    # The teacher's weights and compute dtype (cast once after its weights are loaded; autocast off inside it).
    # auto: the run's compute dtype on CUDA when it is bf16/fp16 (runtime.precision), fp32 (no cast) on CPU.
    teacher_dtype: TeacherDtype = "auto"
    grad_checkpointing: bool = False  # recompute encoder blocks in backward (saves memory)
    channels_last: bool = False  # channels-last input images
    strategy: Literal["ddp", "fsdp"] = "ddp"  # fsdp: FSDP2 fully_shard of the student's blocks (ViT-L/H)
    # Seconds a process waits in a collective (all-reduce, barrier) before giving up, e.g. when another process
    # froze; long enough for a checkpoint write on a slow disk and for torch.compile's first step (torch: 1800).
    dist_timeout_s: float = 600.0
    tf32: bool = True  # TF32 matmuls on Ampere+ (CUDA only)
    cpu_threads: Positive | None = None  # torch.set_num_threads on CPU; None = torch's default
    peak_tflops: PositiveFloat | None = None  # accelerator peak for MFU; None = look up by GPU name


@dataclass
class CheckpointConfig:
    """When to save and how many to keep. Every save refreshes ``last.pt``; the end of a run always saves."""

    every_epochs: NonNegative = 1  # save every N epochs: last.pt and a numbered copy epoch_NNNN.pt; 0 = only at the end
    every_steps: NonNegative = 0  # also refresh last.pt every N optimizer steps (mid-epoch resume points); 0 = off
    keep: NonNegative = 3  # numbered copies kept (oldest deleted first); 0 = only last.pt


@dataclass
class LogConfig:
    """Console, JSONL, TensorBoard."""

    every_steps: Positive = 20  # JSONL / TensorBoard record every N optimizer steps
    progress: bool = True  # tqdm progress bar on the main process
    tensorboard: bool = True  # TensorBoard scalars in the run folder's tb/ (tensorboard --logdir RUN_DIR)
    plot: bool = True  # save plot.png (loss, lr, throughput) into the run folder at the end


@dataclass
class RunConfig:
    """Everything a training job shares; jobs subclass it and add their model and data sections."""

    out_dir: str = "runs/milan"  # run folder: config.yaml, metrics.jsonl, tb/, checkpoints/
    seed: int = 0  # seeds the weights, the crops, flips and masks (each sample's from (seed, epoch, index))
    batch_size: Positive = 256  # per process
    accum_steps: Positive = 1  # micro-batches per optimizer step
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)


# ----------------------------------------------------------------------------------------------------------------
# Pretraining


@dataclass
class PretrainDataConfig:
    """Unlabelled images and the recipe's augmentation."""

    # folder (ImageFolder or any tree), .txt file list, tar shards, builtin:samples; null: must be given
    path: str | None = "builtin:samples"
    img_size: int | None = None  # None = model.encoder.img_size
    scale: tuple[float, float] = (0.2, 1.0)  # RandomResizedCrop area range
    ratio: tuple[float, float] = (0.75, 1.3333333333333333)  # RandomResizedCrop aspect range (torchvision default)
    interpolation: Literal["bicubic", "bilinear"] = "bicubic"
    hflip: float = 0.5  # horizontal flip probability
    # JPEG draft decoding (libjpeg decodes at 1/2, 1/4, 1/8 scale when the crop still covers the output size): faster
    # decoding of large photos, slightly different pixels; off = the references' full decode (milan.data.transforms)
    draft: bool = False
    num_workers: int | None = None  # DataLoader workers per process; None = min(8, available CPU cores)
    max_image_pixels: int | None = 89_478_485  # decompression-bomb guard: larger images are skipped (Pillow's limit)
    # stop the run when more than this share of an epoch's images was skipped (an epoch with none usable always stops)
    max_skip_fraction: float = 0.5
    num_samples: int | None = None  # tar shards only: images per epoch (folders and lists are counted)
    # cpu: workers decode and augment; device: workers only read the files; JPEGs are decoded in batches on the
    # training device (nvJPEG on CUDA) and augmented there (folders and file lists only, not tar shards)
    decode: Literal["cpu", "device"] = "cpu"
    # accept pipe:CMD sources and remote shard URLs, which webdataset opens by running shell commands
    allow_shell_pipes: bool = False


@dataclass
class PretrainConfig(RunConfig):
    """A MILAN pretraining run (defaults: the ViT-B/16 ImageNet-1K recipe)."""

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


def derive(cfg: RunConfig, world_size: int, batches_per_epoch: int) -> Derived:
    """Computes the effective batch, the absolute lr (``blr * effective batch / 256``) and the step counts.

    Args:
        cfg: The run config.
        world_size: Number of processes.
        batches_per_epoch: Micro-batches per epoch on each process.

    Returns:
        The derived values.

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
    total = cfg.schedule.epochs * steps_per_epoch
    stop = total if cfg.schedule.max_steps is None else min(total, cfg.schedule.max_steps)
    warmup = round(cfg.schedule.warmup_epochs * steps_per_epoch)
    return Derived(world_size, effective_batch, lr, steps_per_epoch, total, warmup, stop)


def check_run(cfg: RunConfig) -> None:
    """Value checks shared by every job; raises :class:`ConfigError` naming the key and the fix.

    The ranges declared on the fields (:mod:`milan.ranges`) are checked here too, for configs built in Python.
    """
    check_ranges(cfg)
    sch = cfg.schedule
    if sch.warmup_epochs > sch.epochs:
        raise ConfigError(
            f"schedule.warmup_epochs={_num(sch.warmup_epochs)} is longer than schedule.epochs={sch.epochs}: "
            f"lower schedule.warmup_epochs to at most {sch.epochs}, or raise schedule.epochs"
        )
    rt = cfg.runtime
    if not rt.dist_timeout_s > 0:
        raise ConfigError(f"runtime.dist_timeout_s must be > 0 seconds, got {rt.dist_timeout_s}")
    if rt.compile_mode is not None and rt.compile_mode not in COMPILE_MODES:
        raise ConfigError(
            f"runtime.compile_mode must be null or one of {', '.join(COMPILE_MODES)}, got {rt.compile_mode!r}"
        )
    if not rt.compile and (rt.compile_mode is not None or rt.compile_teacher):
        key = "runtime.compile_mode" if rt.compile_mode is not None else "runtime.compile_teacher"
        raise ConfigError(f"{key} is set but runtime.compile is false: set runtime.compile=true too")


def check_pretrain_data(d: PretrainDataConfig) -> None:
    """Value checks of the pretraining data section; raises :class:`ConfigError` naming the key."""
    if d.path is None or not d.path.strip():
        raise ConfigError(
            "data.path is not set: pass data.path=PATH (a folder of images, a .txt list of image paths, or tar shards)"
        )
    lo, hi = d.scale
    if not 0 < lo <= hi <= 1:
        raise ConfigError(f"data.scale must satisfy 0 < min <= max <= 1, got {list(d.scale)}")
    if not 0 < d.ratio[0] <= d.ratio[1]:
        raise ConfigError(f"data.ratio must satisfy 0 < min <= max, got {list(d.ratio)}")
    if not 0.0 <= d.hflip <= 1.0:
        raise ConfigError(f"data.hflip is a probability, got {d.hflip}")
    if d.num_workers is not None and d.num_workers < 0:
        raise ConfigError(f"data.num_workers must be >= 0 or null (min(8, CPU cores)), got {d.num_workers}")
    if d.max_image_pixels is not None and d.max_image_pixels < 1:
        raise ConfigError(f"data.max_image_pixels must be >= 1 or null (no limit), got {d.max_image_pixels}")
    if not 0.0 <= d.max_skip_fraction <= 1.0:
        raise ConfigError(f"data.max_skip_fraction must be in [0, 1], got {d.max_skip_fraction}")
    if d.num_samples is not None and d.num_samples < 1:
        raise ConfigError(f"data.num_samples must be >= 1 or null, got {d.num_samples}")
    if shell_sources([d.path]) and not d.allow_shell_pipes:
        raise ConfigError(
            f"data.path={d.path!r} would run a shell command (webdataset opens pipe: sources and remote URLs with "
            "one); set data.allow_shell_pipes=true to allow it"
        )


def check_pretrain(cfg: PretrainConfig) -> None:
    """Value checks of a pretraining config; raises :class:`ConfigError` naming the key and the fix."""
    check_run(cfg)
    check_model(cfg.model, prefix="model.")
    enc = cfg.model.encoder
    if cfg.data.img_size is not None and cfg.data.img_size != enc.img_size:
        raise ConfigError(
            f"data.img_size={cfg.data.img_size} differs from model.encoder.img_size={enc.img_size} "
            "(the position embedding is fixed); set both, or leave data.img_size null"
        )
    check_pretrain_data(cfg.data)


def check_ranges(cfg: Any, extra: Mapping[str, Range] | None = None, prefix: str = "") -> None:
    """Checks every field whose annotation declares a :class:`~milan.ranges.Range`, in nested sections too.

    Args:
        cfg: A config dataclass instance.
        extra: More ranges by dotted key (e.g. ``{"optim.momentum": Range(0, 1, hi_open=True)}``), for fields
            declared without one.
        prefix: Dotted prefix of ``cfg``'s keys in messages.

    Raises:
        ConfigError: A value outside its range (the message names the key, the range and a valid value).
    """
    defaults = _defaults(type(cfg))
    for f in dataclasses.fields(cfg):
        value, tp, key = getattr(cfg, f.name), field_types(type(cfg))[f.name], f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            check_ranges(value, prefix=f"{key}.")
        else:
            _check_value(value, tp, key, defaults.get(f.name))
    for key, rng in (extra or {}).items():
        node: Any = cfg
        for part in key.split("."):
            node = getattr(node, part)
        rng.check(node, f"{prefix}{key}")


def _check_value(value: Any, tp: Any, key: str, default: Any = None) -> None:
    """The range checks of one (converted) value against its annotation."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Annotated:
        rng = range_of(tuple(tp.__metadata__))
        if rng is not None:
            rng.check(value, key, default)
        _check_value(value, args[0], key, default)
    elif origin in (Union, types.UnionType):
        if value is not None:
            for arg in args:
                if arg is not type(None) and _matches(value, arg):
                    _check_value(value, arg, key, default)
                    return
    elif origin is tuple and isinstance(value, tuple) and not (len(args) == 2 and args[1] is Ellipsis):
        for i, (v, a) in enumerate(zip(value, args, strict=False)):
            d = default[i] if isinstance(default, tuple) and len(default) > i else None
            _check_value(v, a, f"{key}[{i}]", d)


def _matches(value: Any, tp: Any) -> bool:
    """Whether a converted value is of (the base type of) ``tp``: picks the branch of a union to check."""
    if typing.get_origin(tp) is Annotated:
        tp = typing.get_args(tp)[0]
    origin = typing.get_origin(tp) or tp
    if origin is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(origin, type) and isinstance(value, origin)


def _defaults(cls: type) -> dict[str, Any]:
    """The class defaults of a dataclass's plain fields (suggested in range errors)."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
    return out


def _num(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


# ----------------------------------------------------------------------------------------------------------------
# Generic loading, validation and saving


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
        path: A YAML file (a mapping of the dataclass's fields), or the name of a preset installed with the package
            (``demo_cpu``, ``pretrain/demo_cpu``, ``configs/pretrain/demo_cpu.yaml``; see
            :func:`milan.train.presets.resolve_preset`); ``None`` for defaults only.
        overrides: ``dotted.key=value`` strings; values are parsed as YAML (``null``, ``[0.2, 1.0]``, ``1e-4``).

    Returns:
        The validated config.

    Raises:
        ConfigError: Unreadable file, unknown key, wrong type or a value outside its declared range (the message
            names the dotted key).
    """
    raw: dict[str, Any] = read_yaml(resolve_preset(path, _job_of(cls))) if path is not None else {}
    raw = _deep_merge(raw, parse_overrides(overrides))
    factory = getattr(cls, "defaults_from", None)
    base = cast(T, factory(raw) if factory is not None else cls())
    return update(base, raw)


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


def update(cfg: T, data: Mapping[str, Any], prefix: str = "") -> T:
    """A copy of dataclass ``cfg`` with ``data`` merged in (nested mappings merge into nested dataclasses)."""
    if not dataclasses.is_dataclass(cfg) or isinstance(cfg, type):
        raise TypeError(f"update() needs a dataclass instance, got {type(cfg).__name__}")
    if not isinstance(data, Mapping):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'} must be a mapping, got {_describe(data)}")
    hints = field_types(type(cfg))
    names = [f.name for f in dataclasses.fields(cfg)]
    changes: dict[str, Any] = {}
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" (did you mean {prefix + close[0]!r}?)" if close else f"; known keys: {', '.join(names)}"
            raise ConfigError(f"unknown config key {dotted!r}{hint}")
        changes[key] = _convert(value, hints[key], dotted, getattr(cfg, key))
    return dataclasses.replace(cfg, **changes)


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
    """Writes the resolved config as YAML (readable back with :func:`load_config`)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f".{p.name}.tmp")
    tmp.write_text(to_yaml(cfg))
    os.replace(tmp, p)
    return p


def _deep_merge(a: dict[str, Any], b: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(a)
    for k, v in b.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, Mapping) and isinstance(out.get(k), Mapping) else v
    return out


def field_types(cls: type) -> dict[str, Any]:
    """A config dataclass's field annotations, resolved, with their declared ranges (``Annotated``) kept."""
    return typing.get_type_hints(cls, include_extras=True)


def _job_of(cls: type) -> str | None:
    """The preset folder of a config class: ``PretrainConfig`` -> ``pretrain`` (``None`` if not a ``*Config``)."""
    name = cls.__name__
    return name.removesuffix("Config").lower() if name.endswith("Config") and name != "Config" else None


def _describe(value: Any) -> str:
    if isinstance(value, _Override):
        value = value.parsed
    return f"{value!r} ({type(value).__name__})"


def _accepts_str(tp: Any) -> bool:
    if tp is str:
        return True
    return typing.get_origin(tp) in (Union, types.UnionType) and str in typing.get_args(tp)


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
    if origin in (tuple, list, dict):
        return f"{origin.__name__}[{', '.join(type_name(a) for a in typing.get_args(tp))}]"
    if tp is Ellipsis:
        return "..."
    return getattr(tp, "__name__", str(tp))


def _plain(value: Any) -> Any:
    """An untyped (``Any``) value with the command-line values nested in it parsed (``a.b.c=1`` under a dict)."""
    if isinstance(value, _Override):
        return value.parsed
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _convert(value: Any, tp: Any, key: str, current: Any = None) -> Any:
    """Validates/coerces one value against annotation ``tp``; raises :class:`ConfigError` naming ``key``."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    wrong = ConfigError(f"config key {key!r} expects {type_name(tp)}, got {_describe(value)}")
    if isinstance(value, _Override):
        try:
            return _convert(value.parsed, tp, key, current)
        except ConfigError:
            if _accepts_str(tp):  # e.g. out_dir=2024 or a path with a colon
                return value.text
            raise
    if tp is Any:
        return _plain(value)
    if origin is Annotated:  # a base type plus a declared range (milan.ranges)
        converted = _convert(value, args[0], key, current)
        _check_value(converted, tp, key, current)
        return converted
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        base = current if isinstance(current, tp) else tp()
        if not isinstance(value, Mapping):
            raise wrong
        return update(base, value, prefix=f"{key}.")
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in (a for a in args if a is not type(None)):
            base = typing.get_args(arg)[0] if typing.get_origin(arg) is Annotated else arg
            try:
                converted = _convert(value, base, key, current)
            except ConfigError:
                continue
            _check_value(converted, arg, key, current)  # a range error is reported as such, not as a wrong type
            return converted
        raise wrong
    if origin is Literal:
        for choice in args:
            if value == choice and type(value) is type(choice):
                return choice
        raise wrong
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise wrong
        if origin is tuple and not (len(args) == 2 and args[1] is Ellipsis):
            if len(value) != len(args):
                raise ConfigError(f"config key {key!r} expects {len(args)} values ({type_name(tp)}), got {value!r}")
            olds = current if isinstance(current, tuple) and len(current) == len(args) else (None,) * len(args)
            return tuple(
                _convert(v, a, f"{key}[{i}]", old) for i, (v, a, old) in enumerate(zip(value, args, olds, strict=True))
            )
        items = [_convert(v, args[0] if args else Any, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, Mapping):
            raise wrong
        return {str(k): _convert(v, args[1] if args else Any, f"{key}.{k}") for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise wrong
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise wrong
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-4" (no dot) as a string
            try:
                number = float(value)
            except ValueError:
                raise wrong from None
            if math.isfinite(number):
                return number
        raise wrong
    if tp is str:
        if isinstance(value, str):
            return str(value)
        raise wrong
    raise ConfigError(f"config key {key!r} has an unsupported annotation {tp!r}")  # a bug in a config class
