"""Teacher towers from foreign CLIP / ViT layouts: each converter returns timm keys and the inferred ``TowerSpec``.

What the weights do not record, and where it comes from:

=============  ==============================  =================  ======================================
format         activation                      LayerNorm eps      heads
=============  ==============================  =================  ======================================
OpenAI CLIP    the TorchScript archive's       1e-5               width // 64
               activation class; a state dict:
               QuickGELU (OpenAI's weights)*
OpenCLIP       ``open_clip_config.json`` next  1e-5               ``vision_cfg.head_width`` from that
               to the weights (``quick_gelu``)                    file, else :func:`arch.tower_heads`
               else GELU (open_clip's default)*
HF CLIP        ``config.json`` ``hidden_act``  ``layer_norm_eps``  ``num_attention_heads``
               (no config: QuickGELU)*
mmpretrain     QuickGELU (its CLIP teacher)    1e-5               width // 64
timm ViT       the timm model's (``model_name``), else GELU / 1e-6 / ``width // 64``; a CLIP tower (``norm_pre``)
               without ``model_name``: QuickGELU* / 1e-5
=============  ==============================  =================  ======================================

Every value can be overridden (``act=``, ``norm_eps=``, ``num_heads=``). (*) The weights alone cannot tell QuickGELU
from GELU (OpenAI's CLIP and the CLIPs trained with GELU by OpenCLIP share their key layout);
:func:`milan.checkpoint.read_checkpoint` then warns which one it used, why, and how to choose the other.
"""

from __future__ import annotations

from typing import Any

import torch
from timm.layers.pos_embed import resample_abs_pos_embed

from milan.checkpoint.arch import Act, StateDict, TowerSpec, infer_tower, square_grid
from milan.checkpoint.errors import CheckpointError
from milan.checkpoint.keymaps import hf_clip_to_timm, openai_clip_to_timm

_HF_ACTS: dict[str, Act] = {
    "quick_gelu": "quick_gelu",
    "gelu": "gelu",
    "gelu_new": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_fast": "gelu_tanh",
}


def openai_tower(
    sd: StateDict,
    *,
    prefix: str = "visual.",
    act: Act | None = None,
    norm_eps: float | None = None,
    num_heads: int | None = None,
    img_size: int | None = None,
) -> tuple[StateDict, TowerSpec, list[str]]:
    """An OpenAI-layout CLIP image tower (``visual.conv1.weight`` ...) -> timm keys and spec (QuickGELU, eps 1e-5).

    Returns:
        (timm_state_dict, spec, dropped_keys): the dropped keys are the text tower's and other non-``prefix`` keys.
    """
    required = ["conv1.weight", "positional_embedding", "class_embedding", "ln_post.weight"]
    missing = [prefix + k for k in required if prefix + k not in sd]
    if missing:
        raise CheckpointError(f"not an OpenAI-layout CLIP image tower: missing keys {missing}")
    converted = openai_clip_to_timm(sd, prefix=prefix)
    if prefix + "proj" not in sd:  # towers exported without the projection: features are the LN'd tokens
        converted.pop("head.weight", None)
        converted.pop("head.bias", None)
    spec = infer_tower(
        converted,
        act=act or "quick_gelu",
        norm_eps=norm_eps if norm_eps is not None else 1e-5,
        num_heads=num_heads,
        img_size=img_size,
    )
    return converted, spec, [k for k in sd if not k.startswith(prefix)]


def open_clip_tower(
    sd: StateDict,
    config: dict[str, Any] | None = None,
    *,
    act: Act | None = None,
    norm_eps: float | None = None,
    num_heads: int | None = None,
    img_size: int | None = None,
    model_name: str | None = None,
) -> tuple[StateDict, TowerSpec, list[str]]:
    """An OpenCLIP checkpoint's image tower -> timm keys and spec.

    Native OpenCLIP towers use OpenAI's key names; timm-backed towers (``visual.trunk.*``) are timm models already
    (their ``visual.head.proj`` becomes the head).

    Args:
        sd: The OpenCLIP state dict (``module.`` prefixes already stripped).
        config: The contents of ``open_clip_config.json`` when it sits next to the weights (``model_cfg`` inside).
        act: Override the activation (default: ``quick_gelu`` from the config, else open_clip's default GELU).
        norm_eps: Override the LayerNorm epsilon (default 1e-5, or ``vision_cfg.norm_kwargs.eps``).
        num_heads: Override the head count (default: width // ``vision_cfg.head_width``).
        img_size: Run at this resolution (position table resampled).
        model_name: timm model name for ``visual.trunk`` towers (default: ``vision_cfg.timm_model_name``).

    Returns:
        (timm_state_dict, spec, dropped_keys).
    """
    model_cfg = (config or {}).get("model_cfg", config or {})
    vision = model_cfg.get("vision_cfg", {}) if isinstance(model_cfg, dict) else {}
    if any(k.startswith("visual.trunk.") for k in sd):
        trunk = {k[len("visual.trunk.") :]: v for k, v in sd.items() if k.startswith("visual.trunk.")}
        if "visual.head.proj.weight" in sd:
            w = sd["visual.head.proj.weight"]
            trunk["head.weight"] = w
            trunk["head.bias"] = sd.get("visual.head.proj.bias", torch.zeros(w.shape[0], dtype=w.dtype))
        dropped = [k for k in sd if not k.startswith(("visual.trunk.", "visual.head.proj."))]
        name = model_name or vision.get("timm_model_name")
        timm_sd, spec = timm_tower(trunk, model_name=name, act=act, norm_eps=norm_eps, num_heads=num_heads)
        if img_size:
            spec.img_size = img_size
        return timm_sd, spec, dropped
    if act is None:
        act = "quick_gelu" if model_cfg.get("quick_gelu") else "gelu"
    if norm_eps is None:
        norm_eps = float((vision.get("norm_kwargs") or {}).get("eps", 1e-5))
    if num_heads is None and "head_width" in vision and "visual.conv1.weight" in sd:
        num_heads = max(1, int(sd["visual.conv1.weight"].shape[0]) // int(vision["head_width"]))
    return openai_tower(sd, act=act, norm_eps=norm_eps, num_heads=num_heads, img_size=img_size)


def hf_clip_tower(
    sd: StateDict,
    config: dict[str, Any] | None = None,
    *,
    act: Act | None = None,
    norm_eps: float | None = None,
    num_heads: int | None = None,
    img_size: int | None = None,
) -> tuple[StateDict, TowerSpec, list[str]]:
    """A Hugging Face transformers CLIP image tower -> timm keys and spec.

    Args:
        sd: ``CLIPModel`` / ``CLIPVisionModel(WithProjection)`` weights.
        config: Its ``config.json`` (a ``CLIPConfig`` with ``vision_config``, or a ``CLIPVisionConfig``);
            missing values take transformers' CLIP defaults (``quick_gelu``, eps 1e-5).
        act: Override the activation.
        norm_eps: Override the LayerNorm epsilon.
        num_heads: Override the head count.
        img_size: Run at this resolution (position table resampled).

    Returns:
        (timm_state_dict, spec, dropped_keys).
    """
    if "vision_model.embeddings.class_embedding" not in sd:
        if "vision_model.embeddings.patch_embedding.weight" in sd:
            raise CheckpointError(
                "this Hugging Face vision tower has no class token (a SigLIP-style model?); MILAN's attention "
                "masking needs the CLS query's attention, so it cannot be a teacher"
            )
        raise CheckpointError("not a Hugging Face CLIP vision tower: missing 'vision_model.embeddings.class_embedding'")
    cfg = dict(config or {})
    vision = cfg.get("vision_config", cfg)
    hidden_act = str(vision.get("hidden_act", "quick_gelu"))
    if act is None:
        if hidden_act not in _HF_ACTS:
            raise CheckpointError(f"HF CLIP hidden_act {hidden_act!r} is not supported (known: {sorted(_HF_ACTS)})")
        act = _HF_ACTS[hidden_act]
    converted = hf_clip_to_timm(sd)
    spec = infer_tower(
        converted,
        act=act,
        norm_eps=norm_eps if norm_eps is not None else float(vision.get("layer_norm_eps", 1e-5)),
        num_heads=num_heads or vision.get("num_attention_heads"),
        img_size=img_size,
    )
    dropped = [k for k in sd if not (k.startswith("vision_model.") or k == "visual_projection.weight")]
    dropped += [k for k in sd if k.endswith("position_ids")]
    return converted, spec, dropped


def timm_tower(
    sd: StateDict,
    *,
    model_name: str | None = None,
    act: Act | None = None,
    norm_eps: float | None = None,
    num_heads: int | None = None,
    img_size: int | None = None,
    head: bool = True,
) -> tuple[StateDict, TowerSpec]:
    """A timm ``VisionTransformer`` checkpoint (bring your own teacher: DINOv2, MAE, DeiT, CLIP in timm layout ...).

    Args:
        sd: timm keys; DINOv2's original layout (``mask_token``, ``register_tokens``) is converted by timm's rules.
        model_name: A timm model name; the tower is then built by ``timm.create_model`` (its activation, norm and
            heads) and the weights pass through timm's own ``checkpoint_filter_fn``. Without it the architecture is
            inferred from the shapes with timm's defaults (GELU, eps 1e-6, ``width // 64`` heads), except for CLIP
            towers (they have CLIP's ``norm_pre``): QuickGELU as OpenAI's CLIP, eps 1e-5 as every CLIP.
        act: Override the activation (inferred architectures only).
        norm_eps: Override the LayerNorm epsilon (inferred architectures only).
        num_heads: Override the head count (inferred architectures only).
        img_size: Run at this resolution (position table resampled).
        head: Keep a Linear ``head`` as the per-token projection (output width = head width). ``False`` drops it
            (output width = embed_dim): use that for classifier heads.

    Returns:
        (timm_state_dict, spec).
    """
    if "mask_token" in sd and "blocks.0.ls1.gamma" in sd:  # facebookresearch/dinov2 layout
        from timm.models.vision_transformer import _convert_dinov2

        sd = _convert_dinov2(dict(sd), None)  # type: ignore[arg-type]
    if not head:
        sd = {k: v for k, v in sd.items() if not k.startswith("head.")}
    clip_like = model_name is None and "norm_pre.weight" in sd  # CLIP's ln_pre: timm's *_clip_* towers
    spec = infer_tower(
        sd,
        act=act or ("quick_gelu" if clip_like else "gelu"),
        norm_eps=norm_eps if norm_eps is not None else (1e-5 if clip_like else 1e-6),
        num_heads=num_heads,
        img_size=img_size,
    )
    spec.timm_name = model_name
    return dict(sd), spec


def fit_pos_embed(sd: StateDict, spec: TowerSpec) -> StateDict:
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
