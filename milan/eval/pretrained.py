"""The encoder an evaluation job starts from: a checkpoint of any supported format, or a random baseline."""

from __future__ import annotations

import dataclasses

import torch.nn as nn

from milan.checkpoint.arch import load_strict
from milan.checkpoint.formats import read_checkpoint
from milan.checkpoint.io import CheckpointError
from milan.engine.config import ConfigError
from milan.eval.config import EncoderSource
from milan.models.factory import build_encoder, list_models, model_config
from milan.models.vit import VisionTransformer

_ENCODER_KINDS = ("milan", "encoder", "linear_probe", "finetune")


def load_pretrained_encoder(src: EncoderSource, *, drop_path_rate: float = 0.0) -> tuple[VisionTransformer, str]:
    """Builds the encoder named by ``src`` and loads its weights (strictly, stored position table included).

    The architecture is inferred from the checkpoint (heads from ``src.num_heads`` or the file's metadata), so any
    format :func:`milan.checkpoint.read_checkpoint` knows works: our ``milan pretrain`` checkpoints (the
    ``encoder.*`` part of the student), mmpretrain / MMSelfSup MILAN, original MILAN / MAE, timm ViTs, and
    classifier checkpoints (their encoder).

    Args:
        src: ``pretrained`` path, or ``model_name`` for a randomly initialised encoder.
        drop_path_rate: Stochastic depth of the built encoder (fine-tuning: 0.1 for ViT-B).

    Returns:
        ``(encoder, description)``; the description says where the weights came from.

    Raises:
        CheckpointError: Unreadable file, or one without a student encoder.
        ConfigError: Neither ``pretrained`` nor a known ``model_name``.
    """
    if src.pretrained is None:
        if src.model_name not in list_models():
            raise ConfigError(f"encoder.model_name: unknown variant {src.model_name!r}; choose one of {list_models()}")
        enc_cfg = dataclasses.replace(model_config(src.model_name).encoder, drop_path_rate=drop_path_rate)
        return build_encoder(enc_cfg), f"RANDOMLY initialised {src.model_name} encoder (no encoder.pretrained)"
    ck = read_checkpoint(src.pretrained, num_heads=src.num_heads)
    if ck.kind not in _ENCODER_KINDS:
        raise CheckpointError(f"{src.pretrained}: a {ck.format} {ck.kind} checkpoint holds no student encoder")
    arch = ck.encoder_arch()
    encoder = VisionTransformer(
        img_size=arch.img_size,
        patch_size=arch.patch_size,
        in_chans=arch.in_chans,
        embed_dim=arch.embed_dim,
        depth=arch.depth,
        num_heads=arch.num_heads,
        mlp_ratio=arch.mlp_ratio,
        qkv_bias=arch.qkv_bias,
        drop_path_rate=drop_path_rate,
        pos_embed_layout="mae" if arch.pos_embed_layout == "mae" else "mmpretrain",  # the stored table is loaded
    )
    if ck.kind == "finetune":  # fine-tuned encoders have no final norm
        encoder.norm = nn.Identity()  # type: ignore[assignment]
    load_strict(encoder, ck.encoder_state(), f"{src.pretrained}: student encoder")
    kind = ck.kind.replace("_", " ")
    desc = (
        f"{src.pretrained} ({kind} checkpoint, {ck.format} format): ViT {arch.embed_dim}d x {arch.depth} blocks, "
        f"{arch.num_heads} heads, patch {arch.patch_size}, {arch.img_size} px"
    )
    return encoder, desc
