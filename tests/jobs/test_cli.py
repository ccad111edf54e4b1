"""The commands on their presets: parsing, validation, clean errors, and short real runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from milan.cli import main
from milan.train.config import (
    FinetuneConfig,
    KnnConfig,
    LinprobeConfig,
    check_finetune,
    check_knn,
    check_linprobe,
    load_config,
)
from tests.jobs.conftest import job_overrides

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
JOBS = {"linprobe": (LinprobeConfig, check_linprobe), "finetune": (FinetuneConfig, check_finetune),
        "knn": (KnnConfig, check_knn)}  # fmt: skip


@pytest.mark.parametrize("path", sorted(p for job in JOBS for p in (CONFIGS / job).glob("*.yaml")), ids=str)
def test_presets_load_and_validate(path):
    cls, check = JOBS[path.parent.name]
    cfg = load_config(cls, path, ["encoder.pretrained=some.pt"])
    assert cfg.data.train is None and cfg.data.val is None  # data locations come from the user
    check(load_config(cls, path, ["encoder.pretrained=some.pt", "data.train=train", "data.val=val"]))


def test_reference_presets_hold_the_recipes():
    lp = load_config(LinprobeConfig, CONFIGS / "linprobe/milan_vit_base_patch16_in1k.yaml")
    assert (lp.batch_size * 8, lp.optim.blr * lp.batch_size * 8 / 256) == (16384, 3.2)
    assert (lp.schedule.epochs, lp.schedule.warmup_epochs, lp.optim.weight_decay) == (100, 10, 0.0)
    assert (lp.optim.momentum, lp.optim.trust_coefficient, lp.optim.lars_variant) == (0.9, 0.001, "mocov3")
    assert (lp.data.crop_geometry, lp.data.draft) == ("byol", False)  # ORIG util/crop.py; full JPEG decoding
    ft = load_config(FinetuneConfig, CONFIGS / "finetune/milan_vit_base_patch16_in1k.yaml")
    assert ft.batch_size * 8 * ft.accum_steps * ft.optim.blr / 256 == pytest.approx(4e-4)
    assert (ft.layer_decay, ft.drop_path_rate, ft.schedule.min_lr, ft.schedule.warmup_epochs) == (0.65, 0.1, 1e-6, 5)
    assert (ft.aug.auto_augment, ft.aug.re_prob, ft.aug.mixup, ft.aug.cutmix, ft.aug.label_smoothing) == (
        "rand-m9-mstd0.5-inc1", 0.25, 0.8, 1.0, 0.1)  # fmt: skip
    assert tuple(ft.optim.betas) == (0.9, 0.999) and ft.optim.weight_decay == 0.05 and not ft.ema.enabled
    large = load_config(FinetuneConfig, CONFIGS / "finetune/milan_vit_large_patch16_in1k.yaml")
    assert (large.layer_decay, large.drop_path_rate, large.batch_size * large.accum_steps * 8) == (0.75, 0.2, 1024)
    knn = load_config(KnnConfig, CONFIGS / "knn/milan_vit_base_patch16_in1k.yaml")
    assert (knn.k[0], knn.temperature) == (20, 0.07)


def test_print_config_and_config_errors(capsys):
    preset = str(CONFIGS / "linprobe/cifar10_tiny_cpu.yaml")
    assert main(["linprobe", "--config", preset, "--print-config"]) == 2  # the data is the user's to give
    assert "data.train is not set: pass data.train=PATH" in capsys.readouterr().err
    assert main(["linprobe", "--config", preset, "data.train=a", "data.val=b", "--print-config"]) == 0
    assert "lr_grid" in capsys.readouterr().out
    assert main(["finetune", "layer_decay=1.5", "encoder.model_name=milan_test_tiny"]) == 2
    assert "layer_decay" in capsys.readouterr().err
    assert main(["knn", "k=[0]", "encoder.model_name=milan_test_tiny"]) == 2
    assert main(["linprobe", "optim.lars_variant=sgd"]) == 2
    assert "lars_variant" in capsys.readouterr().err
    assert main(["linprobe"]) == 2  # no encoder given
    assert "encoder.pretrained" in capsys.readouterr().err


def test_missing_data_is_a_clean_error(tmp_path, capsys, tiny_encoder_ckpt):
    code = main(["knn", f"encoder.pretrained={tiny_encoder_ckpt}", f"data.train={tmp_path / 'nope'}",
                 f"data.val={tmp_path / 'nope'}", f"out_dir={tmp_path / 'k'}", "runtime.device=cpu"])  # fmt: skip
    assert code == 2 and "data.train" in capsys.readouterr().err
    code = main(["knn", f"encoder.pretrained={tiny_encoder_ckpt}", f"data.train={tmp_path / 'nope'}",
                 f"out_dir={tmp_path / 'k'}", "runtime.device=cpu"])  # fmt: skip
    assert code == 2 and "data.val is not set: pass data.val=PATH" in capsys.readouterr().err


def test_commands_run_on_tiny_presets(tmp_path, cifar, tiny_encoder_ckpt, capsys):
    quick = {"schedule.epochs": 1, "schedule.max_steps": 2, "log.tensorboard": False, "batch_size": 50}
    for job in ("linprobe", "finetune"):
        args = job_overrides(tmp_path / job, tiny_encoder_ckpt, cifar, **quick)
        assert main([job, "--config", str(CONFIGS / job / "cifar10_tiny_cpu.yaml"), *args]) == 0
        result = json.loads((tmp_path / job / "results.json").read_text())
        assert result["job"] == job and result["step"] == 2 and 0 <= result["top1"] <= 100
    args = job_overrides(tmp_path / "knn", tiny_encoder_ckpt, cifar, cache_dir=None, batch_size=100)
    assert main(["knn", "--config", str(CONFIGS / "knn/cifar10_tiny_cpu.yaml"), *args]) == 0
    assert json.loads((tmp_path / "knn" / "results.json").read_text())["k"] == 20
    capsys.readouterr()
    out = tmp_path / "eval.json"
    classifier = tmp_path / "linprobe" / "classifier.pt"
    assert main(["evaluate", "--checkpoint", str(classifier), "--data", str(cifar["val"]), "--device", "cpu",
                 "--num-workers", "0", "--out", str(out)]) == 0  # fmt: skip
    assert "top-1" in capsys.readouterr().out
    assert json.loads(out.read_text())["count"] == 300
    # a linear-probe *training* checkpoint (a grid of heads) evaluates its best head: the one classifier.pt holds
    last = tmp_path / "linprobe" / "checkpoints" / "last.pt"
    out_last = tmp_path / "eval_last.json"
    assert main(["evaluate", "--checkpoint", str(last), "--data", str(cifar["val"]), "--device", "cpu",
                 "--num-workers", "0", "--out", str(out_last)]) == 0  # fmt: skip
    assert json.loads(out_last.read_text())["top1"] == json.loads(out.read_text())["top1"]
    assert capsys.readouterr().err == ""  # everything came from the checkpoints' specs: nothing assumed
