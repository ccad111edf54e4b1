"""The encoder an evaluation job starts from: a checkpoint of any supported format, or a random baseline."""

from __future__ import annotations

import dataclasses

from milan.checkpoint.formats import read_checkpoint, resolve_spec
from milan.checkpoint.io import CheckpointError
from milan.checkpoint.loaders import encoder_from_checkpoint
from milan.models.factory import build_encoder, list_models, model_config
from milan.models.vit import VisionTransformer
from milan.train.config import ConfigError, EncoderSource

_ENCODER_KINDS = ("milan", "encoder", "linear_probe", "finetune")


def load_pretrained_encoder(src: EncoderSource, *, drop_path_rate: float = 0.0) -> tuple[VisionTransformer, str]:
    """Builds the encoder named by ``src`` and loads its weights (strictly, stored position table included).

    The architecture comes from the checkpoint's model spec, else is inferred from its weights (heads from
    ``src.num_heads``, or assumed: the description then says so and names the key), so any
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
    resolved = resolve_spec(ck, heads_flag="encoder.num_heads=N")
    resolved.adopt(ck)  # an assumed head count is reported in the description below
    encoder = encoder_from_checkpoint(ck, drop_path_rate=drop_path_rate)
    kind = ck.kind.replace("_", " ")
    desc = (
        f"{src.pretrained} ({kind} checkpoint, {ck.format} format): ViT {encoder.embed_dim}d x {len(encoder.blocks)} "
        f"blocks, {encoder.num_heads} heads, patch {encoder.patch_size}, {input_size(None, encoder)} px"
    )
    assumed = resolved.assumed.get("encoder_heads")
    return encoder, desc + (f"; WARNING {assumed}" if assumed else "")


def input_size(requested: int | None, encoder: VisionTransformer) -> int:
    """The training/eval resolution: the encoder's (its fixed position table allows no other)."""
    size = int(encoder.patch_embed.img_size[0])
    if requested is not None and requested != size:
        raise ConfigError(f"data.img_size={requested} but the encoder takes {size} px images; leave it null")
    return size
