"""Architectures inferred from tensor shapes, and the modules they build.

Shapes give widths, depths, patch size, grid, MLP ratio, token layout and head widths. They do not give the number
of attention heads, the activation or the LayerNorm epsilon; those come from the caller, from metadata stored in the
file, or from the conventions below (each one stated where it is used):

* student encoders: the standard ViT table (:data:`milan.models.VIT_ARCHS`) by (width, depth), else ``width // 64``;
* decoders: ``width // 32`` (MILAN's and MAE's 512-wide decoders have 16 heads);
* teacher towers: ``width // 64`` (OpenAI and OpenCLIP's default 64-wide heads), except the OpenCLIP ViT-H/g/bigG
  widths 1280/1408/1664, which have 16 heads.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any, Literal, TypeVar, cast

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import QuickGELU
from timm.layers.attention import Attention
from timm.layers.mlp import Mlp
from timm.models.vision_transformer import Block
from timm.models.vision_transformer import VisionTransformer as TimmVisionTransformer

from milan.checkpoint.errors import CheckpointError
from milan.models.decoder import MAEDecoder, PromptingDecoder
from milan.models.factory import DecoderConfig, EncoderConfig, build_decoder, build_encoder
from milan.models.vit import VIT_ARCHS, VisionTransformer
from milan.pos_embed import PosEmbedLayout, sincos_2d

StateDict = dict[str, torch.Tensor]
Act = Literal["quick_gelu", "gelu", "gelu_tanh"]
PosLayout = Literal["mmpretrain", "mae", "learned"]

M = TypeVar("M", bound=nn.Module)

_TOWER_HEADS = {1280: 16, 1408: 16, 1664: 16}  # OpenCLIP ViT-H/14 (head width 80), g/14 (88), bigG/14 (104)


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


def square_grid(num_tokens: int, what: str) -> int:
    """The side of a square patch grid of ``num_tokens`` patches."""
    side = math.isqrt(num_tokens)
    if side * side != num_tokens:
        raise CheckpointError(f"{what}: {num_tokens} position-embedding patches do not form a square grid")
    return side


def tower_heads(width: int) -> int:
    """Default head count of a teacher tower of this width (see the module docstring)."""
    return _TOWER_HEADS.get(width, max(1, width // 64))


def encoder_heads(width: int, depth: int) -> int:
    """Default head count of a student encoder: the standard ViT table, else ``width // 64``."""
    for dim, d, heads in VIT_ARCHS.values():
        if (dim, d) == (width, depth):
            return heads
    return max(1, width // 64)


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


# ----------------------------------------------------------------------------------------------------------------
# Student encoder


@dataclass
class ViTShape:
    """What every ViT description here starts with (the student encoder's and the teacher tower's)."""

    img_size: int
    patch_size: int
    embed_dim: int
    depth: int
    num_heads: int
    mlp_ratio: float = 4.0

    @property
    def grid(self) -> int:
        """Patches per side."""
        return self.img_size // self.patch_size


@dataclass
class EncoderArch(ViTShape):
    """Our :class:`~milan.models.VisionTransformer` (timm key names)."""

    in_chans: int = 3
    qkv_bias: bool = True
    pos_embed_layout: PosLayout = "mmpretrain"

    def build(self, drop_path_rate: float = 0.0) -> VisionTransformer:
        """A randomly initialised encoder of this shape (load the weights next); ``drop_path_rate`` for fine-tuning."""
        return build_encoder(self.to_config(drop_path_rate))

    def to_config(self, drop_path_rate: float = 0.0) -> EncoderConfig:
        """This shape as the model factory's :class:`~milan.models.factory.EncoderConfig`.

        A learned position table is described as ``mmpretrain``: loading the weights restores it.
        """
        layout: PosEmbedLayout = "mae" if self.pos_embed_layout == "mae" else "mmpretrain"
        return EncoderConfig(**_vit_shape(self), pos_embed_layout=layout, drop_path_rate=drop_path_rate)


def infer_encoder(sd: StateDict, num_heads: int | None = None) -> EncoderArch:
    """Infers an encoder from its timm-layout keys (``cls_token``, ``pos_embed``, ``patch_embed.proj``, ``blocks.N``).

    Args:
        sd: Encoder state dict (no prefix).
        num_heads: Attention heads (not recoverable from shapes; see the module docstring for the default).

    Returns:
        The architecture.
    """
    what = "student encoder"
    proj = _need(sd, "patch_embed.proj.weight", what)  # (D, C, p, p)
    pos = _need(sd, "pos_embed", what)  # (1, 1 + L, D)
    _need(sd, "cls_token", what)
    embed_dim, in_chans, patch = int(proj.shape[0]), int(proj.shape[1]), int(proj.shape[-1])
    depth = count_blocks(sd, "blocks.")
    if depth == 0:
        raise CheckpointError(f"{what}: no blocks.N.* keys")
    grid = square_grid(int(pos.shape[1]) - 1, what)
    fc1 = _need(sd, "blocks.0.mlp.fc1.weight", what)
    heads = num_heads or encoder_heads(embed_dim, depth)
    if embed_dim % heads:
        raise CheckpointError(f"{what}: width {embed_dim} is not divisible by num_heads={heads}")
    return EncoderArch(
        img_size=grid * patch,
        patch_size=patch,
        embed_dim=embed_dim,
        depth=depth,
        num_heads=heads,
        mlp_ratio=fc1.shape[0] / embed_dim,
        in_chans=in_chans,
        qkv_bias="blocks.0.attn.qkv.bias" in sd,
        pos_embed_layout=detect_layout(pos, (grid, grid)),
    )


# ----------------------------------------------------------------------------------------------------------------
# Decoder


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


def infer_decoder(sd: StateDict, num_heads: int | None = None) -> DecoderArch:
    """Infers a decoder from our/MAE key names (``decoder_embed``, ``mask_token``, ``decoder_blocks.N`` ...)."""
    what = "decoder"
    embed = _need(sd, "decoder_embed.weight", what)  # (C, E)
    pred = _need(sd, "decoder_pred.weight", what)  # (out, C)
    pos = _need(sd, "decoder_pos_embed", what)
    depth = count_blocks(sd, "decoder_blocks.")
    kind: Literal["prompting", "mae"] = "mae" if "decoder_blocks.0.attn.qkv.weight" in sd else "prompting"
    width = int(embed.shape[0])
    heads = num_heads or max(1, width // 32)
    if width % heads:
        raise CheckpointError(f"{what}: width {width} is not divisible by num_heads={heads}")
    fc1 = sd.get("decoder_blocks.0.mlp.fc1.weight")
    return DecoderArch(
        kind=kind,
        grid=square_grid(int(pos.shape[1]) - 1, what),
        in_dim=int(embed.shape[1]),
        out_dim=int(pred.shape[0]),
        embed_dim=width,
        depth=depth,
        num_heads=heads,
        mlp_ratio=fc1.shape[0] / width if fc1 is not None else 4.0,
    )


# ----------------------------------------------------------------------------------------------------------------
# Teacher tower (a timm VisionTransformer)


@dataclass
class TowerSpec(ViTShape):
    """A timm ``VisionTransformer`` used as the teacher; ``head`` (if ``out_dim``) projects every token."""

    out_dim: int = 0  # width of the Linear head (CLIP's proj); 0 = no head, features are embed_dim wide
    act: Act = "gelu"
    norm_eps: float = 1e-6
    pre_norm: bool = False  # CLIP's ln_pre (then the patch projection has no bias)
    class_token: bool = True
    reg_tokens: int = 0
    no_embed_class: bool = False  # position table covers patches only (timm DINOv2-with-registers)
    layer_scale: bool = False
    qkv_bias: bool = True
    qk_norm: bool = False
    in_chans: int = 3
    timm_name: str | None = None  # when set, built by timm.create_model(timm_name, ...) instead
    resize_input: bool = False  # resize inputs of any other size to img_size (runs a /14 teacher on a /16 grid)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TowerSpec:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    def build(self) -> TimmVisionTransformer:
        """The tower with random weights (:func:`describe_tower` gives this spec back)."""
        if self.timm_name:
            import timm

            model = timm.create_model(
                self.timm_name, pretrained=False, num_classes=self.out_dim, img_size=self.img_size
            )
            if not isinstance(model, TimmVisionTransformer):
                raise TypeError(
                    f"timm model {self.timm_name!r} is a {type(model).__name__}, not a timm VisionTransformer; "
                    "MILAN's teacher needs a standard ViT block to compute the CLS attention (EVA/EVA-02 use RoPE "
                    "blocks and are not supported)"
                )
            model._milan_timm_name = self.timm_name  # type: ignore[assignment]  # read by describe_tower
        else:
            acts: dict[str, Any] = {
                "quick_gelu": QuickGELU,
                "gelu": nn.GELU,
                "gelu_tanh": partial(nn.GELU, approximate="tanh"),
            }
            if self.act not in acts:
                raise ValueError(f"unknown activation {self.act!r}; choose one of {sorted(acts)}")
            model = TimmVisionTransformer(
                **_vit_shape(self),
                qk_norm=self.qk_norm,
                init_values=1.0 if self.layer_scale else None,
                class_token=self.class_token,
                reg_tokens=self.reg_tokens,
                no_embed_class=self.no_embed_class,
                pre_norm=self.pre_norm,
                global_pool="token" if self.class_token else "avg",
                num_classes=self.out_dim,
                act_layer=acts[self.act],
                norm_layer=partial(nn.LayerNorm, eps=self.norm_eps),
            )
        if self.resize_input:
            model.patch_embed.register_forward_pre_hook(resize_to_tower)
        return model


def resize_to_tower(module: nn.Module, args: tuple[Any, ...]) -> tuple[torch.Tensor] | None:
    """Forward pre-hook of a tower's patch embedding: bicubic-resize (B, C, H, W) inputs to the tower's resolution."""
    x = args[0]
    size = tuple(int(s) for s in module.img_size)  # type: ignore[union-attr]
    if tuple(x.shape[-2:]) == size:
        return None
    return (F.interpolate(x, size=size, mode="bicubic", align_corners=False, antialias=True),)


def _vit_shape(arch: EncoderArch | TowerSpec) -> dict[str, Any]:
    """The constructor arguments that our encoder and timm's ``VisionTransformer`` share."""
    names = ("img_size", "patch_size", "in_chans", "embed_dim", "depth", "num_heads", "mlp_ratio", "qkv_bias")
    return {name: getattr(arch, name) for name in names}


def infer_tower(
    sd: StateDict,
    *,
    act: Act,
    norm_eps: float,
    num_heads: int | None = None,
    img_size: int | None = None,
) -> TowerSpec:
    """Infers a teacher tower from timm-layout keys.

    Args:
        sd: timm ``VisionTransformer`` state dict.
        act: MLP activation (not recorded in the weights).
        norm_eps: LayerNorm epsilon (not recorded in the weights).
        num_heads: Attention heads (default: :func:`tower_heads`).
        img_size: Run the tower at this resolution (the stored position table is resampled when loaded);
            default: the stored table's resolution.

    Returns:
        The spec.
    """
    what = "teacher tower"
    proj = _need(sd, "patch_embed.proj.weight", what)
    pos = _need(sd, "pos_embed", what)
    embed_dim, in_chans, patch = int(proj.shape[0]), int(proj.shape[1]), int(proj.shape[-1])
    depth = count_blocks(sd, "blocks.")
    if depth == 0:
        raise CheckpointError(f"{what}: no blocks.N.* keys")
    class_token = "cls_token" in sd
    reg_tokens = int(sd["reg_token"].shape[1]) if "reg_token" in sd else 0
    prefix = int(class_token) + reg_tokens
    n = int(pos.shape[1])
    no_embed_class = math.isqrt(n) ** 2 == n and prefix > 0 and math.isqrt(n - prefix) ** 2 != n - prefix
    grid = square_grid(n if no_embed_class else n - prefix, what)
    heads = num_heads or tower_heads(embed_dim)
    if embed_dim % heads:
        raise CheckpointError(f"{what}: width {embed_dim} is not divisible by num_heads={heads}")
    head = sd.get("head.weight")
    return TowerSpec(
        img_size=img_size or grid * patch,
        patch_size=patch,
        embed_dim=embed_dim,
        depth=depth,
        num_heads=heads,
        mlp_ratio=_need(sd, "blocks.0.mlp.fc1.weight", what).shape[0] / embed_dim,
        out_dim=int(head.shape[0]) if head is not None else 0,
        act=act,
        norm_eps=norm_eps,
        pre_norm="norm_pre.weight" in sd,
        class_token=class_token,
        reg_tokens=reg_tokens,
        no_embed_class=no_embed_class,
        layer_scale="blocks.0.ls1.gamma" in sd,
        qkv_bias="blocks.0.attn.qkv.bias" in sd,
        qk_norm="blocks.0.attn.q_norm.weight" in sd,
        in_chans=in_chans,
    )


def describe_tower(model: TimmVisionTransformer) -> TowerSpec:
    """The spec of a built timm tower (save it with a checkpoint so that the tower can be rebuilt exactly).

    ``timm_name`` and ``resize_input`` are recognised on towers built by :meth:`TowerSpec.build`.
    """
    block = cast(Block, model.blocks[0])
    attn = cast(Attention, block.attn)
    mlp = cast(Mlp, block.mlp)
    act_module = mlp.act
    act: Act = "gelu"
    if isinstance(act_module, QuickGELU):
        act = "quick_gelu"
    elif isinstance(act_module, nn.GELU) and act_module.approximate == "tanh":
        act = "gelu_tanh"
    norm = block.norm1
    head = model.head
    grid = model.patch_embed.grid_size
    return TowerSpec(
        img_size=int(grid[0]) * int(model.patch_embed.patch_size[0]),
        patch_size=int(model.patch_embed.patch_size[0]),
        embed_dim=int(model.embed_dim),
        depth=len(model.blocks),
        num_heads=int(attn.num_heads),
        mlp_ratio=cast(nn.Linear, mlp.fc1).out_features / model.embed_dim,
        out_dim=head.out_features if isinstance(head, nn.Linear) else 0,
        act=act,
        norm_eps=float(norm.eps) if isinstance(norm, nn.LayerNorm) else 1e-6,
        pre_norm=not isinstance(model.norm_pre, nn.Identity),
        class_token=model.cls_token is not None,
        reg_tokens=int(model.num_reg_tokens),
        no_embed_class=bool(model.no_embed_class),
        layer_scale=not isinstance(block.ls1, nn.Identity),
        qkv_bias=attn.qkv.bias is not None,
        qk_norm=not isinstance(attn.q_norm, nn.Identity),
        in_chans=int(model.patch_embed.proj.in_channels),
        timm_name=getattr(model, "_milan_timm_name", None),  # set by TowerSpec.build
        resize_input=resize_to_tower in model.patch_embed._forward_pre_hooks.values(),
    )


def load_strict(model: nn.Module, state_dict: StateDict, what: str) -> None:
    """``load_state_dict(strict=True)`` that reports every missing, unexpected and mis-shaped key in one error."""
    check_fit(model, state_dict, what)
    model.load_state_dict(state_dict, strict=True)


def build_strict(build: Callable[[], M], state_dict: StateDict, what: str) -> M:
    """Builds a module and loads ``state_dict`` strictly, checking the fit on the meta device first.

    The architecture was inferred from the tensors' shapes; a file whose tensors do not all fit it (e.g. block keys
    that imply a huge depth, with tiny tensors behind them) is refused before the real module is allocated.

    Args:
        build: Builds the module (called twice: once on the meta device, then for real).
        state_dict: The weights.
        what: Names the module in the error.

    Returns:
        The module with the weights loaded.

    Raises:
        CheckpointError: Missing, unexpected or mis-shaped keys (all named).
    """
    with torch.device("meta"):
        skeleton = build()
    check_fit(skeleton, state_dict, what)
    model = build()
    model.load_state_dict(state_dict, strict=True)
    return model


def check_fit(model: nn.Module, state_dict: StateDict, what: str) -> None:
    """Raises one :class:`CheckpointError` naming every missing, unexpected and mis-shaped key (nothing is copied)."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    shapes = [
        f"{k}: file {tuple(v.shape)} vs model {tuple(expected[k].shape)}"
        for k, v in state_dict.items()
        if k in expected and tuple(v.shape) != tuple(expected[k].shape)
    ]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing {missing[:12]}{' ...' if len(missing) > 12 else ''}")
        if unexpected:
            parts.append(f"unexpected {unexpected[:12]}{' ...' if len(unexpected) > 12 else ''}")
        if shapes:
            parts.append(f"shape mismatch {shapes[:6]}")
        raise CheckpointError(f"{what}: the weights do not fit the inferred architecture: {'; '.join(parts)}")
