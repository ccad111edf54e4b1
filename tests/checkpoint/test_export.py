"""Backbones out: timm and Hugging Face exports load in those libraries and give identical features."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from milan.checkpoint import (
    EncoderArch,
    Exported,
    export_hf,
    export_timm,
    load_classifier,
    load_encoder,
    load_milan,
    load_teacher,
    read_checkpoint,
    save_canonical,
)
from milan.checkpoint.export import timm_encoder_model
from milan.models import build_milan, model_config
from milan.models.classifier import FinetuneClassifier
from milan.models.vit import VisionTransformer
from tests.checkpoint.conftest import open_clip_model, randomize_

timm = pytest.importorskip("timm")


def _tiny_milan() -> torch.nn.Module:
    return randomize_(build_milan(model_config("milan_test_tiny"))).eval()


def _timm_from(result: Exported) -> torch.nn.Module:
    assert result.timm_model is not None
    model = timm.create_model(
        result.timm_model, pretrained=True, pretrained_cfg_overlay=result.cfg_overlay, **result.model_args
    )
    return model.eval()


def _assert_all_weights_loaded(model: torch.nn.Module, sd: dict[str, torch.Tensor]) -> None:
    """timm drops strictness when num_classes differs from its pretrained config; check every tensor ourselves."""
    theirs = model.state_dict()
    assert set(theirs) == set(sd), sorted(set(theirs) ^ set(sd))
    assert all(torch.equal(theirs[k], sd[k]) for k in sd)


def test_timm_name_for_standard_sizes() -> None:
    base = EncoderArch(img_size=224, patch_size=16, embed_dim=768, depth=12, num_heads=12)
    assert timm_encoder_model(base) == ("vit_base_patch16_224", {"num_classes": 0})
    huge = EncoderArch(img_size=224, patch_size=14, embed_dim=1280, depth=32, num_heads=16)
    assert timm_encoder_model(huge)[0] == "vit_huge_patch14_224"


@pytest.mark.slow
def test_vit_base_export_loads_in_timm_by_name(tmp_path: Path, images: torch.Tensor) -> None:
    """The issue's exact call: timm.create_model('vit_base_patch16_224', pretrained=True, num_classes=0, file=...)."""
    encoder = VisionTransformer().eval()  # ViT-B/16, 224 px
    torch.save({"model": {f"student.encoder.{k}": v for k, v in encoder.state_dict().items()}}, tmp_path / "c.pth")
    result = export_timm(tmp_path / "c.pth", tmp_path / "vitb16.safetensors")
    model = timm.create_model(
        "vit_base_patch16_224", pretrained=True, num_classes=0, pretrained_cfg_overlay=dict(file=str(result.path))
    ).eval()
    _assert_all_weights_loaded(model, encoder.state_dict())
    x = torch.nn.functional.interpolate(images[:1], size=224)
    with torch.no_grad():
        torch.testing.assert_close(model.forward_features(x), encoder.forward_features(x), atol=1e-5, rtol=0)


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_timm_roundtrip_tiny(tmp_path: Path, images: torch.Tensor, suffix: str) -> None:
    milan = _tiny_milan()
    torch.save({"model": milan.state_dict(), "milan": {"num_heads": 4, "decoder_num_heads": 4}}, tmp_path / "c.pth")
    result = export_timm(tmp_path / "c.pth", tmp_path / f"enc{suffix}", pth=suffix == ".safetensors")
    assert result.timm_model == "vit_base_patch16_224" and result.model_args["num_heads"] == 4
    model = _timm_from(result)
    _assert_all_weights_loaded(model, milan.encoder.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(model.forward_features(images), milan.encoder(images), atol=1e-6, rtol=0)
    if suffix == ".safetensors":
        assert result.extra_paths == [tmp_path / "enc.pth"] and (tmp_path / "enc.pth").is_file()
        back = read_checkpoint(result.path)  # our metadata travels in the safetensors header
        assert (back.format, back.kind, back.encoder_arch().num_heads) == ("timm", "encoder", 4)


def test_finetuned_classifier_exports_with_head(tmp_path: Path, images: torch.Tensor) -> None:
    clf = randomize_(FinetuneClassifier(_tiny_milan().encoder, num_classes=6)).eval()
    torch.save({"model": clf.state_dict(), "milan": {"num_heads": 4}}, tmp_path / "ft.pth")
    result = export_timm(tmp_path / "ft.pth", tmp_path / "ft.safetensors")
    assert result.model_args["global_pool"] == "avg" and result.model_args["num_classes"] == 6
    model = _timm_from(result)
    with torch.no_grad():
        torch.testing.assert_close(model(images), clf(images), atol=1e-6, rtol=0)
    torch.testing.assert_close(load_classifier(result.path)(images), clf(images), atol=1e-6, rtol=0)
    backbone = _timm_from(export_timm(tmp_path / "ft.pth", tmp_path / "ft_backbone.safetensors", head=False))
    with torch.no_grad():  # num_classes=0: pooled, fc_norm-ed features
        torch.testing.assert_close(backbone(images), clf.forward_features(images), atol=1e-6, rtol=0)


def test_hf_vit_export(tmp_path: Path, images: torch.Tensor) -> None:
    transformers = pytest.importorskip("transformers")
    milan = _tiny_milan()
    torch.save({"model": milan.state_dict(), "milan": {"num_heads": 4}}, tmp_path / "c.pth")
    export_hf(tmp_path / "c.pth", tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert (config["layer_norm_eps"], config["hidden_act"], config["qkv_bias"]) == (1e-6, "gelu", True)
    model = transformers.ViTModel.from_pretrained(str(tmp_path / "hf"), add_pooling_layer=False).eval()
    with torch.no_grad():
        hidden = model(pixel_values=images).last_hidden_state
    torch.testing.assert_close(hidden, milan.encoder(images), atol=1e-5, rtol=0)
    back = read_checkpoint(tmp_path / "hf")  # and back: a ViTModel folder reads as an encoder
    assert (back.format, back.kind, back.encoder_arch().num_heads) == ("hf", "encoder", 4)
    torch.testing.assert_close(load_encoder(tmp_path / "hf")(images), milan.encoder(images), atol=0, rtol=0)


def test_teacher_tower_to_timm_and_back(tmp_path: Path, images: torch.Tensor) -> None:
    """convert --from openai-clip --to timm: a timm CLIP tower file, loadable by timm and by load_teacher."""
    torch.save(open_clip_model(quick_gelu=True).state_dict(), tmp_path / "clip.pth")
    teacher = load_teacher(tmp_path / "clip.pth")
    result = export_timm(tmp_path / "clip.pth", tmp_path / "tower.safetensors")
    assert result.timm_model == "vit_base_patch16_clip_quickgelu_224" and result.kind == "teacher"
    tower = _timm_from(result)
    _assert_all_weights_loaded(tower, teacher.model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(tower.head(tower.forward_features(images)), teacher(images).features)
    again = load_teacher(tmp_path / "tower.safetensors")  # stored spec: QuickGELU, eps 1e-5, heads
    torch.testing.assert_close(again(images).features, teacher(images).features, atol=0, rtol=0)


def test_canonical_roundtrip(tmp_path: Path, images: torch.Tensor) -> None:
    milan = _tiny_milan()
    torch.save({"model": milan.state_dict()}, tmp_path / "c.pth")
    ck = read_checkpoint(tmp_path / "c.pth", num_heads=4, decoder_num_heads=4)
    for name in ("m.pth", "m.safetensors"):
        save_canonical(ck, tmp_path / name)
        loaded = load_milan(tmp_path / name)  # heads stored: no options needed
        assert loaded.encoder.num_heads == 4
        with torch.no_grad():
            torch.testing.assert_close(loaded.encoder(images), milan.encoder(images), atol=0, rtol=0)
            torch.testing.assert_close(loaded.teacher(images).features, milan.teacher(images).features)
