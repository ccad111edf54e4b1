"""The teacher's tower: a timm ``VisionTransformer`` described by a :class:`TowerSpec`, built and loaded from it.

A spec records what a tower's weights cannot say (activation, LayerNorm epsilon, heads, token layout, image size):
:func:`describe_tower` gives the spec of a built tower and :meth:`TowerSpec.build` builds that tower again, so a
checkpoint that stores the spec rebuilds its teacher exactly. :func:`build_tower` loads weights into a spec's tower,
resampling the position table when the spec runs it on another grid.
"""

from __future__ import annotations

import dataclasses
import math
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
from timm.layers.pos_embed import resample_abs_pos_embed
from timm.models.vision_transformer import Block, checkpoint_filter_fn
from timm.models.vision_transformer import VisionTransformer as TimmVisionTransformer

from milan.errors import CheckpointError
from milan.models.teacher import check_teacher_tower

Act = Literal["quick_gelu", "gelu", "gelu_tanh"]
StateDict = dict[str, torch.Tensor]
M = TypeVar("M", bound=nn.Module)
_ACTS: dict[str, Any] = {"quick_gelu": QuickGELU, "gelu": nn.GELU, "gelu_tanh": partial(nn.GELU, approximate="tanh")}


@dataclass
class ViTShape:
    """What every ViT description starts with (the student encoder's and the teacher tower's).

    Its fields are constructor arguments that our encoder and timm's ``VisionTransformer`` share.
    """

    img_size: int
    patch_size: int
    embed_dim: int
    depth: int
    num_heads: int
    mlp_ratio: float = 4.0
    in_chans: int = 3
    qkv_bias: bool = True

    @property
    def grid(self) -> int:
        """Patches per side."""
        return self.img_size // self.patch_size


def vit_kwargs(shape: ViTShape) -> dict[str, Any]:
    """The constructor arguments of ``shape``'s :class:`ViTShape` fields."""
    return {f.name: getattr(shape, f.name) for f in dataclasses.fields(ViTShape)}


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
    qk_norm: bool = False
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
            if self.act not in _ACTS:
                raise ValueError(f"unknown activation {self.act!r}; choose one of {sorted(_ACTS)}")
            model = TimmVisionTransformer(
                **vit_kwargs(self),
                qk_norm=self.qk_norm,
                init_values=1.0 if self.layer_scale else None,
                class_token=self.class_token,
                reg_tokens=self.reg_tokens,
                no_embed_class=self.no_embed_class,
                pre_norm=self.pre_norm,
                global_pool="token" if self.class_token else "avg",
                num_classes=self.out_dim,
                act_layer=_ACTS[self.act],
                norm_layer=partial(nn.LayerNorm, eps=self.norm_eps),
            )
        if self.resize_input:
            model.patch_embed.register_forward_pre_hook(resize_to_tower)
        return model


def clip_vision_tower(
    *,
    img_size: int = 224,
    patch_size: int = 16,
    width: int = 768,
    depth: int = 12,
    num_heads: int | None = None,
    out_dim: int = 512,
) -> TimmVisionTransformer:
    """An OpenAI-CLIP-shaped image tower with random weights (``num_heads``: OpenAI's ``width // 64`` if omitted).

    Built like OpenAI's visual encoder: ``conv1`` without bias, ``ln_pre``, QuickGELU, LayerNorm eps 1e-5, ``ln_post``
    (timm's ``norm``) and ``proj`` (timm's ``head``, a Linear whose bias stays 0).
    """
    heads = num_heads or max(1, width // 64)
    clip = TowerSpec(
        img_size, patch_size, width, depth, heads, out_dim=out_dim, act="quick_gelu", norm_eps=1e-5, pre_norm=True
    )
    tower = clip.build()
    head = tower.head
    if isinstance(head, nn.Linear) and head.bias is not None:
        nn.init.zeros_(head.bias)
    return tower


def resize_to_tower(module: nn.Module, args: tuple[Any, ...]) -> tuple[torch.Tensor] | None:
    """Forward pre-hook of a tower's patch embedding: bicubic-resize (B, C, H, W) inputs to the tower's resolution."""
    x = args[0]
    size = tuple(int(s) for s in module.img_size)  # type: ignore[union-attr]
    if tuple(x.shape[-2:]) == size:
        return None
    return (F.interpolate(x, size=size, mode="bicubic", align_corners=False, antialias=True),)


def describe_tower(model: TimmVisionTransformer) -> TowerSpec:
    """The spec of a built timm tower (``timm_name`` and ``resize_input`` of those :meth:`TowerSpec.build` built)."""
    block = cast(Block, model.blocks[0])
    attn = cast(Attention, block.attn)
    mlp = cast(Mlp, block.mlp)
    act = next((name for name, layer in _ACTS.items() if repr(layer()) == repr(mlp.act)), "gelu")
    norm = block.norm1
    head = model.head
    patch = int(model.patch_embed.patch_size[0])
    return TowerSpec(
        img_size=int(model.patch_embed.grid_size[0]) * patch,
        patch_size=patch,
        embed_dim=int(model.embed_dim),
        depth=len(model.blocks),
        num_heads=int(attn.num_heads),
        mlp_ratio=cast(nn.Linear, mlp.fc1).out_features / model.embed_dim,
        out_dim=head.out_features if isinstance(head, nn.Linear) else 0,
        act=cast(Act, act),
        norm_eps=float(norm.eps) if isinstance(norm, nn.LayerNorm) else 1e-6,
        pre_norm=not isinstance(model.norm_pre, nn.Identity),
        class_token=model.cls_token is not None,
        reg_tokens=int(model.num_reg_tokens),
        no_embed_class=bool(model.no_embed_class),
        layer_scale=not isinstance(block.ls1, nn.Identity),
        qkv_bias=attn.qkv.bias is not None,
        qk_norm=not isinstance(attn.q_norm, nn.Identity),
        in_chans=int(model.patch_embed.proj.in_channels),
        timm_name=getattr(model, "_milan_timm_name", None),
        resize_input=resize_to_tower in model.patch_embed._forward_pre_hooks.values(),
    )


def build_tower(spec: TowerSpec, state_dict: StateDict) -> TimmVisionTransformer:
    """Builds the tower described by ``spec`` and loads ``state_dict`` strictly (position table resampled to its grid).

    Raises:
        CheckpointError: Missing, unexpected or mis-shaped keys (all named).
        TypeError, ValueError: Not a tower a teacher can use (:func:`~milan.models.teacher.check_teacher_tower`).
    """
    with torch.device("meta"):
        skeleton = spec.build()
    check_teacher_tower(skeleton)  # before the weights are fitted: a SigLIP file is named as such
    # timm's own filter converts/resamples for named models; ours resamples the position table for inferred ones.
    fit = checkpoint_filter_fn(dict(state_dict), skeleton) if spec.timm_name else _fit_pos_embed(state_dict, spec)
    return build_strict(spec.build, fit, "teacher tower")


def square_grid(num_tokens: int, what: str) -> int:
    """The side of a square patch grid of ``num_tokens`` patches."""
    side = math.isqrt(num_tokens)
    if side * side != num_tokens:
        raise CheckpointError(f"{what}: {num_tokens} position-embedding patches do not form a square grid")
    return side


def _fit_pos_embed(sd: StateDict, spec: TowerSpec) -> StateDict:
    """Resamples a stored position table to ``spec``'s grid (bicubic, as timm does); no-op when it already fits."""
    pos = sd.get("pos_embed")
    if pos is None:
        return sd
    prefix = 0 if spec.no_embed_class else int(spec.class_token) + spec.reg_tokens
    old = square_grid(int(pos.shape[1]) - prefix, "teacher position table")
    if old == spec.grid:
        return sd
    out = dict(sd)
    out["pos_embed"] = resample_abs_pos_embed(
        pos.float(), new_size=[spec.grid, spec.grid], old_size=[old, old], num_prefix_tokens=prefix, verbose=False
    )
    return out


def build_strict(build: Callable[[], M], state_dict: StateDict, what: str) -> M:
    """Builds a module and loads ``state_dict`` strictly, checking the fit on the meta device first.

    An architecture inferred from the tensors' shapes is checked before the real module is allocated, so a file
    whose keys imply a huge model with tiny tensors behind them is refused cheaply.

    Raises:
        CheckpointError: Missing, unexpected or mis-shaped keys (all named in one message).
    """
    with torch.device("meta"):
        skeleton = build()
    expected = skeleton.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    shapes = [
        f"{k}: file {tuple(v.shape)} vs model {tuple(expected[k].shape)}"
        for k, v in state_dict.items()
        if k in expected and tuple(v.shape) != tuple(expected[k].shape)
    ]
    parts = [
        f"{label} {keys[:n]}{' ...' if len(keys) > n else ''}"
        for label, keys, n in (("missing", missing, 12), ("unexpected", unexpected, 12), ("shape mismatch", shapes, 6))
        if keys
    ]
    if parts:
        raise CheckpointError(f"{what}: the weights do not fit the inferred architecture: {'; '.join(parts)}")
    model = build()
    model.load_state_dict(state_dict, strict=True)
    return model
