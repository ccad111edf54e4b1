"""Pure key mappings between checkpoint layouts (no I/O).

Our layouts: the student encoder uses timm ``VisionTransformer`` keys, the decoder the original MILAN/MAE keys,
and the teacher timm keys under ``model.`` (``MILAN`` prefixes them ``student.encoder.``, ``student.decoder.``
and ``teacher.model.``).
"""

from __future__ import annotations

import re

import torch

StateDict = dict[str, torch.Tensor]

# mmpretrain / MMSelfSup MILAN (backbone = MILANViT, neck = MILANPretrainDecoder) -> ours.
_MMPRETRAIN_ENCODER = [
    (r"^backbone\.patch_embed\.projection\.", "patch_embed.proj."),
    (r"^backbone\.layers\.(\d+)\.ln1\.", r"blocks.\1.norm1."),
    (r"^backbone\.layers\.(\d+)\.ln2\.", r"blocks.\1.norm2."),
    (r"^backbone\.layers\.(\d+)\.attn\.", r"blocks.\1.attn."),
    (r"^backbone\.layers\.(\d+)\.ffn\.layers\.0\.0\.", r"blocks.\1.mlp.fc1."),
    (r"^backbone\.layers\.(\d+)\.ffn\.layers\.1\.", r"blocks.\1.mlp.fc2."),
    (r"^backbone\.ln1\.", "norm."),
    (r"^backbone\.(cls_token|pos_embed)$", r"\1"),
]
_MMPRETRAIN_DECODER = [
    (r"^neck\.decoder_blocks\.(\d+)\.ln1\.", r"decoder_blocks.\1.norm1."),
    (r"^neck\.decoder_blocks\.(\d+)\.ln2\.", r"decoder_blocks.\1.norm2."),
    (r"^neck\.decoder_blocks\.(\d+)\.attn\.", r"decoder_blocks.\1.attn."),
    (r"^neck\.decoder_blocks\.(\d+)\.ffn\.layers\.0\.0\.", r"decoder_blocks.\1.mlp.fc1."),
    (r"^neck\.decoder_blocks\.(\d+)\.ffn\.layers\.1\.", r"decoder_blocks.\1.mlp.fc2."),
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
