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

import functools
import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Literal, TypedDict

import torch

from milan.checkpoint.spec import infer_tower
from milan.errors import CheckpointError
from milan.models.tower import Act, StateDict, TowerSpec

if TYPE_CHECKING:
    from typing import Unpack  # Python 3.11 (annotations only)

OrigKind = Literal["milan", "finetune", "linear_probe", "encoder"]
# Renaming rules: (source, destination) name templates, the first that matches a key applies. ``{}`` is a block
# index and a ``*`` the rest of the key; a name with neither is a whole key. An empty destination drops the key.
Rules = list[tuple[str, str]]


@functools.cache
def _pattern(template: str) -> re.Pattern[str]:
    return re.compile("^" + re.escape(template).replace(r"\{\}", r"(\d+)").replace(r"\*", "(.*)") + "$")


def _rename(key: str, rules: Rules) -> str | None:
    for src, dst in rules:
        if m := _pattern(src).match(key):
            parts = iter(m.groups())
            return "".join(next(parts) if t in ("{}", "*") else t for t in re.split(r"(\{\}|\*)", dst))
    return None


def _convert(state_dict: StateDict, rules: Rules) -> tuple[StateDict, list[str]]:
    """Every key renamed by ``rules`` -> (renamed state dict, the keys no rule matches)."""
    out: StateDict = {}
    unmapped: list[str] = []
    for key, value in state_dict.items():
        if not (new := _rename(key, rules)):
            unmapped.append(key)
        else:
            out[new] = value
    return out, unmapped


def _fuse_qkv(state_dict: StateDict) -> StateDict:
    """Separate ``attn.q``, ``attn.k``, ``attn.v`` projections -> timm's fused ``attn.qkv`` (rows [q; k; v])."""
    out: StateDict = {}
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state_dict.items():
        if m := re.match(r"^(.*\.attn\.)([qkv])(\..*)$", key):
            parts.setdefault(f"{m[1]}qkv{m[3]}", {})[m[2]] = value
        else:
            out[key] = value
    for key, part in parts.items():
        if len(part) != 3:
            raise ValueError(f"attention {key}: missing {sorted(set('qkv') - set(part))}")
        out[key] = torch.cat([part[n] for n in "qkv"], dim=0)
    return out


def _mmcv_blocks(src: str, dst: str) -> Rules:
    """Rules from mmcv transformer layers (``{src}N.ln1``, ``.attn``, ``.ffn``) to timm blocks (``{dst}N.norm1``)."""
    names = {"ln1": "norm1", "ln2": "norm2", "attn": "attn", "ffn.layers.0.0": "mlp.fc1", "ffn.layers.1": "mlp.fc2"}
    return [(f"{src}{{}}.{a}.*", f"{dst}{{}}.{b}.*") for a, b in names.items()]


# mmpretrain / MMSelfSup MILAN (backbone = MILANViT, neck = MILANPretrainDecoder) -> ours.
_MMPRETRAIN_ENCODER = [
    ("backbone.patch_embed.projection.*", "patch_embed.proj.*"),
    *_mmcv_blocks("backbone.layers.", "blocks."),
    ("backbone.ln1.*", "norm.*"),
    ("backbone.cls_token", "cls_token"),
    ("backbone.pos_embed", "pos_embed"),
]
_MMPRETRAIN_MILAN = [
    ("target_generator.tokenizer.*", "clip.*"),
    *[(src, "encoder." + dst) for src, dst in _MMPRETRAIN_ENCODER],
    *_mmcv_blocks("neck.decoder_blocks.", "decoder.decoder_blocks."),
    ("neck.ln1.*", "decoder.decoder_norm.*"),
    *[
        (f"neck.{name}", f"decoder.{name}")
        for name in ("mask_token", "decoder_pos_embed", "decoder_embed.*", "decoder_pred.*")
    ],
]
# An mmpretrain ImageClassifier (ViT backbone) -> our LinearProbe or FinetuneClassifier.
_MMPRETRAIN_CLASSIFIER = [
    ("backbone.ln2.*", "fc_norm.*"),  # norm after average pooling (fine-tuning)
    ("neck.bn.*", "head.bn.*"),  # ClsBatchNormNeck (linear probe)
    ("head.layers.head.*", "head.fc.*"),  # VisionTransformerClsHead (linear probe)
    ("head.fc.*", "head.*"),  # LinearClsHead (fine-tuning)
    *[(src, "encoder." + dst) for src, dst in _MMPRETRAIN_ENCODER],
]
# Original MILAN / MAE (timm-0.3.2 names): (kind, a key prefix that marks it, rules). Pretraining models become a
# MILAN student (the decoder names are already ours), MAE linear probes (``head.0`` BatchNorm + ``head.1`` Linear) a
# LinearProbe, fine-tuned models (``fc_norm`` + ``head``, no ``norm``) a FinetuneClassifier.
_MILAN_ORIG: list[tuple[OrigKind, str, Rules]] = [
    (
        "milan",
        "decoder_",
        [
            ("decoder_*", "student.decoder.decoder_*"),
            ("mask_token", "student.decoder.mask_token"),
            ("*", "student.encoder.*"),
        ],
    ),
    ("linear_probe", "head.0.running_mean", [("head.0.*", "head.bn.*"), ("head.1.*", "head.fc.*"), ("*", "encoder.*")]),
    ("finetune", "fc_norm.weight", [("fc_norm.*", "fc_norm.*"), ("head.*", "head.*"), ("*", "encoder.*")]),
    ("encoder", "", [("*", "*")]),
]
# Hugging Face transformers CLIP image tower -> timm keys (the text tower has no rule: it is dropped).
_HF_CLIP = [
    ("visual_projection.weight", "head.weight"),  # (out, D), outside the vision_model prefix
    ("vision_model.embeddings.patch_embedding.weight", "patch_embed.proj.weight"),
    ("vision_model.embeddings.class_embedding", "cls_token"),
    ("vision_model.embeddings.position_embedding.weight", "pos_embed"),
    ("vision_model.embeddings.position_ids", ""),  # dropped (an empty name drops a key)
    ("vision_model.pre_layrnorm.*", "norm_pre.*"),
    ("vision_model.post_layernorm.*", "norm.*"),
    *[(f"vision_model.encoder.layers.{{}}.self_attn.{n}_proj.*", f"blocks.{{}}.attn.{n}.*") for n in "qkv"],
    ("vision_model.encoder.layers.{}.self_attn.out_proj.*", "blocks.{}.attn.proj.*"),
    ("vision_model.encoder.layers.{}.layer_norm1.*", "blocks.{}.norm1.*"),
    ("vision_model.encoder.layers.{}.layer_norm2.*", "blocks.{}.norm2.*"),
    ("vision_model.encoder.layers.{}.mlp.*", "blocks.{}.mlp.*"),
    ("vision_model.*", "*"),  # left as is: a strict load will name it
]
# Our encoder -> Hugging Face ``ViTModel`` (on-disk names; the fused qkv is split into query / key / value first).
_HF_VIT = [
    ("cls_token", "embeddings.cls_token"),
    ("pos_embed", "embeddings.position_embeddings"),
    ("patch_embed.proj.*", "embeddings.patch_embeddings.projection.*"),
    ("blocks.{}.norm1.*", "encoder.layer.{}.layernorm_before.*"),
    ("blocks.{}.norm2.*", "encoder.layer.{}.layernorm_after.*"),
    ("blocks.{}.attn.q.*", "encoder.layer.{}.attention.attention.query.*"),
    ("blocks.{}.attn.k.*", "encoder.layer.{}.attention.attention.key.*"),
    ("blocks.{}.attn.v.*", "encoder.layer.{}.attention.attention.value.*"),
    ("blocks.{}.attn.proj.*", "encoder.layer.{}.attention.output.dense.*"),
    ("blocks.{}.mlp.fc1.*", "encoder.layer.{}.intermediate.dense.*"),
    ("blocks.{}.mlp.fc2.*", "encoder.layer.{}.output.dense.*"),
    ("norm.*", "layernorm.*"),
]


def _part(state_dict: StateDict, prefix: str) -> StateDict:
    return {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}


def mmpretrain_milan_to_milan(state_dict: StateDict) -> tuple[StateDict, StateDict, StateDict, list[str]]:
    """An mmpretrain/MMSelfSup MILAN state dict -> (encoder, decoder, openai_clip, unmapped keys).

    The CLIP under ``target_generator.tokenizer.`` keeps OpenAI key names (``visual.*`` and the unused text tower)
    for :func:`openai_tower`.
    """
    out, unmapped = _convert(state_dict, _MMPRETRAIN_MILAN)
    return _part(out, "encoder."), _part(out, "decoder."), _part(out, "clip."), unmapped


def openai_clip_to_timm(state_dict: StateDict) -> StateDict:
    """OpenAI CLIP image-tower keys (``visual.conv1.weight`` ...) -> timm ``VisionTransformer`` keys.

    Uses timm's own conversion (the one behind ``vit_base_patch16_clip_224.openai``): ``proj`` becomes
    ``head.weight`` (transposed) with a zero ``head.bias``; text-tower keys are dropped.
    """
    from timm.models.vision_transformer import _convert_openai_clip

    return _convert_openai_clip(state_dict, None)  # type: ignore[arg-type]


def mmpretrain_classifier_to_milan(state_dict: StateDict) -> tuple[str, StateDict, list[str]]:
    """An mmpretrain ``ImageClassifier`` (ViT backbone) -> (``linear_probe`` or ``finetune``, our keys, unmapped)."""
    finetune = "backbone.ln2.weight" in state_dict or "head.fc.weight" in state_dict
    return ("finetune" if finetune else "linear_probe"), *_convert(state_dict, _MMPRETRAIN_CLASSIFIER)


def milan_orig_to_milan(state_dict: StateDict) -> tuple[OrigKind, StateDict]:
    """Original MILAN / MAE checkpoints (``{'model': ...}`` with timm-0.3.2 key names) -> (kind, our keys)."""
    kind, rules = next(
        (kind, rules) for kind, mark, rules in _MILAN_ORIG if not mark or any(k.startswith(mark) for k in state_dict)
    )
    return kind, _convert(state_dict, rules)[0]


def encoder_to_hf_vit(state_dict: StateDict) -> StateDict:
    """Our encoder (timm ``VisionTransformer`` keys, with its final ``norm``) -> Hugging Face ``ViTModel`` keys.

    The final ``norm`` is ``ViTModel.layernorm`` (applied to every token of ``last_hidden_state``). No pooler is
    written (load with ``add_pooling_layer=False``).
    """
    split: StateDict = {}
    for key, value in state_dict.items():
        if m := re.match(r"^(.*\.attn\.)qkv(\..*)$", key):
            split.update({f"{m[1]}{n}{m[2]}": part for n, part in zip("qkv", value.chunk(3, dim=0), strict=True)})
        else:
            split[key] = value
    out, unmapped = _convert(split, _HF_VIT)
    if unmapped:
        raise ValueError(f"no Hugging Face ViT name for encoder key {unmapped[0]!r}")
    return out


def hf_vit_to_encoder(state_dict: StateDict) -> tuple[StateDict, list[str]]:
    """Hugging Face ``ViTModel`` weights (on-disk names, as :func:`encoder_to_hf_vit` writes) -> our encoder keys.

    Returns:
        (our keys, the pooler's and classifier's keys, dropped); other keys are left as they are: a strict load names
        them.
    """
    rules = [(hf, ours) for ours, hf in _HF_VIT] + [("pooler.*", ""), ("classifier.*", ""), ("*", "*")]
    out, dropped = _convert({k.removeprefix("vit."): v for k, v in state_dict.items()}, rules)
    return _fuse_qkv(out), dropped


# ----------------------------------------------------------------------------------------------------------------
# Teacher towers

_HF_ACTS: dict[str, Act] = {
    "quick_gelu": "quick_gelu",
    "gelu": "gelu",
    "gelu_new": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_fast": "gelu_tanh",
}


class TowerOptions(TypedDict, total=False):
    """What a tower's weights do not record, given by the caller (``None``: the format's default).

    ``img_size`` runs the tower at another resolution than its stored position table's (resampled when it is built).
    """

    act: Act | None
    norm_eps: float | None
    num_heads: int | None
    img_size: int | None


def _given(options: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in options.items() if v is not None}


def openai_tower(sd: StateDict, **options: Unpack[TowerOptions]) -> tuple[StateDict, TowerSpec, list[str]]:
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
        converted = {k: v for k, v in converted.items() if not k.startswith("head.")}
    spec = infer_tower(converted, **{"act": "quick_gelu", "norm_eps": 1e-5, **_given(options)})
    return converted, spec, [k for k in sd if not k.startswith("visual.")]


def open_clip_tower(
    sd: StateDict,
    config: dict[str, Any] | None = None,
    *,
    model_name: str | None = None,
    **options: Unpack[TowerOptions],
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
        trunk, dropped = _convert(sd, [("visual.trunk.*", "*"), ("visual.head.proj.*", "head.*")])
        if "visual.head.proj.weight" in sd:  # the projection is the head, whatever the key order of the file
            trunk["head.weight"] = w = sd["visual.head.proj.weight"]
            trunk["head.bias"] = sd.get("visual.head.proj.bias", torch.zeros_like(w[:, 0]))
        timm_sd, spec = timm_tower(trunk, model_name=model_name or vision.get("timm_model_name"), **options)
        return timm_sd, spec, dropped
    defaults: dict[str, Any] = {
        "act": "quick_gelu" if model_cfg.get("quick_gelu") else "gelu",
        "norm_eps": float((vision.get("norm_kwargs") or {}).get("eps", 1e-5)),
    }
    if "head_width" in vision and "visual.conv1.weight" in sd:
        defaults["num_heads"] = max(1, int(sd["visual.conv1.weight"].shape[0]) // int(vision["head_width"]))
    return openai_tower(sd, **{**defaults, **_given(options)})


def hf_clip_tower(
    sd: StateDict, config: dict[str, Any] | None = None, **options: Unpack[TowerOptions]
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
    if options.get("act") is None and hidden_act not in _HF_ACTS:
        raise CheckpointError(f"HF CLIP hidden_act {hidden_act!r} is not supported (known: {sorted(_HF_ACTS)})")
    # timm 1.0 converts OpenAI/OpenCLIP layouts but not transformers' CLIP one: q/k/v are fused into timm's qkv,
    # the bias-free visual_projection becomes a head with a zero bias; the text tower and position ids are dropped.
    converted, dropped = _convert(sd, _HF_CLIP)
    converted["cls_token"] = converted["cls_token"].reshape(1, 1, -1)
    if "pos_embed" in converted:
        converted["pos_embed"] = converted["pos_embed"].unsqueeze(0)
    if "head.weight" in converted:
        converted["head.bias"] = torch.zeros_like(converted["head.weight"][:, 0])
    converted = _fuse_qkv(converted)
    defaults = {
        "act": _HF_ACTS.get(hidden_act),
        "norm_eps": float(vision.get("layer_norm_eps", 1e-5)),
        "num_heads": vision.get("num_attention_heads"),
    }
    return converted, infer_tower(converted, **{**defaults, **_given(options)}), dropped


def timm_tower(
    sd: StateDict, *, model_name: str | None = None, head: bool = True, **options: Unpack[TowerOptions]
) -> tuple[StateDict, TowerSpec]:
    """A timm ``VisionTransformer`` checkpoint (bring your own teacher: DINOv2, MAE, DeiT, CLIP in timm layout ...).

    Args:
        sd: timm keys; DINOv2's original layout (``mask_token``, ``register_tokens``) is converted by timm's rules.
        model_name: A timm model name; the tower is then built by ``timm.create_model`` (its activation, norm and
            heads) and the weights pass through timm's own ``checkpoint_filter_fn``. Without it the architecture is
            inferred from the shapes, as the module's table says.
        head: Keep a Linear ``head`` as the per-token projection (output width = head width). ``False`` drops it
            (output width = embed_dim): use that for classifier heads.
        **options: Overrides (:class:`TowerOptions`; ``act``, ``norm_eps`` and ``num_heads`` of inferred
            architectures only).

    Returns:
        (timm_state_dict, spec).
    """
    if "mask_token" in sd and "blocks.0.ls1.gamma" in sd:  # facebookresearch/dinov2 layout
        from timm.models.vision_transformer import _convert_dinov2

        sd = _convert_dinov2(dict(sd), None)  # type: ignore[arg-type]
    if not head:
        sd = {k: v for k, v in sd.items() if not k.startswith("head.")}
    clip_like = model_name is None and "norm_pre.weight" in sd  # CLIP's ln_pre: timm's *_clip_* towers
    defaults = {"act": "quick_gelu" if clip_like else "gelu", "norm_eps": 1e-5 if clip_like else 1e-6}
    spec = infer_tower(sd, **{**defaults, **_given(options)})
    spec.timm_name = model_name
    return dict(sd), spec
