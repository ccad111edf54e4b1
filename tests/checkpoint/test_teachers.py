"""Teachers in: each format is made by its own library with random weights, loaded through ``load_teacher``, and
compared with what that library computes (per-token targets, CLS embedding, last-block CLS attention)."""

from __future__ import annotations

import json
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from milan.checkpoint import (
    CheckpointError,
    CheckpointWarning,
    load_teacher,
    model_from_config,
    read_checkpoint,
    save_safetensors,
    teacher_from_config,
)
from milan.models import Teacher, build_milan, model_config
from milan.models.factory import TeacherConfig
from tests.checkpoint.conftest import IMG, open_clip_model, open_clip_reference, randomize_

pytest.importorskip("open_clip")
TOL = 2e-5


def _check_open_clip(teacher: Teacher, model: torch.nn.Module, x: torch.Tensor) -> None:
    tokens, cls, attention = open_clip_reference(model, x)
    out = teacher(x)
    assert out.features.shape == tokens.shape
    torch.testing.assert_close(out.features, tokens, atol=TOL, rtol=0)
    torch.testing.assert_close(out.features[:, 0], cls, atol=TOL, rtol=0)
    torch.testing.assert_close(out.cls_attention, attention, atol=1e-6, rtol=0)


def test_openai_state_dict(tmp_path: Path, images: torch.Tensor) -> None:
    """MMSelfSup's clip_vit_base_16.pth.tar layout: a plain state dict with OpenAI names (+ int attributes)."""
    model = open_clip_model(quick_gelu=True)
    sd = {**model.state_dict(), "input_resolution": torch.tensor(IMG), "context_length": torch.tensor(8)}
    torch.save(sd, tmp_path / "clip_vit_tiny.pth.tar")
    ck = read_checkpoint(tmp_path / "clip_vit_tiny.pth.tar")
    assert (ck.format, ck.kind, ck.tower.act, ck.tower.norm_eps) == ("openai-clip", "teacher", "quick_gelu", 1e-5)
    _check_open_clip(load_teacher(tmp_path / "clip_vit_tiny.pth.tar"), model, images)


def test_openai_torchscript_archive(tmp_path: Path, images: torch.Tensor) -> None:
    """OpenAI publishes TorchScript archives; we read their tensors without torch.jit.load."""
    model = open_clip_model(quick_gelu=True)
    traced = torch.jit.trace_module(model, {"encode_image": images}, check_trace=False)
    torch.jit.save(traced, str(tmp_path / "ViT-T-8.pt"))
    ck = read_checkpoint(tmp_path / "ViT-T-8.pt")
    assert (ck.format, ck.kind) == ("openai-clip", "teacher")
    _check_open_clip(load_teacher(tmp_path / "ViT-T-8.pt"), model, images)


def _warned(load: Callable[[], Any]) -> tuple[Any, list[str]]:
    """``load()`` and the messages of the CheckpointWarnings it issued."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = load()
    return result, [str(w.message) for w in caught if issubclass(w.category, CheckpointWarning)]


def test_an_openai_layout_state_dict_says_which_activation_it_assumed(tmp_path: Path, images: torch.Tensor) -> None:
    """GELU weights in OpenAI's key layout (what open_clip.create_model('ViT-B-16').state_dict() gives): the file
    cannot tell, QuickGELU (OpenAI's, the paper's teacher) is used and one warning says so and how to choose GELU.
    Today: QuickGELU, silently."""
    model = open_clip_model(quick_gelu=False)
    path = tmp_path / "clip.pth"
    torch.save(model.state_dict(), path)
    assumed, warned = _warned(lambda: load_teacher(path))
    assert len(warned) == 1, warned
    assert "using QuickGELU (as OpenAI's CLIP weights, the paper's teacher" in warned[0]
    assert all(s in warned[0] for s in ("model.teacher.act=gelu", "--act gelu", "act='gelu'", "open_clip_config.json"))
    assert assumed.model.blocks[0].mlp.act.__class__.__name__ == "QuickGELU"
    assert (assumed(images).features - open_clip_reference(model, images)[0]).abs().max() > 1e-3
    # Each way the warning names settles it, silently: the argument, the config key, the config file.
    by_argument, warned = _warned(lambda: load_teacher(path, act="gelu"))
    assert warned == []
    _check_open_clip(by_argument, model, images)
    by_config, warned = _warned(lambda: teacher_from_config(TeacherConfig(checkpoint=str(path), act="gelu")))
    assert warned == [] and by_config is not None
    _check_open_clip(by_config, model, images)
    (tmp_path / "open_clip_config.json").write_text(json.dumps({"model_cfg": {"quick_gelu": False}}))
    by_file, warned = _warned(lambda: load_teacher(path))
    assert warned == []
    _check_open_clip(by_file, model, images)


@pytest.mark.parametrize("quick_gelu", [True, False])
def test_a_torchscript_archive_names_its_activation(tmp_path: Path, images: torch.Tensor, quick_gelu: bool) -> None:
    """The archive's module tree names its activation class (QuickGELU in OpenAI's files): no assumption, no
    warning. Today a GELU archive is built with QuickGELU."""
    model = open_clip_model(quick_gelu=quick_gelu)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit is deprecated
        torch.jit.save(
            torch.jit.trace_module(model, {"encode_image": images}, check_trace=False), str(tmp_path / "a.pt")
        )
    teacher, warned = _warned(lambda: load_teacher(tmp_path / "a.pt"))
    assert warned == []
    assert read_checkpoint(tmp_path / "a.pt").tower.act == ("quick_gelu" if quick_gelu else "gelu")
    _check_open_clip(teacher, model, images)


def test_a_timm_clip_tower_without_model_name_says_what_it_assumed(tmp_path: Path, images: torch.Tensor) -> None:
    """A timm-layout CLIP tower (CLIP's norm_pre) without a timm model name: QuickGELU and LayerNorm eps 1e-5 (as
    OpenAI's CLIP), with one warning. Today: GELU and eps 1e-6, silently."""
    timm = pytest.importorskip("timm")
    ref = timm.create_model(
        "vit_base_patch16_clip_quickgelu_224", pretrained=False, img_size=IMG, patch_size=8, embed_dim=64, depth=2,
        num_heads=1, num_classes=32,
    )  # fmt: skip
    ref = randomize_(ref).eval()
    save_safetensors(ref.state_dict(), tmp_path / "model.safetensors")
    teacher, warned = _warned(lambda: load_teacher(tmp_path / "model.safetensors"))
    assert len(warned) == 1 and "timm-layout CLIP tower without a timm model name" in warned[0], warned
    assert "using QuickGELU" in warned[0] and "eps 1e-05" in warned[0] and "model.teacher.model_name=" in warned[0]
    feats, attention = _timm_reference(ref, images)
    out = teacher(images)
    torch.testing.assert_close(out.features, feats, atol=TOL, rtol=0)
    torch.testing.assert_close(out.cls_attention, attention, atol=1e-6, rtol=0)
    _, warned = _warned(lambda: load_teacher(tmp_path / "model.safetensors", act="gelu"))
    assert warned == []


@pytest.mark.parametrize(
    ("name", "kwargs", "quick_gelu"),
    [
        ("B16-like", dict(width=128, patch=8), False),
        ("B32-like", dict(width=128, patch=16), True),  # 2 x 2 grid
        ("L14-like", dict(width=128, patch=14, image=28), False),
    ],
)
def test_open_clip_native(tmp_path: Path, name: str, kwargs: dict, quick_gelu: bool) -> None:
    model = open_clip_model(quick_gelu=quick_gelu, **kwargs)
    x = torch.randn(2, 3, kwargs.get("image", IMG), kwargs.get("image", IMG))
    (tmp_path / "open_clip_config.json").write_text(json.dumps({"model_cfg": {"quick_gelu": quick_gelu}}))
    torch.save(model.state_dict(), tmp_path / "open_clip_pytorch_model.bin")
    teacher = load_teacher(tmp_path / "open_clip_pytorch_model.bin")
    assert teacher.patch_size == kwargs["patch"]
    _check_open_clip(teacher, model, x)
    # The activation is not in the weights: the wrong one gives different targets (so the config matters).
    wrong = load_teacher(tmp_path / "open_clip_pytorch_model.bin", act="gelu" if quick_gelu else "quick_gelu")
    assert (wrong(x).features - teacher(x).features).abs().max() > 1e-4


def test_open_clip_training_checkpoint_and_head_width(tmp_path: Path, images: torch.Tensor) -> None:
    """A ViT-H/14-like tower (80-wide heads, from open_clip_config.json) in an open_clip training checkpoint."""
    model = open_clip_model(width=160, head_width=80, quick_gelu=False)
    state = {f"module.{k}": v for k, v in model.state_dict().items()}
    torch.save({"epoch": 3, "name": "run", "state_dict": state}, tmp_path / "epoch_3.pt")
    config = {"model_cfg": {"vision_cfg": {"width": 160, "head_width": 80}}}  # no quick_gelu: GELU
    (tmp_path / "open_clip_config.json").write_text(json.dumps(config))
    ck = read_checkpoint(tmp_path / "epoch_3.pt")
    assert (ck.format, ck.tower.num_heads, ck.tower.act) == ("open-clip", 2, "gelu")
    _check_open_clip(load_teacher(tmp_path / "epoch_3.pt"), model, images)


def test_open_clip_safetensors(tmp_path: Path, images: torch.Tensor) -> None:
    model = open_clip_model(quick_gelu=False)
    save_safetensors(model.state_dict(), tmp_path / "open_clip_model.safetensors")
    teacher = load_teacher(tmp_path / "open_clip_model.safetensors", fmt="open-clip")  # GELU: open_clip's default
    _check_open_clip(teacher, model, images)


def test_open_clip_timm_trunk(tmp_path: Path, images: torch.Tensor) -> None:
    """A timm-backed OpenCLIP tower (visual.trunk.* + visual.head.proj); the timm name comes from its config."""
    vision = dict(timm_model_name="test_vit", timm_pool="token", timm_proj="linear")  # timm's 0.4M-param test ViT
    model = open_clip_model(image=160, **vision)  # open_clip builds the trunk at the timm model's own 160 px
    images = torch.nn.functional.interpolate(images[:1], size=160)
    torch.save(model.state_dict(), tmp_path / "open_clip_pytorch_model.bin")
    (tmp_path / "open_clip_config.json").write_text(json.dumps({"model_cfg": {"vision_cfg": vision}}))
    ck = read_checkpoint(tmp_path / "open_clip_pytorch_model.bin")
    assert (ck.format, ck.tower.timm_name, ck.tower.out_dim) == ("open-clip", "test_vit", 32)
    out = load_teacher(tmp_path / "open_clip_pytorch_model.bin")(images)
    trunk = model.visual.trunk
    with torch.no_grad():
        tokens = model.visual.head(trunk.forward_features(images))  # norm on every token, then the projection
        torch.testing.assert_close(out.features, tokens, atol=TOL, rtol=0)
        torch.testing.assert_close(out.features[:, 0], model.encode_image(images), atol=TOL, rtol=0)
    w = model.visual.head.proj.weight  # a stray trunk head stored after the projection does not replace it
    stray = {"visual.trunk.head.weight": torch.randn_like(w), "visual.trunk.head.bias": torch.randn(w.shape[0])}
    torch.save({**model.state_dict(), **stray}, tmp_path / "open_clip_pytorch_model.bin")
    out = load_teacher(tmp_path / "open_clip_pytorch_model.bin")(images)
    torch.testing.assert_close(out.features, tokens, atol=TOL, rtol=0)


def _hf_reference(model: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    vision = model.vision_model
    with torch.no_grad():
        out = vision(pixel_values=x, output_attentions=True)
        tokens = model.visual_projection(vision.post_layernorm(out.last_hidden_state))
    return tokens, out.attentions[-1][:, :, 0, 1:].mean(dim=1)


@pytest.mark.parametrize("hidden_act", ["quick_gelu", "gelu"])
def test_hf_clip_vision_folder(tmp_path: Path, images: torch.Tensor, hidden_act: str) -> None:
    transformers = pytest.importorskip("transformers")
    cfg = transformers.CLIPVisionConfig(
        hidden_size=128,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,  # not width // 64: must come from config.json
        image_size=IMG,
        patch_size=8,
        projection_dim=32,
        hidden_act=hidden_act,
        layer_norm_eps=1e-6,
        attn_implementation="eager",
    )
    model = randomize_(transformers.CLIPVisionModelWithProjection(cfg)).eval()
    model.save_pretrained(tmp_path / "hf")
    teacher = load_teacher(tmp_path / "hf")
    tokens, attention = _hf_reference(model, images)
    out = teacher(images)
    torch.testing.assert_close(out.features, tokens, atol=TOL, rtol=0)
    torch.testing.assert_close(out.features[:, 0], model(pixel_values=images).image_embeds, atol=TOL, rtol=0)
    torch.testing.assert_close(out.cls_attention, attention, atol=1e-6, rtol=0)
    ck = read_checkpoint(tmp_path / "hf")
    assert (ck.tower.num_heads, ck.tower.act, ck.tower.norm_eps) == (4, hidden_act, 1e-6)


def test_hf_clip_model_weights_file_alone(tmp_path: Path, images: torch.Tensor) -> None:
    """A full CLIPModel (text tower dropped), sharded; its weights file alone takes HF's CLIP defaults."""
    transformers = pytest.importorskip("transformers")
    vision = dict(hidden_size=128, intermediate_size=512, num_hidden_layers=2, num_attention_heads=2)
    text = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=1, vocab_size=64)
    cfg = transformers.CLIPConfig(
        vision_config=dict(vision, image_size=IMG, patch_size=8), text_config=text, projection_dim=32
    )
    cfg._attn_implementation = "eager"
    model = randomize_(transformers.CLIPModel(cfg)).eval()
    model.save_pretrained(tmp_path / "hf")
    shutil.copy(tmp_path / "hf" / "model.safetensors", tmp_path / "clip.safetensors")
    model.save_pretrained(tmp_path / "sharded", max_shard_size="200KB")  # model.safetensors.index.json + shards
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    tokens, attention = _hf_reference(model, images)
    sharded, warned = _warned(lambda: load_teacher(tmp_path / "sharded"))  # with its config.json: nothing assumed
    assert warned == []
    torch.testing.assert_close(sharded(images).features, tokens, atol=TOL, rtol=0)
    ck, warned = _warned(lambda: read_checkpoint(tmp_path / "clip.safetensors"))
    assert ck.format == "hf" and any(k.startswith("text_model.") for k in ck.dropped)
    assert len(warned) == 1 and "without its config.json" in warned[0] and "using QuickGELU" in warned[0], warned
    teacher = load_teacher(tmp_path / "clip.safetensors")
    out = teacher(images)
    torch.testing.assert_close(out.features, tokens, atol=TOL, rtol=0)
    torch.testing.assert_close(out.cls_attention, attention, atol=1e-6, rtol=0)


def _timm_reference(model: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """timm's own forward_features (+ head on every token) and its explicit (non-fused) last-block attention."""
    captured: list[torch.Tensor] = []
    attn = model.blocks[-1].attn
    attn.fused_attn = False
    hook = attn.attn_drop.register_forward_hook(lambda m, i, o: captured.append(o))
    with torch.no_grad():
        feats = model.forward_features(x)
    hook.remove()
    feats = torch.cat([feats[:, :1], feats[:, model.num_prefix_tokens :]], dim=1)  # drop registers
    if isinstance(model.head, torch.nn.Linear):
        feats = model.head(feats)
    return feats, captured[0][:, :, 0, model.num_prefix_tokens :].mean(dim=1)


def test_byo_timm_dinov2_with_registers(tmp_path: Path, images: torch.Tensor) -> None:
    """A DINOv2-style timm ViT (4 registers, LayerScale, no_embed_class), architecture inferred from shapes."""
    timm = pytest.importorskip("timm")
    model = timm.create_model(
        "vit_small_patch14_reg4_dinov2", pretrained=False, num_classes=0, img_size=28, embed_dim=64, depth=2,
        num_heads=2, patch_size=7,
    )  # fmt: skip
    randomize_(model).eval()
    torch.save(model.state_dict(), tmp_path / "dinov2.pth")
    teacher = load_teacher(tmp_path / "dinov2.pth", num_heads=2)
    x = images[:, :, :28, :28]
    feats, attention = _timm_reference(model, x)
    out = teacher(x)
    assert teacher.out_dim == 64 and teacher.num_prefix_tokens == 5
    torch.testing.assert_close(out.features, feats, atol=TOL, rtol=0)
    torch.testing.assert_close(out.cls_attention, attention, atol=1e-6, rtol=0)

    # The same weights in facebookresearch/dinov2's own layout (mask_token, register_tokens, cls pos row).
    sd = dict(model.state_dict())
    pos0 = torch.randn(1, 1, 64)
    original = {k: v for k, v in sd.items() if k not in ("reg_token", "cls_token", "pos_embed")}
    original.update(
        register_tokens=sd["reg_token"], cls_token=sd["cls_token"] - pos0, mask_token=torch.zeros(1, 64),
        pos_embed=torch.cat([pos0, sd["pos_embed"]], dim=1),
    )  # fmt: skip
    torch.save(original, tmp_path / "dinov2_original.pth")
    torch.testing.assert_close(load_teacher(tmp_path / "dinov2_original.pth", num_heads=2)(x).features, feats)


def test_byo_timm_named_model_head(tmp_path: Path, images: torch.Tensor) -> None:
    """A named timm model (its own act/norm/heads); its Linear head is the projection unless head=False."""
    timm = pytest.importorskip("timm")
    model = randomize_(timm.create_model("test_vit", pretrained=False, num_classes=24, img_size=32))  # timm's tiny ViT
    torch.save(model.eval().state_dict(), tmp_path / "test_vit.pth")
    for head in (True, False):
        teacher = load_teacher(tmp_path / "test_vit.pth", model_name="test_vit", head=head)
        if not head:
            model.reset_classifier(0)
        feats, attention = _timm_reference(model, images)
        out = teacher(images)
        assert teacher.out_dim == (24 if head else 64)
        torch.testing.assert_close(out.features, feats, atol=TOL, rtol=0)
        torch.testing.assert_close(out.cls_attention, attention, atol=1e-6, rtol=0)


def test_plain_vit_encoder_as_teacher(tmp_path: Path, images: torch.Tensor) -> None:
    """A plain timm-layout ViT (here one of our own encoders, e.g. a previous MILAN student) as the teacher."""
    encoder = randomize_(build_milan(model_config("milan_test_tiny")).encoder).eval()
    clf_head = {"head.weight": torch.randn(10, 64), "head.bias": torch.randn(10)}  # a classifier head to drop
    torch.save({**encoder.state_dict(), **clf_head}, tmp_path / "vit.pth")
    teacher = load_teacher(tmp_path / "vit.pth", num_heads=4, head=False)
    assert teacher.out_dim == 64
    torch.testing.assert_close(teacher(images).features, encoder.forward_features(images), atol=TOL, rtol=0)
    assert load_teacher(tmp_path / "vit.pth", num_heads=4).out_dim == 10  # head kept by default


def test_unsupported_towers_are_named(tmp_path: Path) -> None:
    timm = pytest.importorskip("timm")
    siglip = timm.create_model("vit_base_patch16_siglip_224", img_size=32, embed_dim=64, depth=1, num_heads=2)
    torch.save(siglip.state_dict(), tmp_path / "siglip.pth")
    with pytest.raises(ValueError, match="no class token"):
        load_teacher(tmp_path / "siglip.pth", num_heads=1)
    with pytest.raises(TypeError, match="EVA"):
        load_teacher(tmp_path / "siglip.pth", model_name="eva02_tiny_patch14_224")


def test_mismatch_names_the_keys(tmp_path: Path) -> None:
    sd = open_clip_model().state_dict()
    sd.pop("visual.ln_post.bias")
    sd["visual.transformer.resblocks.1.mlp.c_fc.weight"] = torch.zeros(100, 128)
    torch.save(sd, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError) as info:
        load_teacher(tmp_path / "bad.pth")
    assert "norm.bias" in str(info.value) and "blocks.1.mlp.fc1.weight" in str(info.value)
    with pytest.raises(CheckpointError, match="unrecognised checkpoint layout"):
        torch.save({"foo.weight": torch.zeros(2)}, tmp_path / "foo.pth")
        load_teacher(tmp_path / "foo.pth")


def test_grid_matching_options(tmp_path: Path, images: torch.Tensor) -> None:
    """A 6 x 6 teacher run on a 4 x 4 grid (position table resampled), and a /16 teacher fed resized /8 inputs."""
    from timm.layers.pos_embed import resample_abs_pos_embed

    model = open_clip_model(patch=8, image=48)  # 6 x 6 grid
    torch.save(model.state_dict(), tmp_path / "clip48.pth")
    teacher = load_teacher(tmp_path / "clip48.pth", grid_size=4)
    assert teacher.grid_size == (4, 4)
    expected = resample_abs_pos_embed(model.visual.positional_embedding[None], [4, 4], [6, 6], num_prefix_tokens=1)
    torch.testing.assert_close(teacher.model.pos_embed, expected)
    milan = build_milan(model_config("milan_test_tiny"), teacher=teacher)  # grids match: MILAN accepts it
    assert milan(images).loss.isfinite()

    wide = open_clip_model(patch=16, image=64)  # 4 x 4 grid at 64 px; the student sees 32 px
    torch.save(wide.state_dict(), tmp_path / "clip64.pth")
    resized = load_teacher(tmp_path / "clip64.pth", grid_size=4)
    native = load_teacher(tmp_path / "clip64.pth")
    up = torch.nn.functional.interpolate(images, size=64, mode="bicubic", align_corners=False, antialias=True)
    torch.testing.assert_close(resized(images).features, native(up).features)
    # A teacher on another grid given to build_milan is run on the student's, as load_teacher(grid_size=...) does.
    matched = build_milan(model_config("milan_test_tiny"), teacher=load_teacher(tmp_path / "clip48.pth")).teacher
    assert matched is not None and matched.grid_size == (4, 4)
    torch.testing.assert_close(matched(images).features, teacher(images).features, atol=0, rtol=0)


def test_model_config_routes_to_load_teacher(tmp_path: Path) -> None:
    """TeacherConfig.checkpoint loads through load_teacher; the decoder predicts the teacher's width."""
    model = open_clip_model(quick_gelu=True)
    torch.save(model.state_dict(), tmp_path / "clip.pth")
    cfg = model_config("milan_test_tiny")
    cfg.teacher.checkpoint = str(tmp_path / "clip.pth")
    cfg.teacher.out_dim = 999  # ignored: the file decides
    milan = model_from_config(cfg)
    assert milan.teacher is not None and milan.teacher.out_dim == 32 and milan.decoder.out_dim == 32


def test_a_training_checkpoint_rebuilds_its_teacher_from_the_stored_spec(tmp_path: Path, images: torch.Tensor) -> None:
    """``teacher_spec`` (what the run built) wins over what the teacher file alone would be read as."""
    import dataclasses

    from milan.checkpoint import describe_tower, load_milan
    from milan.checkpoint.io import atomic_save

    torch.save(open_clip_model().state_dict(), tmp_path / "clip.pth")  # 128 wide: read as 2 heads by default
    used = load_teacher(tmp_path / "clip.pth", num_heads=4)  # the run's teacher: 4 heads
    cfg = model_config("milan_test_tiny")
    cfg.teacher.checkpoint = str(tmp_path / "clip.pth")
    model = build_milan(cfg, teacher=used)
    ckpt = {
        "format": "milan-train", "version": 1, "model": model.student.state_dict(), "optimizer": {}, "state": {},
        "config": {"model": dataclasses.asdict(cfg)}, "teacher_spec": describe_tower(used.model).to_dict(),
    }  # fmt: skip
    atomic_save(ckpt, tmp_path / "run.pt")
    loaded = load_milan(tmp_path / "run.pt").teacher
    assert loaded is not None and describe_tower(loaded.model) == describe_tower(used.model)
    want, got = used(images), loaded(images)
    torch.testing.assert_close(got.features, want.features, atol=0, rtol=0)
    torch.testing.assert_close(got.cls_attention, want.cls_attention, atol=0, rtol=0)
    atomic_save({k: v for k, v in ckpt.items() if k != "teacher_spec"}, tmp_path / "old.pt")  # before teacher_spec
    inferred = load_milan(tmp_path / "old.pt").teacher
    assert inferred is not None and inferred.model.blocks[-1].attn.num_heads == 2  # the file's default reading
    assert not torch.allclose(inferred(images).cls_attention, want.cls_attention)


def test_config_teacher_file_is_run_on_the_student_grid(tmp_path: Path) -> None:
    """A /4 CLIP teacher file for a /8 student at 32 px: the model runs the teacher at 16 px (4 x 4 grid)."""

    clip = open_clip_model(width=64, patch=4, image=32)  # native 8 x 8 grid
    torch.save(clip.state_dict(), tmp_path / "clip_p4.pth")
    cfg = model_config("milan_test_tiny")  # student: 32 px, patch 8 -> 4 x 4
    cfg.teacher.checkpoint = str(tmp_path / "clip_p4.pth")
    model = model_from_config(cfg)
    assert model.teacher is not None and model.teacher.grid_size == (4, 4)
    assert model.decoder.out_dim == model.teacher.out_dim == 32
    out = model(torch.randn(2, 3, 32, 32))
    assert out.target.shape == (2, 17, 32) and torch.isfinite(out.loss)
