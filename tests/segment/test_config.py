"""The segmentation job's schema, presets and checks; its iteration schedule (warm-up + poly) and derived steps."""

from __future__ import annotations

import pytest

from milan.jobs.config import describe
from milan.train.config import ConfigError, SegmentConfig, check_segment, derive, load_config
from milan.train.schedule import PolySchedule
from tests.segment.conftest import REPO

ADE_PRESET = REPO / "configs/segment/milan_vit_base_patch16_ade20k_512_160k.yaml"
CAMVID_PRESET = REPO / "configs/segment/camvid_tiny_cpu.yaml"


def test_the_ade20k_preset_holds_mmsegmentations_recipe() -> None:
    cfg = load_config(SegmentConfig, ADE_PRESET, ["encoder.pretrained=some.pt", "data.root=ADE"])
    check_segment(cfg)
    d, e, s = cfg.data, cfg.eval, cfg.schedule
    assert (d.crop_size, d.scale, d.ratio_range, d.cat_max_ratio, d.hflip, d.photometric) == (
        512, (2048, 512), (0.5, 2.0), 0.75, 0.5, True,
    )  # fmt: skip
    assert (d.num_classes, d.ignore_index, d.reduce_zero_label, len(d.class_names or [])) == (150, 255, True, 150)
    assert (e.scale, e.mode, e.crop, e.stride, e.every_steps) == ((2048, 512), "slide", 512, 341, 16000)
    assert (cfg.optim.lr, cfg.optim.betas, cfg.optim.weight_decay, cfg.layer_decay, cfg.drop_path_rate) == (
        1e-4, (0.9, 0.999), 0.05, 0.65, 0.1,
    )  # fmt: skip
    assert (s.iters, s.warmup_iters, s.warmup_ratio, s.power, s.min_lr) == (160_000, 1500, 1e-6, 1.0, 0.0)
    m = cfg.model
    assert (cfg.batch_size * 8, m.channels, m.aux_channels, m.aux_weight, m.layer_scale) == (16, None, 256, 0.4, 1.0)
    # the schema's defaults are the recipe too: the preset differs only in names, run-folder and logging settings
    differs = ["data.class_names=null", "eval.crop=null", "encoder.num_heads=null", "data.num_workers=null",
               "out_dir=runs/segment", "checkpoint.every_steps=0", "checkpoint.every_epochs=1", "checkpoint.keep=3",
               "log.every_steps=20"]  # fmt: skip
    assert load_config(SegmentConfig) == load_config(SegmentConfig, ADE_PRESET, differs)


def test_presets_leave_the_data_to_the_user_in_one_line() -> None:
    for preset in (ADE_PRESET, CAMVID_PRESET):
        cfg = load_config(SegmentConfig, preset, ["encoder.pretrained=some.pt"])
        with pytest.raises(ConfigError, match=r"^data.root is not set: pass data.root=DIR, the folder that holds"):
            check_segment(cfg)
    camvid = load_config(SegmentConfig, CAMVID_PRESET, ["data.root=DIR"])
    check_segment(camvid)  # a random encoder (encoder.model_name), the run says so
    assert camvid.encoder.model_name == "milan_demo_small" and camvid.data.ignore_index == 11
    absolute = [f"data.{k}=/x/{k}" for k in ("train_images", "train_labels", "val_images", "val_labels")]
    check_segment(load_config(SegmentConfig, CAMVID_PRESET, absolute))  # absolute folders need no root


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("data.ignore_index=3", r"data.ignore_index=3 is one of the classes 0..10"),
        ("data.class_names=[a, b]", r"data.class_names has 2 names for data.num_classes=11"),
        ("data.ratio_range=[2.0, 0.5]", r"data.ratio_range must satisfy min <= max"),
        ("data.cat_max_ratio=0", r"data.cat_max_ratio must be in \(0, 1\]"),
        ("data.hflip=1.5", r"data.hflip must be in \[0, 1\]"),
        ("model.dropout=1.0", r"model.dropout must be in \[0, 1\)"),
        ("model.pool_scales=[]", r"model.pool_scales must hold at least one size"),
        ("model.pool_scales=[1, 0]", r"model.pool_scales\[1\] must be >= 1"),
        ("eval.stride=0", r"eval.stride must be >= 1"),
        ("layer_decay=0", r"layer_decay must be in \(0, 1\]"),
        ("schedule.warmup_iters=400", r"schedule.warmup_iters=400 is longer than schedule.iters=300"),
        ("schedule.power=0", r"schedule.power must be > 0"),
        ("data.img_size=64", r"unknown config key 'data.img_size'"),  # the crop is data.crop_size
        ("runtime.teacher_dtype=bf16", r"unknown config key 'runtime.teacher_dtype'"),  # no teacher here
    ],
)
def test_bad_values_name_their_key(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        check_segment(load_config(SegmentConfig, CAMVID_PRESET, ["data.root=DIR", override]))


def test_every_key_is_described() -> None:
    rows = describe(load_config(SegmentConfig, CAMVID_PRESET))
    assert [r.key for r in rows if not r.description] == []
    assert any(r.key == "schedule.iters" and "int >= 1 | null" in r.type for r in rows)


def test_iterations_replace_epochs_in_the_derived_steps() -> None:
    def derived(*overrides: str) -> tuple[int, int, int, int]:
        cfg = load_config(SegmentConfig, CAMVID_PRESET, ["batch_size=4", *overrides])
        d = derive(cfg, world_size=2, batches_per_epoch=10)
        return d.total_steps, d.warmup_steps, d.stop_step, d.epochs

    assert derived("schedule.iters=25", "schedule.warmup_iters=3") == (25, 3, 25, 3)  # 10 steps per epoch: 3 epochs
    assert derived("schedule.iters=25", "schedule.warmup_iters=3", "schedule.max_steps=7") == (25, 3, 7, 3)
    assert derived("schedule.iters=null", "schedule.warmup_iters=null", "schedule.epochs=4",
                   "schedule.warmup_epochs=0.5") == (40, 5, 40, 4)  # fmt: skip
    assert derived("schedule.iters=20", "schedule.warmup_iters=null", "schedule.warmup_epochs=0.5") == (20, 5, 20, 2)
    cfg = load_config(SegmentConfig, CAMVID_PRESET)
    assert derive(cfg, 1, 45).lr == 5e-4  # optim.lr is absolute: not scaled with the batch


def test_poly_schedule_matches_mmengine_linear_warmup_then_recursive_poly() -> None:
    base, total, warmup, start = 1e-4, 40, 6, 1e-6
    ours = PolySchedule(base, total, warmup, 0.0, warmup_ratio=start, power=1.0)
    # mmengine LinearLR(start_factor, end=warmup) then PolyLR(eta_min=0, power=1, begin=warmup, end=total)
    lr, expected = base, []
    for step in range(total):
        if step < warmup:
            expected.append(base * (start + (1 - start) * step / warmup))
            lr = base
        else:
            if step > warmup:
                k = step - warmup  # PolyLR's recursive update at its k-th step
                lr = lr * (1 - 1 / (total - warmup - k + 1)) ** 1.0
            expected.append(lr)
    assert [ours(s) for s in range(total)] == pytest.approx(expected, rel=1e-9)
    assert ours(total) == 0.0
    squared = PolySchedule(1.0, 10, 0, power=2.0)
    assert squared(5) == pytest.approx(0.25)
