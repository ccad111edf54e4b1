"""Model configuration dataclasses, named variants and the one string lookup: :func:`create_model`."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from milan.errors import ConfigError
from milan.flops import PretrainFlops, TowerShape, pretrain_flops
from milan.masking import num_visible
from milan.models.decoder import MAEDecoder, PromptingDecoder
from milan.models.milan import MILAN, LossOn, Masking
from milan.models.teacher import Teacher, TeacherInputNorm
from milan.models.tower import build_tower, clip_vision_tower, describe_tower
from milan.models.vit import VIT_ARCHS, VisionTransformer
from milan.pos_embed import PosEmbedLayout
from milan.ranges import Fraction, Positive, PositiveFloat


@dataclass
class EncoderConfig:
    """Student ViT."""

    img_size: Positive = 224  # input resolution in pixels (square); the image size knob: data and teacher follow it
    patch_size: Positive = 16  # side of a patch in pixels; img_size / patch_size patches per side (the grid)
    in_chans: Positive = 3  # input channels (RGB)
    embed_dim: Positive = 768  # token width (ViT-B: 768)
    depth: Positive = 12  # transformer blocks
    num_heads: Positive = 12  # attention heads (divides embed_dim)
    mlp_ratio: PositiveFloat = 4.0  # MLP hidden width / embed_dim
    qkv_bias: bool = True  # biases in the attention's q, k, v projections
    pos_embed_layout: PosEmbedLayout = "mmpretrain"  # sin-cos channel layout: mmpretrain or mae (see milan.pos_embed)
    drop_path_rate: Fraction = 0.0  # stochastic depth rate; 0 for pretraining (MAE/MILAN)


@dataclass
class DecoderConfig:
    """Decoder on top of the encoder."""

    kind: Literal["prompting", "mae"] = "prompting"  # MILAN's prompting decoder, or MAE's (ablation)
    embed_dim: Positive = 512  # decoder token width
    depth: Positive = 8  # decoder blocks
    num_heads: Positive = 16  # attention heads (divides embed_dim)
    mlp_ratio: PositiveFloat = 4.0  # MLP hidden width / embed_dim


@dataclass
class TeacherConfig:
    """Frozen teacher. ``kind='clip'`` builds an OpenAI-CLIP-shaped tower (random unless ``checkpoint``).

    With ``checkpoint`` the architecture comes from the file (:func:`milan.checkpoint.model_from_config` reads it)
    and the fields from ``width`` to ``out_dim`` are not used; the teacher always runs on the student's patch grid.
    """

    kind: Literal["clip", "none"] = "clip"  # "none": pixel targets (MAE ablation)
    width: Positive = 768  # random teacher: token width (CLIP ViT-B/16 image tower: 768)
    depth: Positive = 12  # random teacher: blocks
    num_heads: Positive = 12  # random teacher: attention heads
    patch_size: Positive = 16  # random teacher: patch size
    # random teacher: input resolution; null follows the student (student grid x patch_size); if set, it must give
    # the student's grid
    img_size: Positive | None = None
    out_dim: Positive = 512  # random teacher: width of CLIP's proj (MILAN's prediction width)
    input_norm: TeacherInputNorm = "imagenet"  # the references feed the ImageNet-normalised view; "clip" renormalises
    checkpoint: str | None = None  # a local weights file/folder; format and architecture are inferred
    # Hints for `checkpoint` (see milan.checkpoint.load_teacher); the fields above describe a random teacher.
    format: str = "auto"  # openai-clip | open-clip | hf | timm | milan | mmpretrain | auto
    model_name: str | None = None  # timm model name, for timm / OpenCLIP `visual.trunk` checkpoints
    act: Literal["quick_gelu", "gelu", "gelu_tanh"] | None = None  # MLP activation, when the format's default is wrong


@dataclass
class ModelConfig:
    """The whole pretraining model."""

    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    mask_ratio: Fraction = 0.75  # share of the patches hidden from the encoder (MILAN: 75 %)
    masking: Masking = "attention"  # semantic-aware (MILAN) or "random"
    loss_on: LossOn = "all"  # the references average over all 1 + L tokens


def _side(grid_size: tuple[int, int]) -> int:
    """The side of the student's square patch grid (a teacher is matched to square grids only)."""
    if grid_size[0] != grid_size[1]:
        raise ValueError(f"cannot match a teacher to the non-square student grid {grid_size}")
    return grid_size[0]


def teacher_img_size(cfg: TeacherConfig, grid_size: tuple[int, int]) -> int:
    """A random teacher's input resolution: ``model.teacher.img_size``, or the student's grid x its patch size."""
    return cfg.img_size if cfg.img_size is not None else _side(grid_size) * cfg.patch_size


def build_teacher(cfg: TeacherConfig, grid_size: tuple[int, int]) -> Teacher | None:
    """Builds a random frozen teacher from its config (``None`` for pixel targets).

    Args:
        cfg: Teacher config; one naming a weights file is read by :func:`milan.checkpoint.teacher_from_config`.
        grid_size: The student's patch grid; the teacher's resolution follows it unless ``cfg.img_size`` is set.
    """
    if cfg.kind == "none":
        return None
    if cfg.checkpoint:
        raise ValueError(
            f"model.teacher.checkpoint={cfg.checkpoint!r} names a weights file: build the model with "
            "milan.checkpoint.model_from_config(cfg), or pass teacher=milan.checkpoint.load_teacher(path)"
        )
    shape = {k: getattr(cfg, k) for k in ("patch_size", "width", "depth", "num_heads", "out_dim")}  # the same names
    return Teacher(clip_vision_tower(img_size=teacher_img_size(cfg, grid_size), **shape), input_norm=cfg.input_norm)


def match_teacher_grid(teacher: Teacher, grid_size: tuple[int, int]) -> Teacher:
    """The teacher run on the student's patch grid (itself when its grid already matches).

    A teacher whose grid differs (e.g. CLIP ViT-B/16 at 224 px, 14 x 14, for a 64 px /8 student, 8 x 8) is rebuilt
    at ``grid * its patch size`` pixels with the same weights: the position table is resampled (bicubic, timm's
    ``resample_abs_pos_embed``) and the images it is given are resized to that resolution (bicubic, antialiased).
    A teacher with another patch size than the student's (a CLIP ViT-L/14 teacher at 196 px for a ViT-B/16 student
    at 224 px, 14 x 14) only approximates its native behaviour; one with the student's patch size is exact.
    """
    if teacher.grid_size == grid_size:
        return teacher
    spec = describe_tower(teacher.model)
    spec = dataclasses.replace(spec, img_size=_side(grid_size) * spec.patch_size, resize_input=True)
    weights = {k: v.detach().float() for k, v in teacher.model.state_dict().items()}
    device = next(teacher.parameters()).device
    matched = Teacher(build_tower(spec, weights), input_norm=teacher.input_norm).to(device)
    matched.source_format = teacher.source_format
    if teacher.compute_dtype is not None:
        matched.to_compute_dtype(teacher.compute_dtype)
    return matched


def model_flops(cfg: ModelConfig, teacher: Teacher | None = None) -> PretrainFlops:
    """Analytic FLOPs per image of a pretraining step (:mod:`milan.flops`).

    Args:
        cfg: The model config.
        teacher: The built teacher, counted with its own shape instead of ``cfg.teacher``'s (a teacher loaded from
            ``model.teacher.checkpoint`` is not the one the config's architecture fields describe).

    Examples:
        >>> round(model_flops(model_config("milan_vit_base_patch16")).total / 1e9, 1)
        86.8
    """
    enc, dec, tea = cfg.encoder, cfg.decoder, cfg.teacher
    grid = enc.img_size // enc.patch_size
    shape: TowerShape | None = None
    if teacher is not None:
        t = describe_tower(teacher.model)
        prefix = int(t.class_token) + t.reg_tokens
        shape = TowerShape(t.embed_dim, t.depth, t.patch_size, t.grid, t.out_dim, t.mlp_ratio, prefix)
    elif tea.kind != "none":
        t_grid = teacher_img_size(tea, (grid, grid)) // tea.patch_size
        shape = TowerShape(tea.width, tea.depth, tea.patch_size, t_grid, tea.out_dim)
    student = TowerShape(enc.embed_dim, enc.depth, enc.patch_size, grid, mlp_ratio=enc.mlp_ratio)
    decoder = TowerShape(dec.embed_dim, dec.depth, enc.patch_size, grid, mlp_ratio=dec.mlp_ratio)
    return pretrain_flops(student, decoder, shape, cfg.mask_ratio, prompting=dec.kind == "prompting")


def check_model(cfg: ModelConfig, prefix: str = "") -> None:
    """Checks that the model's sizes fit together; raises :class:`~milan.errors.ConfigError` naming the key and the fix.

    The ranges of single values are declared on the fields (:mod:`milan.ranges`) and checked when a config is read.

    Args:
        cfg: The model config.
        prefix: The model section's dotted prefix in messages (``model.`` in a pretraining config).
    """
    enc, dec, tea = cfg.encoder, cfg.decoder, cfg.teacher
    if enc.img_size % enc.patch_size:
        lower = enc.img_size // enc.patch_size * enc.patch_size
        raise ConfigError(
            f"{prefix}encoder.img_size={enc.img_size} is not a multiple of {prefix}encoder.patch_size="
            f"{enc.patch_size}: use e.g. {prefix}encoder.img_size={lower or enc.patch_size} or "
            f"{lower + enc.patch_size}"
        )
    pairs = [("encoder", enc.embed_dim, enc.num_heads), ("decoder", dec.embed_dim, dec.num_heads)]
    if tea.kind != "none" and not tea.checkpoint:
        pairs.append(("teacher", tea.width, tea.num_heads))
    for part, width, heads in pairs:
        if width % heads:
            width_key = "width" if part == "teacher" else "embed_dim"
            raise ConfigError(
                f"{prefix}{part}.{width_key}={width} is not divisible by {prefix}{part}.num_heads={heads}: "
                f"choose a number of heads that divides the width"
            )
    grid = enc.img_size // enc.patch_size
    keep = num_visible(grid * grid, cfg.mask_ratio)
    if keep < 1:
        raise ConfigError(
            f"{prefix}mask_ratio={cfg.mask_ratio} leaves no visible patch of the {grid * grid}: "
            f"lower {prefix}mask_ratio"
        )
    if tea.kind != "none" and not tea.checkpoint and tea.img_size is not None:
        t_grid = tea.img_size // tea.patch_size
        if tea.img_size % tea.patch_size or t_grid != grid:
            raise ConfigError(
                f"{prefix}teacher.img_size={tea.img_size} with {prefix}teacher.patch_size={tea.patch_size} does not "
                f"give the student's {grid} x {grid} patch grid ({prefix}encoder.img_size={enc.img_size} / "
                f"patch_size={enc.patch_size}): leave {prefix}teacher.img_size null to follow the student, or set "
                f"it to {grid * tea.patch_size}"
            )


def build_encoder(cfg: EncoderConfig) -> VisionTransformer:
    return VisionTransformer(**dataclasses.asdict(cfg))  # the config's fields are the constructor's arguments


def build_decoder(
    cfg: DecoderConfig, grid_size: tuple[int, int], in_dim: int, out_dim: int, pos_embed_layout: PosEmbedLayout
) -> PromptingDecoder | MAEDecoder:
    """Builds the decoder for an encoder of width ``in_dim`` on ``grid_size``, predicting ``out_dim`` per token."""
    if cfg.kind not in ("prompting", "mae"):
        raise ValueError(f"model.decoder.kind must be 'prompting' or 'mae', got {cfg.kind!r}")
    decoder_cls = PromptingDecoder if cfg.kind == "prompting" else MAEDecoder
    shape = {k: v for k, v in dataclasses.asdict(cfg).items() if k != "kind"}  # embed_dim, depth, num_heads, ...
    return decoder_cls(grid_size, in_dim, out_dim, pos_embed_layout=pos_embed_layout, **shape)


def build_milan(cfg: ModelConfig, teacher: Teacher | None = None) -> MILAN:
    """Builds MILAN from a config: the student randomly initialised MAE-style, the teacher frozen.

    Args:
        cfg: Model config.
        teacher: Use this teacher instead of building one from ``cfg.teacher``; one on another patch grid is run on
            the student's (:func:`match_teacher_grid`), as the command line does with ``model.teacher.checkpoint``.
    """
    encoder = build_encoder(cfg.encoder)
    if teacher is None:
        teacher = build_teacher(cfg.teacher, encoder.grid_size)
    else:
        teacher = match_teacher_grid(teacher, encoder.grid_size)
    out_dim = teacher.out_dim if teacher is not None else cfg.encoder.patch_size**2 * 3
    layout = cfg.encoder.pos_embed_layout
    decoder = build_decoder(cfg.decoder, encoder.grid_size, cfg.encoder.embed_dim, out_dim, layout)
    masking = cfg.masking if teacher is not None else "random"
    return MILAN(encoder, decoder, teacher, cfg.mask_ratio, masking, cfg.loss_on)


def _vit(size: str, patch_size: int = 16) -> EncoderConfig:
    dim, depth, heads = VIT_ARCHS[size]
    return EncoderConfig(patch_size=patch_size, embed_dim=dim, depth=depth, num_heads=heads)


# The named variants. The teacher is OpenAI CLIP ViT-B/16's image tower (TeacherConfig's defaults) unless stated.
VARIANTS: dict[str, Callable[[], ModelConfig]] = {
    "milan_vit_tiny_patch16": lambda: ModelConfig(encoder=_vit("tiny")),
    "milan_vit_small_patch16": lambda: ModelConfig(encoder=_vit("small")),
    # The paper's model: ViT-B/16 student, 512-d 8-block prompting decoder, CLIP ViT-B/16 teacher.
    "milan_vit_base_patch16": lambda: ModelConfig(encoder=_vit("base")),
    # The original code keeps the CLIP ViT-B/16 teacher and the same decoder for ViT-L.
    "milan_vit_large_patch16": lambda: ModelConfig(encoder=_vit("large")),
    # ViT-H/14 student with a CLIP ViT-L/14 teacher (both a 16 x 16 grid at 224 px).
    "milan_vit_huge_patch14": lambda: ModelConfig(
        encoder=_vit("huge", 14), teacher=TeacherConfig("clip", *VIT_ARCHS["large"], patch_size=14, out_dim=768)
    ),
    # The CPU demo model: 64 px, patch 8 (8 x 8 grid), a 4-block 128-wide student and a small teacher.
    "milan_demo_small": lambda: ModelConfig(
        encoder=EncoderConfig(img_size=64, patch_size=8, embed_dim=128, depth=4, num_heads=4),
        decoder=DecoderConfig(embed_dim=64, depth=2, num_heads=4),
        teacher=TeacherConfig(width=128, depth=4, num_heads=2, patch_size=8, out_dim=64),
    ),
    # For tests: 32 px, patch 8 (4 x 4 grid), a few hundred thousand parameters.
    "milan_test_tiny": lambda: ModelConfig(
        encoder=EncoderConfig(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4),
        decoder=DecoderConfig(embed_dim=32, depth=2, num_heads=4),
        teacher=TeacherConfig(width=128, depth=2, num_heads=2, patch_size=8, out_dim=32),
    ),
}


def list_models() -> list[str]:
    """Names accepted by :func:`create_model`."""
    return sorted(VARIANTS)


def model_config(name: str) -> ModelConfig:
    """The config of a named variant."""
    if name not in VARIANTS:
        raise KeyError(f"unknown model {name!r}; choose one of {', '.join(list_models())}")
    return VARIANTS[name]()


def create_model(name: str, *, teacher: Teacher | None = None, **overrides: Any) -> MILAN:
    """Builds a named MILAN variant.

    Args:
        name: One of :func:`list_models`.
        teacher: Use this teacher instead of the variant's (e.g. ``milan.checkpoint.load_teacher(path)``); one on
            another patch grid is run on the student's, as ``milan pretrain`` runs ``model.teacher.checkpoint``.
        **overrides: Top-level :class:`ModelConfig` fields (e.g. ``mask_ratio=0.5``, ``masking="random"``).

    Examples:
        >>> model = create_model("milan_test_tiny")
        >>> model.encoder.num_patches
        16
    """
    cfg = dataclasses.replace(model_config(name), **overrides)  # an unknown field: TypeError naming it
    return build_milan(cfg, teacher=teacher)
