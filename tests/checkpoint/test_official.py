"""Official checkpoints in: mmpretrain / MMSelfSup MILAN and classifiers (built by mmpretrain itself), the original
MILAN / MAE layouts (constructed key by key), and our own training checkpoints."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from milan.checkpoint import CheckpointError, load_classifier, load_milan, load_student, read_checkpoint
from milan.masking import attention_masking, from_permutation
from milan.models import MILAN, build_milan, model_config
from milan.models.classifier import FinetuneClassifier, LinearProbe
from tests.checkpoint.conftest import IMG, randomize_

HEADS = dict(num_heads=4, decoder_num_heads=4)  # milan_test_tiny's heads (not recoverable from shapes)


def _same_outputs(a: MILAN, b: MILAN, images: torch.Tensor) -> None:
    assert a.teacher is not None and b.teacher is not None
    importance = a.teacher(images).cls_attention
    mask = attention_masking(importance, 0.75, torch.rand(importance.shape, generator=torch.Generator().manual_seed(3)))
    with torch.no_grad():
        out_a, out_b = a(images, mask=mask), b(images, mask=mask)
    torch.testing.assert_close(out_b.target, out_a.target, atol=1e-6, rtol=0)
    torch.testing.assert_close(out_b.importance, out_a.importance, atol=1e-7, rtol=0)
    torch.testing.assert_close(out_b.pred, out_a.pred, atol=1e-6, rtol=0)
    torch.testing.assert_close(out_b.loss, out_a.loss, atol=1e-7, rtol=0)


# ----------------------------------------------------------------------------------------------------------------
# Original MILAN / MAE layouts (keys constructed exactly as milan_reference.md section 5.2 lists them)

_ORIG_KEYS = [
    r"cls_token", r"pos_embed", r"patch_embed\.proj\.(weight|bias)",
    r"blocks\.\d+\.(norm1|attn\.qkv|attn\.proj|norm2|mlp\.fc1|mlp\.fc2)\.(weight|bias)", r"norm\.(weight|bias)",
    r"decoder_embed\.(weight|bias)", r"mask_token", r"decoder_pos_embed",
    r"decoder_blocks\.\d+\.(norm1|attn\.q|attn\.kv|attn\.proj|norm2|mlp\.fc1|mlp\.fc2)\.(weight|bias)",
    r"decoder_norm\.(weight|bias)", r"decoder_pred\.(weight|bias)",
]  # fmt: skip


def test_milan_orig_pretrain_checkpoint(tmp_path: Path, images: torch.Tensor) -> None:
    cfg = model_config("milan_test_tiny")
    cfg.encoder.pos_embed_layout = "mae"  # the original code's sin-cos layout
    original = randomize_(build_milan(cfg)).eval()
    sd = {**original.encoder.state_dict(), **original.decoder.state_dict()}  # MAE names = ours
    assert all(any(re.fullmatch(p, k) for p in _ORIG_KEYS) for k in sd), "not the original MILAN key layout"
    args = argparse.Namespace(model="mae_vit_base_patch16_dec512d8b", use_clip=True, mask_ratio=0.75)
    torch.save({"model": sd, "optimizer": {}, "epoch": 399, "scaler": {}, "args": args}, tmp_path / "orig.pth")
    assert original.teacher is not None
    torch.save({"model": original.teacher.state_dict()}, tmp_path / "teacher.pth")  # our teacher layout

    ck = read_checkpoint(tmp_path / "orig.pth", **HEADS)
    assert (ck.format, ck.kind, ck.encoder_arch().pos_embed_layout) == ("milan-orig", "milan", "mae")
    with pytest.raises(CheckpointError, match="no teacher"):
        load_milan(tmp_path / "orig.pth", **HEADS)
    loaded = load_milan(tmp_path / "orig.pth", teacher=tmp_path / "teacher.pth", **HEADS)
    assert torch.equal(loaded.encoder.pos_embed, original.encoder.pos_embed)
    _same_outputs(original, loaded, images)


def test_milan_orig_mae_decoder_and_classifiers(tmp_path: Path, images: torch.Tensor) -> None:
    cfg = model_config("milan_test_tiny")
    cfg.decoder.kind = "mae"  # models_mae.py ablation: full self-attention decoder (attn.qkv)
    original = build_milan(cfg)
    torch.save({"model": original.student.state_dict()}, tmp_path / "student.pth")
    student = load_student(tmp_path / "student.pth", **HEADS)
    assert type(student.decoder).__name__ == "MAEDecoder"

    # Fine-tuned (timm/MAE VisionTransformer with global_pool: fc_norm + head, no norm).
    ft = randomize_(FinetuneClassifier(original.encoder, num_classes=5)).eval()
    ft_sd = {k.removeprefix("encoder."): v for k, v in ft.state_dict().items()}
    assert "norm.weight" not in ft_sd and "fc_norm.weight" in ft_sd
    torch.save({"model": ft_sd, "args": argparse.Namespace(global_pool=True)}, tmp_path / "ft.pth")
    loaded_ft = load_classifier(tmp_path / "ft.pth", num_heads=4)
    assert isinstance(loaded_ft, FinetuneClassifier)
    torch.testing.assert_close(loaded_ft(images), ft(images), atol=1e-6, rtol=0)

    # MAE linear probe: head = Sequential(BatchNorm1d(affine=False), Linear) -> head.0 / head.1.
    lp = randomize_(LinearProbe(build_milan(model_config("milan_test_tiny")).encoder, num_classes=5)).eval()
    lp_sd = {k.removeprefix("encoder.").replace("head.bn.", "head.0.").replace("head.fc.", "head.1."): v
             for k, v in lp.state_dict().items()}  # fmt: skip
    torch.save({"model": lp_sd}, tmp_path / "lp.pth")
    loaded_lp = load_classifier(tmp_path / "lp.pth", num_heads=4)
    assert isinstance(loaded_lp, LinearProbe)
    torch.testing.assert_close(loaded_lp(images), lp(images), atol=1e-6, rtol=0)


def test_our_training_checkpoint(tmp_path: Path, images: torch.Tensor) -> None:
    """The engine's layout: student under 'model', a random teacher under 'teacher', the resolved config."""
    cfg = model_config("milan_test_tiny")
    original = randomize_(build_milan(cfg)).eval()
    assert original.teacher is not None
    ckpt = {
        "format": "milan-train",
        "model": original.student.state_dict(),
        "teacher": original.teacher.state_dict(),
        "optimizer": {"state": {}, "param_groups": []},
        "state": {"epoch": 1, "step": 10},
        "config": {"model_name": "milan_test_tiny", "model": dataclasses.asdict(cfg)},
    }
    torch.save(ckpt, tmp_path / "last.pt")
    loaded = load_milan(tmp_path / "last.pt")  # heads come from the stored config
    assert loaded.encoder.num_heads == 4 and loaded.decoder.decoder_blocks[0].attn.num_heads == 4
    _same_outputs(original, loaded, images)


# ----------------------------------------------------------------------------------------------------------------
# mmpretrain (parity extra)


@pytest.mark.parity
def test_mmpretrain_milan_pretrain_checkpoint(tmp_path: Path, images: torch.Tensor) -> None:
    pytest.importorskip("mmpretrain", reason="needs the `parity` extra")
    from tests.parity.mm_reference import build_reference, run_reference

    cfg = model_config("milan_test_tiny")
    reference = build_reference(cfg, seed=0)
    with torch.no_grad():  # a stored table that is not what we would generate: it must be kept, not rebuilt
        reference.backbone.pos_embed.add_(0.01 * torch.randn_like(reference.backbone.pos_embed))
        reference.neck.decoder_pos_embed.add_(0.01 * torch.randn_like(reference.neck.decoder_pos_embed))
    sd = reference.state_dict()
    assert any(k.startswith("target_generator.tokenizer.") for k in sd)
    torch.save({"meta": {"epoch": 400, "mmengine_version": "0.10.7"}, "state_dict": sd}, tmp_path / "mm.pth")

    ours = load_milan(tmp_path / "mm.pth", **HEADS)
    assert torch.equal(ours.encoder.pos_embed, sd["backbone.pos_embed"])
    assert torch.equal(ours.decoder.decoder_pos_embed, sd["neck.decoder_pos_embed"])
    assert ours.teacher is not None
    importance = ours.teacher(images).cls_attention
    noise = torch.rand(importance.shape, generator=torch.Generator().manual_seed(2))
    ids_shuffle = attention_masking(importance, 0.75, noise).ids_shuffle
    ref = run_reference(reference, images, ids_shuffle)
    with torch.no_grad():
        out = ours(images, mask=from_permutation(ids_shuffle, 0.75))
    torch.testing.assert_close(out.target, ref["features"], atol=1e-5, rtol=0)
    torch.testing.assert_close(out.importance, ref["importance"], atol=1e-6, rtol=0)
    torch.testing.assert_close(out.pred, ref["pred"], atol=1e-5, rtol=0)
    torch.testing.assert_close(out.loss, ref["loss"], atol=1e-6, rtol=0)

    # Released files may lack the teacher: then it must be given (here: the CLIP it was trained with).
    student_only = {k: v for k, v in sd.items() if not k.startswith("target_generator.")}
    torch.save({"state_dict": student_only}, tmp_path / "mm_student.pth")
    clip = {k.removeprefix("target_generator.tokenizer."): v for k, v in sd.items() if k.startswith("target_gen")}
    torch.save(clip, tmp_path / "clip.pth")
    with pytest.raises(CheckpointError, match="teacher"):
        load_milan(tmp_path / "mm_student.pth", **HEADS)
    again = load_milan(tmp_path / "mm_student.pth", teacher=tmp_path / "clip.pth", **HEADS)
    _same_outputs(ours, again, images)


def _mm_classifier(kind: str) -> torch.nn.Module:
    from mmpretrain.registry import MODELS
    from mmpretrain.utils import register_all_modules

    from tests.parity.mm_reference import _quiet

    _quiet()
    register_all_modules()
    arch = dict(embed_dims=64, num_layers=2, num_heads=4, feedforward_channels=256)
    loss = dict(type="CrossEntropyLoss")
    if kind == "linear":  # milan_reference.md 5.3: final_norm, cls token, ClsBatchNormNeck, VisionTransformerClsHead
        backbone = dict(out_type="cls_token", final_norm=True, frozen_stages=2)
        neck = dict(type="ClsBatchNormNeck", input_features=64)
        head = dict(type="VisionTransformerClsHead", num_classes=7, in_channels=64, loss=loss)
    else:  # fine-tuning: avg_featmap + ln2, no final norm, LinearClsHead
        backbone, neck = dict(out_type="avg_featmap", final_norm=False, drop_path_rate=0.1), None
        head = dict(type="LinearClsHead", num_classes=7, in_channels=64, loss=loss)
    model = MODELS.build(
        dict(
            type="ImageClassifier",
            backbone=dict(type="VisionTransformer", arch=arch, img_size=IMG, patch_size=8, **backbone),
            neck=neck,
            head=head,
        )
    )
    return randomize_(model).eval()


@pytest.mark.parity
@pytest.mark.parametrize("kind", ["linear", "finetune"])
def test_mmpretrain_classifiers(tmp_path: Path, images: torch.Tensor, kind: str) -> None:
    pytest.importorskip("mmpretrain", reason="needs the `parity` extra")
    reference = _mm_classifier(kind)
    sd = reference.state_dict()
    expected = {"backbone.ln1.weight", "neck.bn.running_mean", "head.layers.head.weight"} if kind == "linear" else {
        "backbone.ln2.weight", "head.fc.weight"
    }  # fmt: skip
    assert expected <= set(sd), sorted(sd)[-8:]
    torch.save({"meta": {}, "state_dict": sd}, tmp_path / f"{kind}.pth")
    ours = load_classifier(tmp_path / f"{kind}.pth", num_heads=4)
    assert isinstance(ours, LinearProbe if kind == "linear" else FinetuneClassifier)
    with torch.no_grad():
        logits = reference(images, mode="tensor")
    torch.testing.assert_close(ours(images), logits, atol=1e-5, rtol=0)


class _MakeDir:
    """Pickled as a call of mmengine's ``mkdir_or_exist(marker)``: were it ever called, the folder would exist."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        from mmengine.utils import mkdir_or_exist

        return (mkdir_or_exist, (str(self.marker),))


@pytest.mark.parity
def test_an_mmengine_training_checkpoint_loads_without_mmengine(tmp_path: Path, images: torch.Tensor) -> None:
    """A user's own mmpretrain fine-tuning checkpoint as mmengine's Runner writes it (meta, state_dict, the
    MessageHub's state with its HistoryBuffers of numpy arrays, the optimizer's and the schedulers' states), saved by
    mmengine's own save_checkpoint. Today: "refusing to load ... would import and call mmengine...". Now its weights
    load in a fresh process that never imports mmengine, and nothing named in the file is called."""
    pytest.importorskip("mmpretrain", reason="needs the `parity` extra")
    import mmengine
    from mmengine.logging import MessageHub
    from mmengine.optim import CosineAnnealingLR, OptimWrapper
    from mmengine.runner.checkpoint import save_checkpoint, weights_to_cpu

    model = _mm_classifier("finetune")
    optim = OptimWrapper(torch.optim.AdamW(model.parameters(), lr=1e-3))
    scheduler = CosineAnnealingLR(optim, T_max=10, by_epoch=False)
    hub = MessageHub.get_instance("milan_test_mmengine_checkpoint")
    model.train()
    for step in range(2):
        loss = model(images, mode="tensor").pow(2).mean()
        optim.update_params(loss)
        scheduler.step()
        hub.update_scalar("train/loss", float(loss))
        hub.update_scalar("train/lr", scheduler.get_last_value()[0])
        hub.update_info("iter", step + 1)
    model.eval()
    with torch.no_grad():
        expected = model(images, mode="tensor")
    meta = dict(
        epoch=1, iter=2, cfg="model = dict(type='ImageClassifier')", seed=0, experiment_name="ft",
        mmengine_version=mmengine.__version__, dataset_meta=dict(classes=tuple("abcdefg")),
    )  # fmt: skip
    checkpoint = {
        "meta": meta,
        "state_dict": weights_to_cpu(model.state_dict()),
        "message_hub": hub.state_dict(),
        "optimizer": optim.state_dict(),
        "param_schedulers": [scheduler.state_dict()],
    }
    marker = tmp_path / "PWNED"
    checkpoint["message_hub"]["runtime_info"]["payload"] = _MakeDir(marker)  # an mmengine call that must never run
    path = tmp_path / "epoch_1.pth"
    save_checkpoint(checkpoint, str(path))
    assert not marker.exists()
    torch.save(images, tmp_path / "images.pt")
    code = f"""
import json, sys, torch
from milan.checkpoint import load_classifier, safe_load
from milan.checkpoint.io import Inert
raw = safe_load({str(path)!r})
model = load_classifier({str(path)!r}, num_heads=4)
torch.save(model(torch.load({str(tmp_path / "images.pt")!r}, weights_only=True)), {str(tmp_path / "ours.pt")!r})
payload = raw["message_hub"]["runtime_info"]["payload"]
loss = raw["message_hub"]["log_scalars"]["train/loss"]
print(json.dumps({{
    "imported": sorted(m for m in sys.modules if m.split(".")[0] in ("mmengine", "mmpretrain", "mmcv")),
    "meta": {{k: raw["meta"][k] for k in ("epoch", "iter", "seed", "mmengine_version")}},
    "payload": [isinstance(payload, Inert), payload.qualified_name, list(payload.args)],
    "history": [isinstance(loss, Inert), loss.qualified_name],
    "optimizer_state": sorted(raw["optimizer"]["state"][0]),
}}))
"""
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env, cwd=root, check=False
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["imported"] == []
    assert report["meta"] == {"epoch": 1, "iter": 2, "seed": 0, "mmengine_version": mmengine.__version__}
    assert report["payload"] == [True, "mmengine.utils.path.mkdir_or_exist", [str(marker)]]
    assert report["history"] == [True, "mmengine.logging.history_buffer.HistoryBuffer"]
    assert report["optimizer_state"] == ["exp_avg", "exp_avg_sq", "step"]
    assert not marker.exists()
    torch.testing.assert_close(torch.load(tmp_path / "ours.pt", weights_only=True), expected, atol=1e-5, rtol=0)
