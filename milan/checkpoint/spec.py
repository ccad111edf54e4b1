"""The model spec: what every checkpoint we write says about its model, and the architectures weights imply.

One versioned plain-data record, stored as the ``"spec"`` entry of every checkpoint a job writes (pretraining
``last.pt`` / ``epoch_N.pt``, linear-probe and fine-tuning checkpoints, ``classifier.pt``) and in the metadata of our
exports and conversions. It holds what the weights' shapes cannot say (:class:`ModelSpec`'s fields: the encoder
with its heads, a pretraining model's decoder and teacher, the evaluation view, a classifier's head).

Files without a spec (official and foreign checkpoints) are described from their shapes (:func:`infer_encoder`,
:func:`infer_decoder`, :func:`infer_tower`). Shapes give widths, depths, patch size, grid, MLP ratio, token layout and
head widths, not the number of heads, the activation or the LayerNorm epsilon: those come from the caller, stored
metadata, or these conventions (:func:`milan.checkpoint.resolve_spec` names each one it used):

* student encoders: the standard ViT table (:data:`milan.models.VIT_ARCHS`) by (width, depth), else ``width // 64``;
* decoders: ``width // 32`` (MILAN's and MAE's 512-wide decoders have 16 heads);
* teacher towers: ``width // 64`` (OpenAI and OpenCLIP's 64-wide heads), except the OpenCLIP ViT-H/g/bigG widths
  1280/1408/1664, which have 16 heads.

Examples:
    >>> spec = ModelSpec("encoder", EncoderArch(64, 8, 128, 4, num_heads=4), Preprocessing(64))
    >>> ModelSpec.from_dict(spec.to_dict()) == spec
    True
    >>> spec.preprocessing.resize  # eval view: Resize(73) + CenterCrop(64)
    73
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar, cast, get_args, get_origin, get_type_hints

import torch
from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from milan.errors import CheckpointError
from milan.models.decoder import MAEDecoder, PromptingDecoder
from milan.models.factory import DecoderConfig, EncoderConfig, build_decoder, build_encoder
from milan.models.milan import MILAN
from milan.models.tower import Act, StateDict, TowerSpec, ViTShape, describe_tower, square_grid, vit_kwargs
from milan.models.vit import VIT_ARCHS, VisionTransformer
from milan.pos_embed import PosEmbedLayout, sincos_2d

SPEC_VERSION = 1
SpecKind = Literal["milan", "encoder", "linear_probe", "finetune"]
HeadKind = Literal["linear_probe", "finetune", "linear"]  # "linear": a plain Linear (a probe exported with BN folded)
PosLayout = Literal["mmpretrain", "mae", "learned"]
Pool = Literal["token", "avg"]
Resample = Literal["bicubic", "bilinear"]
RGB = tuple[float, float, float]
T = TypeVar("T")

_TOWER_HEADS = {1280: 16, 1408: 16, 1664: 16}  # OpenCLIP ViT-H/14 (head width 80), g/14 (88), bigG/14 (104)


@dataclass
class EncoderArch(ViTShape):
    """Our :class:`~milan.models.VisionTransformer` (timm key names)."""

    pos_embed_layout: PosLayout = "mmpretrain"

    def build(self, drop_path_rate: float = 0.0) -> VisionTransformer:
        """A randomly initialised encoder of this shape (load the weights next); ``drop_path_rate`` for fine-tuning."""
        return build_encoder(self.to_config(drop_path_rate))

    def to_config(self, drop_path_rate: float = 0.0) -> EncoderConfig:
        """This shape as the factory's config.

        A learned position table is described as ``mmpretrain``: loading the weights restores it.
        """
        layout: PosEmbedLayout = "mae" if self.pos_embed_layout == "mae" else "mmpretrain"
        return EncoderConfig(**vit_kwargs(self), pos_embed_layout=layout, drop_path_rate=drop_path_rate)


@dataclass
class DecoderArch:
    """A :class:`~milan.models.PromptingDecoder` or :class:`~milan.models.MAEDecoder`."""

    kind: Literal["prompting", "mae"]
    grid: int
    in_dim: int
    out_dim: int
    embed_dim: int
    depth: int
    num_heads: int
    mlp_ratio: float = 4.0

    def build(self) -> PromptingDecoder | MAEDecoder:
        """A randomly initialised decoder of this shape (the stored position table replaces the fresh one)."""
        cfg = DecoderConfig(self.kind, self.embed_dim, self.depth, self.num_heads, self.mlp_ratio)
        return build_decoder(cfg, (self.grid, self.grid), self.in_dim, self.out_dim, "mmpretrain")


@dataclass
class Preprocessing:
    """The evaluation view: Resize(shorter side to :attr:`resize`) + CenterCrop(``img_size``) + Normalize."""

    img_size: int
    mean: RGB = IMAGENET_DEFAULT_MEAN
    std: RGB = IMAGENET_DEFAULT_STD
    interpolation: Resample = "bicubic"
    crop_pct: float = 0.875

    @property
    def resize(self) -> int:
        """The resize target of the shorter side (``int(img_size / crop_pct)``: 224 -> 256)."""
        return int(self.img_size / self.crop_pct)

    def timm_cfg(self) -> dict[str, Any]:
        """The same view as timm ``pretrained_cfg`` fields (what ``timm.data.resolve_model_data_config`` reads)."""
        view = {k: tuple(v) if isinstance(v, list) else v for k, v in dataclasses.asdict(self).items()}
        size = view.pop("img_size")
        return {"input_size": (3, size, size), **view, "crop_mode": "center"}

    def describe(self) -> str:
        """``"64 px: bicubic resize to 73, center crop (crop_pct 0.875), mean (...), std (...)"``."""
        mean = ", ".join(f"{v:g}" for v in self.mean)
        std = ", ".join(f"{v:g}" for v in self.std)
        return (
            f"{self.img_size} px: {self.interpolation} resize to {self.resize}, center crop (crop_pct "
            f"{self.crop_pct:g}), mean ({mean}), std ({std})"
        )


@dataclass
class TeacherSpec:
    """The frozen teacher a MILAN model was trained with.

    Attributes:
        tower: Its exact architecture (activation, LayerNorm eps, image size, input resize ...).
        input_norm: ``"imagenet"``: fed the student's ImageNet-normalised view; ``"clip"``: re-normalised first.
        format: Format of its weights file (``"random"``: randomly initialised, weights stored with the student).
        weights: The weights file it was read from (``None``: stored in the checkpoint itself).
    """

    tower: TowerSpec
    input_norm: Literal["imagenet", "clip"] = "imagenet"
    format: str = "random"
    weights: str | None = None


@dataclass
class HeadSpec:
    """A classifier's head.

    Attributes:
        kind: ``linear_probe`` (BatchNorm without affine + Linear on the CLS token after the final norm),
            ``finetune`` (pooled tokens + ``fc_norm`` + Linear) or ``linear`` (a Linear on the CLS token after the
            final norm: a probe exported with its BatchNorm folded in).
        num_classes: Output width.
        class_names: Class names in index order (empty when unknown).
        global_pool: ``token`` (CLS) or ``avg`` (mean of the patch tokens).
        lr: Linear probe: the learning rate of this head (the lr grid's winner).
        grid_index: Linear-probe training checkpoints: which head of the lr grid this spec describes.
    """

    kind: HeadKind
    num_classes: int
    class_names: list[str] = field(default_factory=list)
    global_pool: Pool = "token"
    lr: float | None = None
    grid_index: int | None = None


@dataclass
class ModelSpec:
    """Everything a reader needs besides the weights (see the module docstring)."""

    kind: SpecKind
    encoder: EncoderArch
    preprocessing: Preprocessing
    decoder: DecoderArch | None = None
    teacher: TeacherSpec | None = None
    head: HeadSpec | None = None
    version: int = SPEC_VERSION

    def to_dict(self) -> dict[str, Any]:
        """Plain data (tuples, lists, dicts, numbers, strings): fits ``torch.save`` with ``weights_only`` and JSON."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelSpec:
        """The spec stored by :meth:`to_dict` (unknown fields of the same version are ignored).

        Raises:
            CheckpointError: A newer spec version, or a malformed record.
        """
        check_version(data)
        try:
            return _from_dict(cls, data)
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"the stored model spec is malformed ({type(e).__name__}: {e})") from e


def check_version(record: dict[str, Any], where: str = "") -> None:
    """Raises when a stored spec record (ours or a segmentation model's) has no version or a newer one."""
    version = record.get("version")
    if not isinstance(version, int) or version < 1:
        raise CheckpointError(f"{where}the stored model spec has no valid version (got {version!r})")
    if version > SPEC_VERSION:
        raise CheckpointError(
            f"{where}the stored model spec is version {version}, newer than this milan understands ({SPEC_VERSION}); "
            "upgrade milan-pretrain"
        )


def _from_dict(cls: type[T], data: dict[str, Any]) -> T:
    """The dataclass ``cls`` from plain data, nested dataclasses and tuples rebuilt from the field types."""
    types = get_type_hints(cls)
    values = {name: data[name] for name in types if name in data}  # unknown keys are ignored
    for name, value in values.items():
        nested = [t for t in (types[name], *get_args(types[name])) if dataclasses.is_dataclass(t)]
        if nested and value is not None:
            values[name] = _from_dict(cast(Any, nested[0]), value)
        elif get_origin(types[name]) is tuple:
            values[name] = tuple(float(v) for v in value)  # RGB: JSON gives lists
    return cls(**values)


def spec_hints(data: Any) -> dict[str, Any]:
    """The facts checkpoint readers take from a stored spec (``num_heads``, ``tower`` ...; ``{}`` if there is none)."""
    if data is None:
        return {}
    if not isinstance(data, (dict, ModelSpec)):
        raise CheckpointError(f"the stored model spec is malformed (a {type(data).__name__}, not a dict)")
    if isinstance(data, dict) and data.get("kind") == "segmentation":  # milan.checkpoint.segmenter's record
        raise CheckpointError(
            "a milan segment checkpoint (a segmentation model, not a pretrained encoder or a classifier): "
            "milan evaluate and milan visualize read it"
        )
    spec = data if isinstance(data, ModelSpec) else ModelSpec.from_dict(data)
    out: dict[str, Any] = {"spec": spec, "num_heads": spec.encoder.num_heads}
    if spec.decoder is not None:
        out["decoder_num_heads"] = spec.decoder.num_heads
    if spec.head is not None:
        out["global_pool"] = spec.head.global_pool
    if spec.teacher is not None:
        out["tower"] = out["teacher_spec"] = spec.teacher.tower.to_dict()
        out["teacher_input_norm"] = spec.teacher.input_norm
    return out


# ----------------------------------------------------------------------------------------------------------------
# The spec of live modules (what the jobs store)


def encoder_arch_of(encoder: VisionTransformer) -> EncoderArch:
    """The architecture of a built encoder (its stored position table decides ``pos_embed_layout``)."""
    sd = {k: v.detach().cpu() if k == "pos_embed" else v.detach() for k, v in encoder.state_dict().items()}
    return infer_encoder(sd, num_heads=encoder.num_heads)


def milan_spec(model: MILAN, *, interpolation: Resample = "bicubic", teacher_weights: str | None = None) -> ModelSpec:
    """The spec of a MILAN model (pretraining checkpoints).

    Args:
        model: The model (student built, teacher loaded).
        interpolation: The resampling of the run's views (evaluation views use it too).
        teacher_weights: The teacher's weights file (``None``: a random teacher, stored with the student).
    """
    teacher = None
    if model.teacher is not None:
        fmt = model.teacher.source_format if teacher_weights else "random"
        teacher = TeacherSpec(describe_tower(model.teacher.model), model.teacher.input_norm, fmt, teacher_weights)
    encoder = encoder_arch_of(model.encoder)
    heads = int(cast(Any, model.decoder.decoder_blocks[0]).attn.num_heads)
    decoder = infer_decoder({k: v.detach() for k, v in model.decoder.state_dict().items()}, num_heads=heads)
    return ModelSpec("milan", encoder, Preprocessing(encoder.img_size, interpolation=interpolation), decoder, teacher)


# ----------------------------------------------------------------------------------------------------------------
# Architectures from shapes


def _need(sd: StateDict, key: str, what: str) -> torch.Tensor:
    if key not in sd:
        raise CheckpointError(f"{what}: missing key {key!r} (have e.g. {list(sd)[:6]})")
    return sd[key]


def count_blocks(sd: StateDict, prefix: str) -> int:
    """Number of ``{prefix}N.`` blocks; raises if the indices are not 0..N-1."""
    pattern = re.compile(rf"^{re.escape(prefix)}(\d+)\.")
    ids = {int(m.group(1)) for k in sd if (m := pattern.match(k))}
    if ids and ids != set(range(len(ids))):
        raise CheckpointError(f"blocks under {prefix!r} are not numbered 0..{len(ids) - 1}: {sorted(ids)}")
    return len(ids)


def _heads(width: int, given: int | None, default: int, what: str) -> int:
    heads = given or default
    if width % heads:
        raise CheckpointError(f"{what}: width {width} is not divisible by num_heads={heads}")
    return heads


def vit_table_heads(width: int, depth: int) -> int | None:
    """The heads of the standard ViT of this width and depth (:data:`~milan.models.VIT_ARCHS`), if there is one."""
    return next((h for d, n, h in VIT_ARCHS.values() if (d, n) == (width, depth)), None)


def detect_layout(pos_embed: torch.Tensor, grid: tuple[int, int]) -> PosLayout:
    """Which fixed sin-cos layout a stored (1, 1 + L, D) position table is, or ``"learned"`` (anything else)."""
    dim = int(pos_embed.shape[-1])
    if dim % 4 or pos_embed.shape[1] != grid[0] * grid[1] + 1:
        return "learned"
    for layout in ("mmpretrain", "mae"):
        table = sincos_2d(grid, dim, layout=layout)
        if torch.allclose(pos_embed.float().reshape(table.shape), table, atol=1e-4):
            return layout
    return "learned"


def _vit_shape(sd: StateDict, what: str) -> tuple[dict[str, Any], torch.Tensor]:
    """What the student encoder and teacher towers share (timm keys): shape fields and the position table."""
    proj = _need(sd, "patch_embed.proj.weight", what)  # (D, C, p, p)
    pos = _need(sd, "pos_embed", what)  # (1, prefix tokens + L, D)
    depth = count_blocks(sd, "blocks.")
    if depth == 0:
        raise CheckpointError(f"{what}: no blocks.N.* keys")
    width = int(proj.shape[0])
    shape = {
        "patch_size": int(proj.shape[-1]),
        "embed_dim": width,
        "depth": depth,
        "mlp_ratio": _need(sd, "blocks.0.mlp.fc1.weight", what).shape[0] / width,
        "in_chans": int(proj.shape[1]),
        "qkv_bias": "blocks.0.attn.qkv.bias" in sd,
    }
    return shape, pos


def infer_encoder(sd: StateDict, num_heads: int | None = None) -> EncoderArch:
    """An encoder from its timm-layout keys (``cls_token``, ``pos_embed``, ``patch_embed.proj``, ``blocks.N``)."""
    what = "student encoder"
    shape, pos = _vit_shape(sd, what)
    _need(sd, "cls_token", what)
    grid = square_grid(int(pos.shape[1]) - 1, what)
    width = shape["embed_dim"]
    standard = vit_table_heads(width, shape["depth"]) or max(1, width // 64)
    return EncoderArch(
        img_size=grid * shape["patch_size"],
        num_heads=_heads(width, num_heads, standard, what),
        pos_embed_layout=detect_layout(pos, (grid, grid)),
        **shape,
    )


def infer_decoder(sd: StateDict, num_heads: int | None = None) -> DecoderArch:
    """A decoder from our/MAE key names (``decoder_embed``, ``mask_token``, ``decoder_blocks.N`` ...)."""
    what = "decoder"
    embed = _need(sd, "decoder_embed.weight", what)  # (C, E)
    pred = _need(sd, "decoder_pred.weight", what)  # (out, C)
    pos = _need(sd, "decoder_pos_embed", what)
    width = int(embed.shape[0])
    fc1 = sd.get("decoder_blocks.0.mlp.fc1.weight")
    return DecoderArch(
        kind="mae" if "decoder_blocks.0.attn.qkv.weight" in sd else "prompting",
        grid=square_grid(int(pos.shape[1]) - 1, what),
        in_dim=int(embed.shape[1]),
        out_dim=int(pred.shape[0]),
        embed_dim=width,
        depth=count_blocks(sd, "decoder_blocks."),
        num_heads=_heads(width, num_heads, max(1, width // 32), what),
        mlp_ratio=fc1.shape[0] / width if fc1 is not None else 4.0,
    )


def infer_tower(
    sd: StateDict, *, act: Act, norm_eps: float, num_heads: int | None = None, img_size: int | None = None
) -> TowerSpec:
    """A teacher tower from timm-layout keys.

    ``act`` and ``norm_eps`` are not in the weights; ``img_size`` runs it at another resolution than the stored
    table's (resampled when it is built).
    """
    what = "teacher tower"
    shape, pos = _vit_shape(sd, what)
    width = shape["embed_dim"]
    class_token = "cls_token" in sd
    reg_tokens = int(sd["reg_token"].shape[1]) if "reg_token" in sd else 0
    prefix = int(class_token) + reg_tokens
    n = int(pos.shape[1])
    no_embed_class = math.isqrt(n) ** 2 == n and prefix > 0 and math.isqrt(n - prefix) ** 2 != n - prefix
    grid = square_grid(n if no_embed_class else n - prefix, what)
    head = sd.get("head.weight")
    return TowerSpec(
        img_size=img_size or grid * shape["patch_size"],
        num_heads=_heads(width, num_heads, _TOWER_HEADS.get(width, max(1, width // 64)), what),
        out_dim=int(head.shape[0]) if head is not None else 0,
        act=act,
        norm_eps=norm_eps,
        pre_norm="norm_pre.weight" in sd,
        class_token=class_token,
        reg_tokens=reg_tokens,
        no_embed_class=no_embed_class,
        layer_scale="blocks.0.ls1.gamma" in sd,
        qk_norm="blocks.0.attn.q_norm.weight" in sd,
        **shape,
    )
