"""Pure key mappings between checkpoint layouts (no I/O), and teacher towers from foreign CLIP / ViT layouts.

Our layouts: the student encoder uses timm ``VisionTransformer`` keys, the decoder the original MILAN/MAE keys,
and the teacher timm keys under ``model.`` (``MILAN`` prefixes them ``student.encoder.``, ``student.decoder.``
and ``teacher.model.``).

Each tower converter returns timm keys and the inferred :class:`~milan.models.TowerSpec`. What the weights do not
record, and where it comes from:

=============  ==============================  =================  ======================================
format         activation                      LayerNorm eps      heads
=============  ==============================  =================  ======================================
OpenAI CLIP    the TorchScript archive's       1e-5               width // 64
               activation class; a state dict:
               QuickGELU (OpenAI's weights)*
OpenCLIP       ``open_clip_config.json`` next  1e-5               ``vision_cfg.head_width`` from that
               to the weights (``quick_gelu``)                    file, else the tower convention
               else GELU (open_clip's default)*                   (:mod:`milan.checkpoint.spec`)
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

import re
from typing import Any, Literal

import torch

from milan.checkpoint.spec import infer_tower
from milan.errors import CheckpointError
from milan.models.tower import Act, StateDict, TowerSpec

OrigKind = Literal["milan", "finetune", "linear_probe", "encoder"]


def _mmcv_blocks(src: str, dst: str) -> list[tuple[str, str]]:
    """Rules from mmcv transformer layers (``{src}N.ln1``, ``.attn``, ``.ffn``) to timm blocks (``{dst}N.norm1``)."""
    names = [
        ("ln1.", "norm1."),
        ("ln2.", "norm2."),
        ("attn.", "attn."),
        ("ffn.layers.0.0.", "mlp.fc1."),
        ("ffn.layers.1.", "mlp.fc2."),
    ]
    return [(rf"^{re.escape(src)}(\d+)\.{re.escape(a)}", rf"{dst}\1.{b}") for a, b in names]


# mmpretrain / MMSelfSup MILAN (backbone = MILANViT, neck = MILANPretrainDecoder) -> ours.
_MMPRETRAIN_ENCODER = [
    (r"^backbone\.patch_embed\.projection\.", "patch_embed.proj."),
    *_mmcv_blocks("backbone.layers.", "blocks."),
    (r"^backbone\.ln1\.", "norm."),
    (r"^backbone\.(cls_token|pos_embed)$", r"\1"),
]
_MMPRETRAIN_DECODER = [
    *_mmcv_blocks("neck.decoder_blocks.", "decoder_blocks."),
    (r"^neck\.ln1\.", "decoder_norm."),
    (r"^neck\.(mask_token|decoder_pos_embed|decoder_embed\.\w+|decoder_pred\.\w+)$", r"\1"),
]


def _merge_qkv(parts: dict[str, dict[str, torch.Tensor]], names: tuple[str, str, str], what: str) -> StateDict:
    """Separate q, k, v projections (``{fused_key: {name: tensor}}``) -> timm's fused ``qkv`` (rows [q; k; v])."""
    out: StateDict = {}
    for key, part in parts.items():
        if set(part) != set(names):
            raise ValueError(f"{what} attention {key}: missing {sorted(set(names) - set(part))}")
        out[key] = torch.cat([part[n] for n in names], dim=0)
    return out


def _rename(key: str, rules: list[tuple[str, str]]) -> str | None:
    for pattern, repl in rules:
        new, n = re.subn(pattern, repl, key)
        if n:
            return new
    return None


def mmpretrain_milan_to_milan(state_dict: StateDict) -> tuple[StateDict, StateDict, StateDict, list[str]]:
    """An mmpretrain/MMSelfSup MILAN state dict -> (encoder, decoder, openai_clip, unmapped keys).

    The source has ``backbone.*``, ``neck.*`` and optionally the whole OpenAI-layout CLIP under
    ``target_generator.tokenizer.*``.
    The teacher dict keeps OpenAI key names (``visual.*`` and the unused text tower) for :func:`openai_tower`.
    """
    encoder: StateDict = {}
    decoder: StateDict = {}
    clip: StateDict = {}
    unmapped: list[str] = []
    for key, value in state_dict.items():
        if key.startswith("target_generator.tokenizer."):
            clip[key[len("target_generator.tokenizer.") :]] = value
        elif (new := _rename(key, _MMPRETRAIN_ENCODER)) is not None:
            encoder[new] = value
        elif (new := _rename(key, _MMPRETRAIN_DECODER)) is not None:
            decoder[new] = value
        else:
            unmapped.append(key)
    return encoder, decoder, clip, unmapped


def openai_clip_to_timm(state_dict: StateDict) -> StateDict:
    """OpenAI CLIP image-tower keys (``visual.conv1.weight`` ...) -> timm ``VisionTransformer`` keys.

    Uses timm's own conversion (the one behind ``vit_base_patch16_clip_224.openai``): ``proj`` becomes
    ``head.weight`` (transposed) with a zero ``head.bias``; text-tower keys are dropped.
    """
    from timm.models.vision_transformer import _convert_openai_clip

    return _convert_openai_clip(state_dict, None)  # type: ignore[arg-type]


def hf_clip_to_timm(state_dict: StateDict) -> StateDict:
    """Hugging Face transformers CLIP image tower -> timm ``VisionTransformer`` keys (like :func:`openai_clip_to_timm`).

    ``q_proj``/``k_proj``/``v_proj`` are concatenated into timm's fused ``qkv`` (rows [q; k; v]); ``pre_layrnorm``
    becomes ``norm_pre``, ``post_layernorm`` ``norm`` and ``visual_projection`` (no bias) ``head`` with a zero bias.
    Text-tower keys are dropped. (timm 1.0 converts OpenAI/OpenCLIP layouts but not transformers' CLIP one.)
    """
    out: StateDict = {}
    qkv: dict[str, dict[str, torch.Tensor]] = {}
    simple = [
        (r"^embeddings\.patch_embedding\.weight$", "patch_embed.proj.weight"),
        (r"^pre_layrnorm\.", "norm_pre."),
        (r"^post_layernorm\.", "norm."),
        (r"^encoder\.layers\.(\d+)\.self_attn\.out_proj\.", r"blocks.\1.attn.proj."),
        (r"^encoder\.layers\.(\d+)\.layer_norm1\.", r"blocks.\1.norm1."),
        (r"^encoder\.layers\.(\d+)\.layer_norm2\.", r"blocks.\1.norm2."),
        (r"^encoder\.layers\.(\d+)\.mlp\.fc([12])\.", r"blocks.\1.mlp.fc\2."),
    ]
    for key, value in state_dict.items():
        if key == "visual_projection.weight":  # (out, D), outside the vision_model prefix
            out["head.weight"] = value
            out["head.bias"] = torch.zeros(value.shape[0], dtype=value.dtype)
            continue
        if not key.startswith("vision_model."):
            continue
        k = key.removeprefix("vision_model.")
        if k == "embeddings.class_embedding":
            out["cls_token"] = value.reshape(1, 1, -1)
        elif k == "embeddings.position_embedding.weight":
            out["pos_embed"] = value.unsqueeze(0)
        elif k == "embeddings.position_ids":
            continue
        elif m := re.match(r"^encoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)$", k):
            qkv.setdefault(f"blocks.{m.group(1)}.attn.qkv.{m.group(3)}", {})[m.group(2)] = value
        elif (new := _rename(k, simple)) is not None:
            out[new] = value
        else:
            out[k] = value  # left as is: a strict load will name it
    return {**out, **_merge_qkv(qkv, ("q", "k", "v"), "HF CLIP")}


_MMPRETRAIN_CLASSIFIER = [
    (r"^backbone\.ln2\.", "fc_norm."),  # norm after average pooling (fine-tuning)
    (r"^neck\.bn\.", "head.bn."),  # ClsBatchNormNeck (linear probe)
    (r"^head\.layers\.head\.", "head.fc."),  # VisionTransformerClsHead (linear probe)
]


def mmpretrain_classifier_to_milan(state_dict: StateDict) -> tuple[str, StateDict, list[str]]:
    """An mmpretrain ``ImageClassifier`` (ViT backbone) -> (``"linear_probe"`` or ``"finetune"``, our keys, unmapped).

    Linear probe (:class:`~milan.models.classifier.LinearProbe`): ``backbone.ln1`` (final norm) -> ``encoder.norm``,
    ``neck.bn`` -> ``head.bn``, ``head.layers.head`` -> ``head.fc``. Fine-tuning
    (:class:`~milan.models.classifier.FinetuneClassifier`): ``backbone.ln2`` (after average pooling) -> ``fc_norm``,
    ``head.fc`` -> ``head``.
    """
    finetune = "backbone.ln2.weight" in state_dict or "head.fc.weight" in state_dict
    out: StateDict = {}
    unmapped: list[str] = []
    for key, value in state_dict.items():
        if key == "head.fc.weight" or key == "head.fc.bias":
            out["head." + key.split(".")[-1]] = value
        elif (new := _rename(key, _MMPRETRAIN_CLASSIFIER)) is not None:
            out[new] = value
        elif (new := _rename(key, _MMPRETRAIN_ENCODER)) is not None:
            out["encoder." + new] = value
        else:
            unmapped.append(key)
    return ("finetune" if finetune else "linear_probe"), out, unmapped


def milan_orig_to_milan(state_dict: StateDict) -> tuple[OrigKind, StateDict]:
    """Original MILAN / MAE checkpoints (``{'model': ...}`` with timm-0.3.2 key names) -> ours.

    Pretraining models (``blocks.N``, ``norm``, ``decoder_*``, ``mask_token``) become a MILAN student
    (``student.encoder.*`` / ``student.decoder.*``: the decoder names are already ours). Fine-tuned models
    (``fc_norm`` + ``head``, no ``norm``) become a :class:`~milan.models.classifier.FinetuneClassifier`, and MAE
    linear-probe models (``head.0`` BatchNorm + ``head.1`` Linear) a :class:`~milan.models.classifier.LinearProbe`.

    Returns:
        (kind, state_dict).
    """
    if any(k.startswith("decoder_") for k in state_dict):
        out = {
            ("student.decoder." if k.startswith("decoder_") or k == "mask_token" else "student.encoder.") + k: v
            for k, v in state_dict.items()
        }
        return "milan", out
    if "head.0.running_mean" in state_dict:
        rename = {"head.0.": "head.bn.", "head.1.": "head.fc."}
        out = {}
        for k, v in state_dict.items():
            prefix = next((p for p in rename if k.startswith(p)), None)
            out[rename[prefix] + k[len(prefix) :] if prefix else "encoder." + k] = v
        return "linear_probe", out
    if "fc_norm.weight" in state_dict:
        out = {(k if k.startswith(("fc_norm.", "head.")) else "encoder." + k): v for k, v in state_dict.items()}
        return "finetune", out
    return "encoder", dict(state_dict)


# Our encoder <-> Hugging Face ``ViTModel`` (the fused qkv is split/merged separately): (ours, HF) name templates;
# ``{}`` is a block index, a name ending in ``.`` a prefix, any other name a whole key.
_HF_VIT = [
    ("cls_token", "embeddings.cls_token"),
    ("pos_embed", "embeddings.position_embeddings"),
    ("patch_embed.proj.", "embeddings.patch_embeddings.projection."),
    ("blocks.{}.norm1.", "encoder.layer.{}.layernorm_before."),
    ("blocks.{}.norm2.", "encoder.layer.{}.layernorm_after."),
    ("blocks.{}.attn.proj.", "encoder.layer.{}.attention.output.dense."),
    ("blocks.{}.mlp.fc1.", "encoder.layer.{}.intermediate.dense."),
    ("blocks.{}.mlp.fc2.", "encoder.layer.{}.output.dense."),
    ("norm.", "layernorm."),
]


def _template_rules(pairs: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """:func:`_rename` rules from ``(src, dst)`` name templates."""

    def pattern(name: str) -> str:
        return "^" + re.escape(name).replace(r"\{\}", r"(\d+)") + ("" if name.endswith(".") else "$")

    return [(pattern(src), dst.replace("{}", r"\1")) for src, dst in pairs]


def encoder_to_hf_vit(state_dict: StateDict) -> StateDict:
    """Our encoder (timm ``VisionTransformer`` keys, with its final ``norm``) -> Hugging Face ``ViTModel`` keys.

    The fused ``qkv`` splits into ``query``/``key``/``value``; the final ``norm`` is ``ViTModel.layernorm`` (applied
    to every token of ``last_hidden_state``). No pooler is written (load with ``add_pooling_layer=False``).
    """
    rules = _template_rules(_HF_VIT)
    out: StateDict = {}
    for key, value in state_dict.items():
        if m := re.match(r"^blocks\.(\d+)\.attn\.qkv\.(weight|bias)$", key):
            q, k, v = value.chunk(3, dim=0)
            base = f"encoder.layer.{m.group(1)}.attention.attention."
            out[base + "query." + m.group(2)] = q
            out[base + "key." + m.group(2)] = k
            out[base + "value." + m.group(2)] = v
        elif (new := _rename(key, rules)) is not None:
            out[new] = value
        else:
            raise ValueError(f"no Hugging Face ViT name for encoder key {key!r}")
    return out


def hf_vit_to_encoder(state_dict: StateDict) -> StateDict:
    """Hugging Face ``ViTModel`` weights (on-disk names, as :func:`encoder_to_hf_vit` writes) -> our encoder keys."""
    rules = _template_rules([(b, a) for a, b in _HF_VIT])
    out: StateDict = {}
    qkv: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state_dict.items():
        k = key.removeprefix("vit.")
        if m := re.match(r"^encoder\.layer\.(\d+)\.attention\.attention\.(query|key|value)\.(weight|bias)$", k):
            qkv.setdefault(f"blocks.{m.group(1)}.attn.qkv.{m.group(3)}", {})[m.group(2)] = value
        elif (new := _rename(k, rules)) is not None:
            out[new] = value
        else:
            out[k] = value  # e.g. pooler.*: left as is, a strict load names it
    return {**out, **_merge_qkv(qkv, ("query", "key", "value"), "HF ViT")}


# ----------------------------------------------------------------------------------------------------------------
# Teacher towers

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
    act: Act | None = None,
    norm_eps: float | None = None,
    num_heads: int | None = None,
    img_size: int | None = None,
) -> tuple[StateDict, TowerSpec, list[str]]:
    """An OpenAI-layout CLIP image tower (``visual.conv1.weight`` ...) -> timm keys and spec (QuickGELU, eps 1e-5).

    Returns:
        (timm_state_dict, spec, dropped_keys): the dropped keys are the text tower's and other non-``visual.`` keys.
    """
    required = ["conv1.weight", "positional_embedding", "class_embedding", "ln_post.weight"]
    missing = ["visual." + k for k in required if "visual." + k not in sd]
    if missing:
        raise CheckpointError(f"not an OpenAI-layout CLIP image tower: missing keys {missing}")
    converted = openai_clip_to_timm(sd)
    if "visual.proj" not in sd:  # towers exported without the projection: features are the LN'd tokens
        converted.pop("head.weight", None)
        converted.pop("head.bias", None)
    spec = infer_tower(
        converted,
        act=act or "quick_gelu",
        norm_eps=norm_eps if norm_eps is not None else 1e-5,
        num_heads=num_heads,
        img_size=img_size,
    )
    return converted, spec, [k for k in sd if not k.startswith("visual.")]


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
    """An OpenCLIP checkpoint's image tower -> (timm keys, spec, dropped keys).

    Native OpenCLIP towers use OpenAI's key names; timm-backed towers (``visual.trunk.*``) are timm models already
    (their ``visual.head.proj`` becomes the head). ``config`` is ``open_clip_config.json`` when it sits next to the
    weights: its ``quick_gelu``, ``vision_cfg.norm_kwargs.eps``, ``head_width`` and ``timm_model_name`` are the
    defaults of ``act``, ``norm_eps``, ``num_heads`` and ``model_name``.
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
    """A Hugging Face transformers ``CLIPModel`` / ``CLIPVisionModel(WithProjection)`` -> (timm keys, spec, dropped).

    ``config`` is its ``config.json`` (a ``CLIPConfig`` with ``vision_config``, or a ``CLIPVisionConfig``); missing
    values take transformers' CLIP defaults (``quick_gelu``, eps 1e-5).
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
