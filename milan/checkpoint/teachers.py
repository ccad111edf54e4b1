"""Loading teachers from weights files; the architecture is inferred from the tensors' shapes."""

from __future__ import annotations

import os

import torch
from timm.models.vision_transformer import VisionTransformer as TimmVisionTransformer

from milan.checkpoint.io import CheckpointError, safe_load
from milan.checkpoint.keymaps import StateDict, openai_clip_to_timm
from milan.models.teacher import Teacher, TeacherInputNorm, clip_vision_tower


def _unwrap(obj: object) -> StateDict:
    """Finds the state dict inside common checkpoint wrappers."""
    if isinstance(obj, dict):
        for key in ("state_dict", "model", "module"):
            inner = obj.get(key)
            if isinstance(inner, dict) and inner and all(isinstance(v, torch.Tensor) for v in inner.values()):
                return inner
        tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
        if tensors:
            return tensors
    raise CheckpointError(f"no state dict of tensors found (got {type(obj).__name__})")


def openai_clip_tower(state_dict: StateDict, prefix: str = "visual.") -> TimmVisionTransformer:
    """Builds a timm CLIP image tower from an OpenAI-layout state dict, inferring its size, and loads it strictly.

    Args:
        state_dict: OpenAI key names (``visual.conv1.weight``, ``visual.transformer.resblocks.N...``,
            ``visual.proj``...); text-tower keys are ignored.
        prefix: Prefix of the image-tower keys.

    Returns:
        The loaded tower.
    """
    required = ["conv1.weight", "positional_embedding", "class_embedding", "proj", "ln_post.weight"]
    missing = [prefix + k for k in required if prefix + k not in state_dict]
    if missing:
        raise CheckpointError(f"not an OpenAI CLIP image tower: missing keys {missing}")
    conv = state_dict[prefix + "conv1.weight"]  # (width, 3, p, p)
    width, patch = int(conv.shape[0]), int(conv.shape[-1])
    depth = len({k.split(".")[3] for k in state_dict if k.startswith(prefix + "transformer.resblocks.")})
    grid = round((state_dict[prefix + "positional_embedding"].shape[0] - 1) ** 0.5)
    out_dim = int(state_dict[prefix + "proj"].shape[1])
    tower = clip_vision_tower(
        img_size=grid * patch, patch_size=patch, width=width, depth=depth, num_heads=width // 64, out_dim=out_dim
    )
    converted = openai_clip_to_timm(state_dict, prefix=prefix)
    result = tower.load_state_dict(converted, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise CheckpointError(
            f"CLIP tower keys do not match: missing {result.missing_keys}, unexpected {result.unexpected_keys}"
        )
    return tower


def load_teacher(path: str | os.PathLike[str], input_norm: TeacherInputNorm = "imagenet") -> Teacher:
    """Loads a frozen teacher from a local weights file.

    Supported here: a plain state dict with OpenAI CLIP key names (e.g. MMSelfSup's ``clip_vit_base_16.pth.tar``).

    Args:
        path: Weights file.
        input_norm: Teacher input normalisation (see :class:`milan.models.Teacher`).

    Returns:
        The teacher.
    """
    state_dict = _unwrap(safe_load(path))
    if "visual.conv1.weight" in state_dict:
        return Teacher(openai_clip_tower(state_dict), input_norm=input_norm)
    raise CheckpointError(f"{path}: unrecognised teacher format (first keys: {list(state_dict)[:5]})")
