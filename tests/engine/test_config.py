from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest

from milan.engine.config import (
    ConfigError,
    PretrainConfig,
    RunConfig,
    check_pretrain,
    derive,
    load_config,
    parse_overrides,
    save_config,
    to_dict,
)
from milan.models.factory import model_config

REPO = Path(__file__).resolve().parents[2]
PRESETS = REPO / "configs" / "pretrain"


def load(*overrides: str, path: Path | None = None) -> PretrainConfig:
    return load_config(PretrainConfig, path, list(overrides))


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("optim.lrr=1", "optim.lrr"),
        ("model.encoder.dpeth=2", "model.encoder.dpeth"),
        ("nonsense=1", "nonsense"),
    ],
)
def test_unknown_key_is_named(override: str, key: str) -> None:
    with pytest.raises(ConfigError, match=f"unknown config key '{key}'"):
        load(override)


def test_unknown_key_suggests_the_close_one() -> None:
    with pytest.raises(ConfigError, match=r"did you mean 'optim\.lr'"):
        load("optim.lrr=1")


@pytest.mark.parametrize(
    ("override", "key", "expects"),
    [
        ("optim.blr=abc", "optim.blr", "float"),
        ("batch_size=2.5", "batch_size", "int"),
        ("batch_size=true", "batch_size", "int"),
        ("log.tensorboard=1", "log.tensorboard", "bool"),
        ("runtime.precision=fp8", "runtime.precision", "one of 'auto', 'bf16', 'fp16', 'fp32'"),
        ("model.masking=topk", "model.masking", "one of 'attention', 'random'"),
        ("data.scale=[0.2]", "data.scale", "2 values"),
        ("data.scale=[0.2, x]", "data.scale[1]", "float"),
        ("optim.clip_grad=[1]", "optim.clip_grad", "float | null"),
        ("model.encoder=3", "model.encoder", "EncoderConfig"),
        ("runtime.teacher_dtype=fp8", "runtime.teacher_dtype", "one of 'auto', 'fp32', 'bf16', 'fp16'"),
        ("runtime.compile_teacher=yes please", "runtime.compile_teacher", "bool"),
    ],
)
def test_wrong_type_is_named(override: str, key: str, expects: str) -> None:
    with pytest.raises(ConfigError) as err:
        load(override)
    assert f"'{key}'" in str(err.value)
    assert expects in str(err.value)


def test_wrong_type_in_a_yaml_file(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("optim:\n  weight_decay: lots\n")
    with pytest.raises(ConfigError, match=r"'optim\.weight_decay' expects float"):
        load(path=path)


def test_overrides_are_parsed_as_yaml() -> None:
    cfg = load(
        "optim.blr=1e-4",  # YAML 1.1 reads this as a string; float fields accept it
        "optim.clip_grad=3",  # int -> float
        "optim.lr=null",
        "data.scale=[0.3, 1]",
        "out_dir=2024",  # a str field keeps the text
        "data.path=s3:bucket/x",  # colons stay in strings
        "model.teacher.checkpoint=~/clip.pt",
        "runtime.compile=true",
    )
    assert cfg.optim.blr == 1e-4 and cfg.optim.clip_grad == 3.0 and isinstance(cfg.optim.clip_grad, float)
    assert cfg.optim.lr is None
    assert cfg.data.scale == (0.3, 1.0)
    assert cfg.out_dir == "2024"
    assert cfg.data.path == "s3:bucket/x"
    assert cfg.model.teacher.checkpoint == "~/clip.pt"
    assert cfg.runtime.compile is True


def test_untyped_dict_fields_take_nested_overrides() -> None:
    @dataclasses.dataclass
    class Options:
        options: dict[str, Any] = dataclasses.field(default_factory=dict)

    cfg = load_config(Options, overrides=["options.heads=4", "options.sub.eps=0.5", "options.names=[a, b]"])
    assert cfg.options == {"heads": 4, "sub": {"eps": 0.5}, "names": ["a", "b"]}


def test_parse_overrides_nests_and_rejects_malformed() -> None:
    parsed = parse_overrides(["a.b=1", "a.c=x"])
    assert set(parsed["a"]) == {"b", "c"}
    for bad in ("noequals", "=1", "a..b=1"):
        with pytest.raises(ConfigError, match=r"dotted\.key=value"):
            parse_overrides([bad])


def test_model_name_fills_defaults_then_explicit_values_win(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("model_name: milan_test_tiny\nmodel:\n  encoder:\n    depth: 3\n")
    cfg = load(path=path)
    tiny = model_config("milan_test_tiny")
    assert cfg.model.encoder.embed_dim == tiny.encoder.embed_dim
    assert cfg.model.encoder.depth == 3
    assert cfg.model.teacher == tiny.teacher
    with pytest.raises(ConfigError, match="model_name: unknown variant 'nope'"):
        load("model_name=nope")


def test_resolved_config_round_trips(tmp_path: Path) -> None:
    cfg = load("model_name=milan_test_tiny", "data.scale=[0.3, 0.9]", "optim.clip_grad=1.5", "model.encoder.depth=3")
    path = save_config(cfg, tmp_path / "config.yaml")
    again = load_config(PretrainConfig, path)
    assert again == cfg
    assert to_dict(again) == to_dict(cfg)
    assert isinstance(again.data.scale, tuple)


@pytest.mark.parametrize("name", ["milan_vit_base_patch16_in1k_400e", "milan_vit_large_patch16_in1k_400e", "demo_cpu"])
def test_presets_load_and_validate(name: str) -> None:
    cfg = load(path=PRESETS / f"{name}.yaml")
    if cfg.data.path is None:  # the paper presets leave the data location to the user
        cfg = load("data.path=imagenet/train", path=PRESETS / f"{name}.yaml")
    check_pretrain(cfg)


def test_paper_preset_matches_the_reference() -> None:
    cfg = load(path=PRESETS / "milan_vit_base_patch16_in1k_400e.yaml")
    expected = model_config("milan_vit_base_patch16")
    assert cfg.model.encoder == expected.encoder and cfg.model.decoder == expected.decoder
    assert dataclasses.replace(cfg.model.teacher, checkpoint=None) == expected.teacher
    assert cfg.model.teacher.checkpoint  # a placeholder to fill in: the recipe needs the real CLIP weights
    assert (cfg.optim.blr, cfg.optim.betas, cfg.optim.weight_decay) == (1.5e-4, (0.9, 0.95), 0.05)
    assert cfg.optim.lr is None and cfg.optim.clip_grad is None and cfg.optim.wd_exempt_tokens
    assert (cfg.schedule.epochs, cfg.schedule.warmup_epochs, cfg.schedule.min_lr) == (400, 40.0, 0.0)
    assert cfg.data.scale == (0.2, 1.0) and cfg.data.interpolation == "bicubic" and cfg.data.hflip == 0.5
    assert cfg.model.mask_ratio == 0.75 and cfg.model.masking == "attention" and cfg.model.loss_on == "all"
    assert cfg.model.teacher.input_norm == "imagenet" and cfg.model.teacher.out_dim == 512
    assert cfg.model.decoder.embed_dim == 512 and cfg.model.decoder.depth == 8 and cfg.model.decoder.num_heads == 16
    assert cfg.seed == 0
    # 256 per GPU x accum 2 on 8 GPUs (ORIG) = 4096: lr 2.4e-3
    d = derive(cfg, world_size=8, batches_per_epoch=1281167 // (256 * 8))
    assert d.effective_batch == 4096
    assert d.lr == pytest.approx(2.4e-3)
    assert d.warmup_steps == 40 * d.steps_per_epoch


def test_large_preset_uses_accumulation_for_4096() -> None:
    cfg = load(path=PRESETS / "milan_vit_large_patch16_in1k_400e.yaml")
    assert cfg.model.encoder.embed_dim == 1024 and cfg.model.encoder.depth == 24
    assert cfg.batch_size * cfg.accum_steps * 8 == 4096


def test_derive_lr_rule_and_steps() -> None:
    cfg = load_config(
        RunConfig, overrides=["batch_size=32", "accum_steps=2", "schedule.epochs=3", "schedule.warmup_epochs=0.5"]
    )
    d = derive(cfg, world_size=2, batches_per_epoch=10)
    assert d.effective_batch == 128
    assert d.lr == pytest.approx(1.5e-4 * 128 / 256)
    assert (d.steps_per_epoch, d.total_steps, d.warmup_steps, d.stop_step) == (5, 15, 2, 15)
    capped = derive(load_config(RunConfig, overrides=["schedule.max_steps=4", "schedule.epochs=3"]), 1, 10)
    assert capped.stop_step == 4 and capped.total_steps == 30
    absolute = derive(load_config(RunConfig, overrides=["optim.lr=0.5"]), 1, 10)
    assert absolute.lr == 0.5
    with pytest.raises(ConfigError, match="accum_steps"):
        derive(load_config(RunConfig, overrides=["accum_steps=4"]), 1, 3)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("batch_size=0", "batch_size must be >= 1"),
        ("schedule.warmup_epochs=500", "warmup_epochs"),
        ("data.img_size=64", "data.img_size=64 differs from model.encoder.img_size"),
        ("data.scale=[0.9, 0.2]", "data.scale"),
        ("model.teacher.patch_size=4", "model.teacher grid"),
        ("checkpoint.keep=-1", "checkpoint.keep"),
        ("runtime.compile_mode=fast", "runtime.compile_mode must be null or one of default, reduce-overhead"),
        ("runtime.compile_mode=reduce-overhead", "runtime.compile_mode is set but runtime.compile is false"),
        ("runtime.compile_teacher=true", "runtime.compile_teacher is set but runtime.compile is false"),
    ],
)
def test_value_checks_name_the_key(override: str, message: str) -> None:
    cfg = load("model_name=milan_test_tiny", override)
    with pytest.raises(ConfigError, match=message):
        check_pretrain(cfg)


def test_speed_options_default_and_round_trip(tmp_path: Path) -> None:
    default = load("model_name=milan_test_tiny")
    rt = default.runtime
    assert (rt.teacher_dtype, rt.compile, rt.compile_mode, rt.compile_teacher) == ("auto", False, None, False)
    assert default.optim.fused is None  # fused AdamW wherever torch has it
    cfg = load(
        "model_name=milan_test_tiny", "runtime.teacher_dtype=bf16", "runtime.compile=true",
        "runtime.compile_mode=reduce-overhead", "runtime.compile_teacher=true",
    )  # fmt: skip
    check_pretrain(cfg)
    assert (cfg.runtime.teacher_dtype, cfg.runtime.compile_mode, cfg.runtime.compile_teacher) == (
        "bf16", "reduce-overhead", True,
    )  # fmt: skip
    assert load_config(PretrainConfig, save_config(cfg, tmp_path / "config.yaml")) == cfg
