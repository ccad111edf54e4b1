"""Builds OpenMMLab mmpretrain 1.2.0's MILAN (the reference) at any size, and runs its real ``MILAN.loss``.

Test-only: needs the ``parity`` extra. The CLIP checkpoint download is replaced by a random OpenAI-layout CLIP
state dict of the requested size; the decoder's ``embed_dim`` is set to the encoder width (the shipped
mmpretrain 1.2.0 config leaves it at 1024, which cannot run; see ../shared/reference/README.md).
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn as nn

from milan.checkpoint import mmpretrain_milan_to_milan, openai_clip_to_timm
from milan.models import MILAN
from milan.models.factory import ModelConfig, teacher_img_size


def _quiet() -> None:
    logging.getLogger("mmengine").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", module="mmcv")
    from mmengine.logging import MMLogger

    MMLogger.get_instance("mmengine", log_level="WARNING").setLevel(logging.WARNING)


def build_reference(cfg: ModelConfig, seed: int = 0) -> nn.Module:
    """mmpretrain MILAN with the dimensions of ``cfg`` (prompting decoder, CLIP-shaped teacher)."""
    _quiet()
    import mmpretrain.models.selfsup.milan as milan_mod
    from mmpretrain.models.utils.clip_generator_helper import CLIP
    from mmpretrain.registry import MODELS
    from mmpretrain.utils import register_all_modules

    register_all_modules()
    enc, dec, tch = cfg.encoder, cfg.decoder, cfg.teacher
    assert tch.num_heads == tch.width // 64, "mmpretrain's CLIP builder infers heads as width // 64"

    def clip_state_dict(*_a: Any, **_k: Any) -> dict[str, torch.Tensor]:
        clip = CLIP(
            embed_dim=tch.out_dim,
            image_resolution=teacher_img_size(tch, (enc.img_size // enc.patch_size,) * 2),  # null: follows the student
            vision_layers=tch.depth,
            vision_width=tch.width,
            vision_patch_size=tch.patch_size,
            context_length=8,
            vocab_size=64,
            transformer_width=64,
            transformer_heads=1,
            transformer_layers=1,
        )
        return clip.state_dict()

    num_patches = (enc.img_size // enc.patch_size) ** 2
    model_cfg = dict(
        type="MILAN",
        backbone=dict(
            type="MILANViT",
            arch=dict(
                embed_dims=enc.embed_dim,
                num_layers=enc.depth,
                num_heads=enc.num_heads,
                feedforward_channels=int(enc.embed_dim * enc.mlp_ratio),
            ),
            img_size=enc.img_size,
            patch_size=enc.patch_size,
            mask_ratio=cfg.mask_ratio,
        ),
        neck=dict(
            type="MILANPretrainDecoder",
            num_patches=num_patches,
            patch_size=enc.patch_size,
            embed_dim=enc.embed_dim,
            decoder_embed_dim=dec.embed_dim,
            decoder_depth=dec.depth,
            decoder_num_heads=dec.num_heads,
            predict_feature_dim=tch.out_dim,
            mlp_ratio=int(dec.mlp_ratio),
        ),
        head=dict(type="MIMHead", loss=dict(type="CosineSimilarityLoss", shift_factor=2.0, scale_factor=2.0)),
        target_generator=dict(type="CLIPGenerator", tokenizer_path="not-downloaded"),
    )
    torch.manual_seed(seed)
    original = milan_mod._load_checkpoint
    milan_mod._load_checkpoint = clip_state_dict
    try:
        model = MODELS.build(model_cfg)
    finally:
        milan_mod._load_checkpoint = original
    model.init_weights()
    model.train()
    return model


def load_reference_into(ours: MILAN, reference: nn.Module) -> None:
    """Copies every reference weight into our model (strict on both sides), keeping its pos-embeds."""
    enc, dec, clip, unmapped = mmpretrain_milan_to_milan(reference.state_dict())
    assert not unmapped, unmapped
    ours.encoder.load_state_dict(enc, strict=True)
    ours.decoder.load_state_dict(dec, strict=True)
    assert ours.teacher is not None
    ours.teacher.model.load_state_dict(openai_clip_to_timm(clip), strict=True)


@contextlib.contextmanager
def forced_multinomial(ids_shuffle: torch.Tensor) -> Iterator[None]:
    """Make ``torch.multinomial`` (used only by the reference's masking) return the given permutation."""
    real = torch.multinomial

    def fake(inp: torch.Tensor, num_samples: int, replacement: bool = False, *a: Any, **k: Any) -> torch.Tensor:
        assert tuple(ids_shuffle.shape) == (inp.shape[0], num_samples) and not replacement
        return ids_shuffle.to(inp.device)

    torch.multinomial = fake  # type: ignore[assignment]
    try:
        yield
    finally:
        torch.multinomial = real


def run_reference(reference: nn.Module, images: torch.Tensor, ids_shuffle: torch.Tensor) -> dict[str, Any]:
    """Runs mmpretrain's ``MILAN.loss`` with a forced permutation, then backward; captures the intermediates."""
    captured: dict[str, Any] = {}
    hooks = [
        reference.target_generator.register_forward_hook(lambda m, i, o: captured.__setitem__("teacher", o)),
        reference.backbone.register_forward_hook(lambda m, i, o: captured.__setitem__("backbone", o)),
        reference.neck.register_forward_hook(lambda m, i, o: captured.__setitem__("neck", o)),
    ]
    reference.zero_grad(set_to_none=True)
    try:
        with forced_multinomial(ids_shuffle):
            loss = reference.loss(images, None)["loss"]
    finally:
        for h in hooks:
            h.remove()
    loss.backward()
    features, attention = captured["teacher"]
    enc, dec, _, _ = mmpretrain_milan_to_milan(
        {k: p.grad for k, p in reference.named_parameters() if p.grad is not None}
    )
    grads = {f"student.encoder.{k}": v for k, v in enc.items()}
    grads.update({f"student.decoder.{k}": v for k, v in dec.items()})
    return dict(
        loss=loss.detach(),
        features=features.detach(),
        importance=attention[:, 0, 1:].detach(),
        latent=captured["backbone"][0].detach(),
        pred=captured["neck"].detach(),
        grads=grads,
    )
