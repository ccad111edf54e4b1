"""Pure key mappings between checkpoint layouts (no I/O).

Our layouts: the student encoder uses timm ``VisionTransformer`` keys, the decoder the original MILAN/MAE keys,
and the teacher timm keys under ``model.`` (``MILAN`` prefixes them ``student.encoder.``, ``student.decoder.``
and ``teacher.model.``).
"""

from __future__ import annotations

import re

import torch

StateDict = dict[str, torch.Tensor]


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


def _rename(key: str, rules: list[tuple[str, str]]) -> str | None:
    for pattern, repl in rules:
        new, n = re.subn(pattern, repl, key)
        if n:
            return new
    return None


def mmpretrain_milan_to_milan(state_dict: StateDict) -> tuple[StateDict, StateDict, StateDict, list[str]]:
    """Splits an mmpretrain/MMSelfSup MILAN ``state_dict`` into our encoder, decoder and teacher dicts.

    Args:
        state_dict: Keys ``backbone.*``, ``neck.*`` and optionally ``target_generator.tokenizer.*``
            (the whole OpenAI-layout CLIP).

    Returns:
        (encoder, decoder, openai_clip, unmapped_keys): the teacher dict keeps OpenAI key names (``visual.*``
        and the unused text tower) for :func:`openai_clip_to_timm`.
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


def openai_clip_to_timm(state_dict: StateDict, prefix: str = "visual.") -> StateDict:
    """OpenAI CLIP image-tower keys (``visual.conv1.weight`` ...) -> timm ``VisionTransformer`` keys.

    Uses timm's own conversion (the one behind ``vit_base_patch16_clip_224.openai``): ``proj`` becomes
    ``head.weight`` (transposed) with a zero ``head.bias``; text-tower keys are dropped.

    Args:
        state_dict: OpenAI-layout state dict.
        prefix: Prefix of the image tower's keys.

    Returns:
        timm-layout state dict.
    """
    from timm.models.vision_transformer import _convert_openai_clip

    return _convert_openai_clip(state_dict, None, prefix=prefix)  # type: ignore[arg-type]


def hf_clip_to_timm(state_dict: StateDict, prefix: str = "vision_model.") -> StateDict:
    """Hugging Face transformers CLIP image tower -> timm ``VisionTransformer`` keys (like :func:`openai_clip_to_timm`).

    ``q_proj``/``k_proj``/``v_proj`` are concatenated into timm's fused ``qkv`` (rows [q; k; v]); ``pre_layrnorm``
    becomes ``norm_pre``, ``post_layernorm`` ``norm`` and ``visual_projection`` (no bias) ``head`` with a zero bias.
    Text-tower keys are dropped. (timm 1.0 converts OpenAI/OpenCLIP layouts but not transformers' CLIP one.)

    Args:
        state_dict: ``CLIPModel`` / ``CLIPVisionModel(WithProjection)`` weights.
        prefix: Prefix of the vision tower's keys.

    Returns:
        timm-layout state dict.
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
        if not key.startswith(prefix):
            continue
        k = key[len(prefix) :]
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
    for key, parts in qkv.items():
        if set(parts) != {"q", "k", "v"}:
            raise ValueError(f"HF CLIP attention {key}: missing {sorted({'q', 'k', 'v'} - set(parts))} projections")
        out[key] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    return out


_MMPRETRAIN_CLASSIFIER = [
    (r"^backbone\.ln2\.", "fc_norm."),  # norm after average pooling (fine-tuning)
    (r"^neck\.bn\.", "head.bn."),  # ClsBatchNormNeck (linear probe)
    (r"^head\.layers\.head\.", "head.fc."),  # VisionTransformerClsHead (linear probe)
]


def mmpretrain_classifier_to_milan(state_dict: StateDict) -> tuple[str, StateDict, list[str]]:
    """Maps an mmpretrain ``ImageClassifier`` (ViT backbone) onto our classifier keys.

    Targets :class:`~milan.models.classifier.LinearProbe` or :class:`~milan.models.classifier.FinetuneClassifier`.

    Linear probe: ``backbone.ln1`` (final norm) -> ``encoder.norm``, ``neck.bn`` -> ``head.bn``,
    ``head.layers.head`` -> ``head.fc``. Fine-tuning: ``backbone.ln2`` (after average pooling) -> ``fc_norm``,
    ``head.fc`` -> ``head``.

    Returns:
        (kind, state_dict, unmapped_keys) with kind ``"linear_probe"`` or ``"finetune"``.
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


def milan_orig_to_milan(state_dict: StateDict) -> tuple[str, StateDict, list[str]]:
    """Original MILAN / MAE checkpoints (``{'model': ...}`` with timm-0.3.2 key names) -> ours.

    Pretraining models (``blocks.N``, ``norm``, ``decoder_*``, ``mask_token``) become a MILAN student
    (``student.encoder.*`` / ``student.decoder.*``: the decoder names are already ours). Fine-tuned models
    (``fc_norm`` + ``head``, no ``norm``) become a :class:`~milan.models.classifier.FinetuneClassifier`, and MAE
    linear-probe models (``head.0`` BatchNorm + ``head.1`` Linear) a :class:`~milan.models.classifier.LinearProbe`.

    Returns:
        (kind, state_dict, unmapped_keys) with kind ``"milan"``, ``"finetune"``, ``"linear_probe"`` or ``"encoder"``.
    """
    if any(k.startswith("decoder_") for k in state_dict):
        out = {
            ("student.decoder." if k.startswith("decoder_") or k == "mask_token" else "student.encoder.") + k: v
            for k, v in state_dict.items()
        }
        return "milan", out, []
    if "head.0.running_mean" in state_dict:
        rename = {"head.0.": "head.bn.", "head.1.": "head.fc."}
        out = {}
        for k, v in state_dict.items():
            prefix = next((p for p in rename if k.startswith(p)), None)
            out[rename[prefix] + k[len(prefix) :] if prefix else "encoder." + k] = v
        return "linear_probe", out, []
    if "fc_norm.weight" in state_dict:
        out = {(k if k.startswith(("fc_norm.", "head.")) else "encoder." + k): v for k, v in state_dict.items()}
        return "finetune", out, []
    return "encoder", dict(state_dict), []


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


def _both_ways(pairs: list[tuple[str, str]], reverse: bool = False) -> list[tuple[str, str]]:
    """:func:`_rename` rules from ``(a, b)`` name templates: ``a -> b``, or ``b -> a`` with ``reverse``."""

    def pattern(name: str) -> str:
        return "^" + re.escape(name).replace(r"\{\}", r"(\d+)") + ("" if name.endswith(".") else "$")

    if reverse:
        pairs = [(b, a) for a, b in pairs]
    return [(pattern(src), dst.replace("{}", r"\1")) for src, dst in pairs]


def encoder_to_hf_vit(state_dict: StateDict) -> StateDict:
    """Our encoder (timm ``VisionTransformer`` keys, with its final ``norm``) -> Hugging Face ``ViTModel`` keys.

    The fused ``qkv`` splits into ``query``/``key``/``value``; the final ``norm`` is ``ViTModel.layernorm`` (applied
    to every token of ``last_hidden_state``). No pooler is written (load with ``add_pooling_layer=False``).
    """
    rules = _both_ways(_HF_VIT)
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
    rules = _both_ways(_HF_VIT, reverse=True)
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
    for key, parts in qkv.items():
        if set(parts) != {"query", "key", "value"}:
            raise ValueError(f"HF ViT attention {key}: missing {sorted({'query', 'key', 'value'} - set(parts))}")
        out[key] = torch.cat([parts["query"], parts["key"], parts["value"]], dim=0)
    return out
