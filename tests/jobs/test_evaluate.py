"""``milan evaluate`` on official checkpoint layouts: mmpretrain classifiers converted on the fly."""

from __future__ import annotations

import re

import pytest
import torch

from milan.checkpoint.io import CheckpointError
from milan.jobs.evaluate import evaluate_checkpoint
from milan.models.classifier import FinetuneClassifier, LinearProbe
from milan.models.vit import VisionTransformer

# Our key -> mmpretrain ImageClassifier key (milan_reference.md section 5.3), written out independently of
# milan.checkpoint's mapping so that the round trip tests it.
_BACKBONE = [
    (r"^encoder\.patch_embed\.proj\.", "backbone.patch_embed.projection."),
    (r"^encoder\.blocks\.(\d+)\.norm1\.", r"backbone.layers.\1.ln1."),
    (r"^encoder\.blocks\.(\d+)\.norm2\.", r"backbone.layers.\1.ln2."),
    (r"^encoder\.blocks\.(\d+)\.attn\.", r"backbone.layers.\1.attn."),
    (r"^encoder\.blocks\.(\d+)\.mlp\.fc1\.", r"backbone.layers.\1.ffn.layers.0.0."),
    (r"^encoder\.blocks\.(\d+)\.mlp\.fc2\.", r"backbone.layers.\1.ffn.layers.1."),
    (r"^encoder\.norm\.", "backbone.ln1."),  # linear probe: the final norm
    (r"^encoder\.(cls_token|pos_embed)$", r"backbone.\1"),
    (r"^fc_norm\.", "backbone.ln2."),  # fine-tuning: the norm after average pooling
    (r"^head\.bn\.", "neck.bn."),  # linear probe: ClsBatchNormNeck
    (r"^head\.fc\.", "head.layers.head."),  # linear probe: VisionTransformerClsHead
    (r"^head\.(weight|bias)$", r"head.fc.\1"),  # fine-tuning: LinearClsHead
]


def to_mmpretrain(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in sd.items():
        for pattern, repl in _BACKBONE:
            new, n = re.subn(pattern, repl, key)
            if n:
                out[new] = value
                break
        else:
            raise AssertionError(f"unmapped key {key}")
    return out


def _encoder() -> VisionTransformer:
    return VisionTransformer(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4)


@pytest.mark.parametrize("kind", ["linear_probe", "finetune"])
def test_mmpretrain_classifier_gives_our_numbers(tmp_path, cifar, kind):
    torch.manual_seed(0)
    model = LinearProbe(_encoder(), 10) if kind == "linear_probe" else FinetuneClassifier(_encoder(), 10)
    model.train()
    with torch.no_grad():  # non-trivial BatchNorm statistics
        for _ in range(3):
            model(torch.randn(16, 3, 32, 32))
    ours = tmp_path / "ours.pt"
    torch.save({"model": model.state_dict(), "milan": {"num_heads": 4}}, ours)
    official = tmp_path / "official.pth"  # MMEngine checkpoints keep the weights under state_dict, with meta
    torch.save({"meta": {"mmpretrain_version": "1.2.0"}, "state_dict": to_mmpretrain(model.state_dict())}, official)
    a = evaluate_checkpoint(str(ours), str(cifar["val"]), device="cpu", num_workers=0, progress=False)
    notes: list[str] = []
    b = evaluate_checkpoint(str(official), str(cifar["val"]), device="cpu", num_workers=0, num_heads=4,
                            progress=False, warn=notes.append)  # fmt: skip
    assert a["kind"] == b["kind"] == kind
    # an official classifier carries no class names and no view: one warning for each assumption
    assert len(notes) == 2 and notes == b["notes"]
    assert notes[0].startswith("preprocessing: ImageNet mean") and "--crop-pct" in notes[0]
    assert notes[1].startswith("class names: the classifier does not store them; the folder's sorted class order")
    assert (a["top1"], a["top5"], a["count"]) == (b["top1"], b["top5"], b["count"]) and a["count"] == 300
    # the same logits, not just the same counts
    from milan.checkpoint import load_classifier

    x = torch.randn(4, 3, 32, 32)
    ref = model.eval()(x)
    torch.testing.assert_close(load_classifier(official, num_heads=4)(x), ref)


def test_evaluate_rejects_a_pretraining_checkpoint(tmp_path, cifar, tiny_encoder_ckpt):
    with pytest.raises(CheckpointError, match="not a classifier"):
        evaluate_checkpoint(str(tiny_encoder_ckpt), str(cifar["val"]), device="cpu", num_workers=0)
