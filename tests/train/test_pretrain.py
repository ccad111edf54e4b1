from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import torch

import milan.jobs.pretrain as pretrain_module
from milan.cli import main as cli
from milan.jobs.pretrain import pretrain, teacher_compute_dtype
from milan.train.checkpointing import load_training_checkpoint
from milan.train.config import ConfigError, PretrainConfig, load_config
from milan.train.logging import read_metrics
from milan.train.loop import NonFiniteLossError, StepOutput
from tests.data.conftest import BOMB_LIMIT, bad_images, good_images, write_files
from tests.train.conftest import assert_same_weights, student_state, tiny_config, tiny_overrides

REPO = Path(__file__).resolve().parents[2]


def test_cli_run_writes_the_run_folder(tmp_path: Path, image_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    assert cli(["pretrain", *tiny_overrides(run, image_dir)]) == 0
    out = capsys.readouterr().out
    assert "WARNING: no model.teacher.checkpoint given" in out and "smoke test" in out
    assert "peak lr 0.001" in out and "effective 4" in out
    assert "done: 32 images" in out and "skipped 0 of 32 images" in out and str(run / "checkpoints" / "last.pt") in out
    names = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert names == ["epoch_0001.pt", "epoch_0002.pt", "last.prev.pt", "last.pt"]
    cfg = load_config(PretrainConfig, run / "config.yaml")
    assert cfg.model.encoder.img_size == 32 and cfg.out_dir == str(run)
    ckpt = load_training_checkpoint(run / "checkpoints" / "last.pt")
    assert ckpt["state"] == {"epoch": 2, "step": 8, "batch_in_epoch": 0, "images_seen": 32}
    assert ckpt["config"]["model"]["encoder"]["img_size"] == 32  # the resolved config travels with the weights
    assert all(k.startswith(("encoder.", "decoder.")) for k in ckpt["model"])
    assert "teacher" in ckpt  # a random teacher is kept so that a resume is exact
    train = read_metrics(run / "metrics.jsonl")
    assert [r["step"] for r in train] == list(range(1, 9))
    assert {"loss", "lr", "img_per_s", "data_time", "step_time", "data_wait", "skipped", "epoch"} <= set(train[0])
    epochs = read_metrics(run / "metrics.jsonl", "epoch")
    assert [r["epoch"] for r in epochs] == [1, 2] and epochs[0]["data"]["seen"] == 16
    (summary,) = read_metrics(run / "metrics.jsonl", "summary")
    assert summary["images_seen"] == 32 and summary["step"] == 8


def test_numbered_copies_follow_checkpoint_every_epochs(tmp_path: Path, image_dir: Path) -> None:
    run = tmp_path / "run"
    pretrain(tiny_config(run, image_dir, {"schedule.epochs": 5, "checkpoint.every_epochs": 2, "checkpoint.keep": 3}))
    names = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert names == ["epoch_0002.pt", "epoch_0004.pt", "last.prev.pt", "last.pt"]  # epochs 1, 3 and 5: last.pt only
    assert load_training_checkpoint(run / "checkpoints" / "last.pt")["state"]["epoch"] == 5


def test_a_second_run_never_overwrites_and_resume_auto_continues(tmp_path: Path, image_dir: Path) -> None:
    run = tmp_path / "run"
    first = pretrain(tiny_config(run, image_dir, {"schedule.max_steps": 3}))
    assert first.run_dir == run and first.state.step == 3
    second = pretrain(tiny_config(run, image_dir, {"schedule.max_steps": 2}))
    assert second.run_dir == tmp_path / "run-2"
    resumed = pretrain(tiny_config(run, image_dir), resume="auto")  # continues run/ to the end of the schedule
    assert resumed.run_dir == run and resumed.state.step == 8 and resumed.state.images_seen == 32
    uninterrupted = pretrain(tiny_config(tmp_path / "straight", image_dir))
    assert_same_weights(student_state(run / "checkpoints" / "last.pt"), student_state(uninterrupted.checkpoint))
    train = read_metrics(run / "metrics.jsonl")
    assert [r["step"] for r in train] == list(range(1, 9))  # one record per step despite the two launches
    again = pretrain(tiny_config(run, image_dir), resume="auto")  # finished: nothing to do
    assert again.state.step == 8
    assert_same_weights(student_state(run / "checkpoints" / "last.pt"), student_state(uninterrupted.checkpoint))


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(
    tmp_path: Path, image_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_loss = pretrain_module.milan_loss
    calls = {"n": 0}

    def poisoned(*args: Any, **kwargs: Any) -> StepOutput:
        calls["n"] += 1
        out = real_loss(*args, **kwargs)
        return out._replace(loss=out.loss * float("nan")) if calls["n"] == 4 else out

    monkeypatch.setattr(pretrain_module, "milan_loss", poisoned)
    run = tmp_path / "run"
    cfg = tiny_config(run, image_dir, {"checkpoint.every_steps": 2, "checkpoint.every_epochs": 0})
    last = run / "checkpoints" / "last.pt"
    with pytest.raises(
        NonFiniteLossError, match=rf"optimizer step 3; .* updated \(the last checkpoint, {last} \(step 2\)"
    ):
        pretrain(cfg)
    ckpt = load_training_checkpoint(last)
    assert ckpt["state"]["step"] == 2  # the save at step 2 is intact; nothing was written after the NaN
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values())


def test_non_finite_loss_before_any_checkpoint_does_not_claim_one(
    tmp_path: Path, image_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Before: "(the last checkpoint is intact)" although none had been written."""
    real_loss = pretrain_module.milan_loss

    def poisoned(*args: Any, **kwargs: Any) -> StepOutput:
        return real_loss(*args, **kwargs)._replace(loss=torch.tensor(float("inf"), requires_grad=True))

    monkeypatch.setattr(pretrain_module, "milan_loss", poisoned)
    assert cli(["pretrain", *tiny_overrides(tmp_path / "cli", image_dir)]) == 1  # the CLI exits with status 1
    err = capsys.readouterr().err
    assert err.startswith(
        "milan pretrain: error: non-finite loss inf at optimizer step 0; stopping before the weights are "
    )
    assert "(no checkpoint has been written yet)" in err and "intact" not in err and err.count("\n") == 1
    assert not (tmp_path / "cli" / "checkpoints").exists() or not any((tmp_path / "cli" / "checkpoints").iterdir())


def test_bad_inputs_are_skipped_counted_and_reported(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "mixed"
    write_files(data, {name: blob for name, (blob, _, _) in good_images().items()})
    write_files(data, {name: blob for name, (blob, _) in bad_images().items()})
    write_files(data, {"notes.txt": b"not an image"})
    expected = Counter(reason for _, reason in bad_images().values())
    total = len(good_images()) + len(bad_images())
    cfg = tiny_config(
        tmp_path / "run", data, {"schedule.epochs": 1, "data.max_image_pixels": BOMB_LIMIT, "batch_size": 2}
    )
    summary = pretrain(cfg)
    assert summary.state.images_seen == len(good_images())
    (epoch,) = read_metrics(tmp_path / "run" / "metrics.jsonl", "epoch")
    assert epoch["data"]["seen"] == total and epoch["data"]["skipped"] == len(bad_images())
    assert epoch["data"]["reasons"] == dict(expected)
    out = capsys.readouterr().out
    assert f"skipped {len(bad_images())} of {total} images" in out
    print(f"\nbad-input run: {out.strip().splitlines()[-1]}")


def test_empty_or_missing_data_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "empty").mkdir()
    assert cli(["pretrain", *tiny_overrides(tmp_path / "a", tmp_path / "empty")]) == 2
    assert "no image files found" in capsys.readouterr().err
    assert cli(["pretrain", *tiny_overrides(tmp_path / "b", tmp_path / "missing")]) == 2
    assert "data.path=" in capsys.readouterr().err
    assert cli(["pretrain", *tiny_overrides(tmp_path / "c", tmp_path / "empty"), "optim.betas=[0.9]"]) == 2
    assert "'optim.betas'" in capsys.readouterr().err


def test_demo_preset_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "demo"
    args = ["pretrain", "--config", str(REPO / "configs/pretrain/demo_cpu.yaml"), f"out_dir={run}"]
    assert cli([*args, "schedule.max_steps=3"]) == 0
    out = capsys.readouterr().out
    assert "step 3/3" in out and "eta" in out and "done: 48 images" in out and "plot" in out
    assert (run / "plot.png").stat().st_size > 10_000
    assert any((run / "tb").iterdir())  # TensorBoard events
    assert (run / "checkpoints" / "last.pt").is_file()
    assert cli([*args, "--print-config"]) == 0
    printed = capsys.readouterr().out
    assert "model_name: milan_demo_small" in printed and "path: builtin:samples" in printed


def test_plot_cli(tmp_path: Path) -> None:
    records = [
        {"event": "train", "step": s, "epoch": s / 4, "loss": 1 / s, "lr": 1e-3, "img_per_s": 100.0}
        for s in range(1, 9)
    ]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records) + "{broken\n")
    assert cli(["plot", str(tmp_path), "--out", str(tmp_path / "p.png")]) == 0
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    (tmp_path / "e").mkdir()
    (tmp_path / "e" / "metrics.jsonl").write_text("")
    assert cli(["plot", str(tmp_path / "e")]) == 1
    assert cli(["plot", str(tmp_path / "nothing")]) == 2


def test_a_teacher_checkpoint_is_loaded_frozen_and_not_saved(
    tmp_path: Path, image_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from milan.models import clip_vision_tower

    tower = clip_vision_tower(img_size=32, patch_size=8, width=128, depth=2, num_heads=2, out_dim=32)
    torch.save(tower.state_dict(), tmp_path / "teacher.pt")
    run = tmp_path / "run"
    summary = pretrain(
        tiny_config(run, image_dir, {"model.teacher.checkpoint": tmp_path / "teacher.pt", "schedule.max_steps": 2})
    )
    assert summary.state.step == 2
    assert "RANDOMLY" not in capsys.readouterr().out
    ckpt = load_training_checkpoint(run / "checkpoints" / "last.pt")
    assert "teacher" not in ckpt  # real teachers are loaded from their own file on resume
    assert ckpt["config"]["model"]["teacher"]["checkpoint"] == str(tmp_path / "teacher.pt")
    # ... and rebuilt as the run built them (its exact architecture is stored)
    from milan.checkpoint import describe_tower, load_milan, load_teacher

    used = load_teacher(tmp_path / "teacher.pt")
    assert ckpt["teacher_spec"] == describe_tower(used.model).to_dict()
    rebuilt = load_milan(run / "checkpoints" / "last.pt").teacher
    images = torch.randn(2, 3, 32, 32)
    assert rebuilt is not None and torch.equal(rebuilt(images).features, used(images).features)


def test_tar_shards_through_webdataset(tmp_path: Path, image_dir: Path) -> None:
    pytest.importorskip("webdataset")
    import tarfile

    with tarfile.open(tmp_path / "train-000.tar", "w") as tar:
        for i, path in enumerate(sorted(image_dir.iterdir())):
            tar.add(path, arcname=f"sample{i:04d}.jpg")
    summary = pretrain(tiny_config(tmp_path / "run", tmp_path / "train-000.tar", {"data.num_samples": 16}))
    assert summary.state.step == 8 and summary.state.images_seen == 32
    with pytest.raises(ConfigError, match=r"data\.num_samples is required"):
        pretrain(tiny_config(tmp_path / "run2", tmp_path / "train-000.tar"))


def _failing_backend(gm: torch.fx.GraphModule, example_inputs: list[torch.Tensor]) -> Any:
    raise RuntimeError("inductor: no C++ compiler")


def test_compile_failure_falls_back_to_eager(
    tmp_path: Path, image_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """runtime.compile goes through milan.models.compile: real dynamo tracing with a backend that fails (as inductor
    does without a C++ compiler) warns once per compiled function, runs eagerly, and trains exactly like eager."""
    real_compile = torch.compile
    calls: list[tuple[str, str | None]] = []

    def compile_with_failing_backend(fn: Any, **kwargs: Any) -> Any:
        calls.append((getattr(fn, "__qualname__", "?"), kwargs.pop("mode", None)))
        return real_compile(fn, **{**kwargs, "backend": _failing_backend})

    monkeypatch.setattr(torch, "compile", compile_with_failing_backend)
    settings: dict[str, object] = {"schedule.max_steps": 2, "checkpoint.every_epochs": 0}
    compiled = {**settings, "runtime.compile": True, "runtime.compile_teacher": True}
    mode = compiled["runtime.compile_mode"] = "max-autotune-no-cudagraphs"
    with pytest.warns(RuntimeWarning, match="running it eagerly") as record:
        summary = pretrain(tiny_config(tmp_path / "compiled", image_dir, compiled))
    assert summary.state.step == 2
    assert calls == [("MaskedStudent.forward", mode), ("Teacher._forward", mode)]
    warned = [str(w.message) for w in record if "torch.compile of" in str(w.message)]
    assert len(warned) == 2  # once for each, not once per step
    assert warned[0].startswith("torch.compile of Teacher._forward failed")  # the teacher runs first in a step
    assert warned[1].startswith("torch.compile of MaskedStudent.forward failed")
    assert all("no C++ compiler" in w for w in warned)
    assert f"speed options: compile student + teacher, mode {mode}; fused AdamW" in capsys.readouterr().out
    eager = pretrain(tiny_config(tmp_path / "eager", image_dir, settings))
    losses = [[r["loss"] for r in read_metrics(s.run_dir / "metrics.jsonl")] for s in (summary, eager)]
    assert len(losses[0]) == 2 and losses[0] == losses[1]
    assert_same_weights(student_state(summary.checkpoint), student_state(eager.checkpoint))


def test_activation_checkpointing_gives_the_same_training(tmp_path: Path, image_dir: Path) -> None:
    settings: dict[str, object] = {"schedule.max_steps": 3, "checkpoint.every_epochs": 0}
    plain = pretrain(tiny_config(tmp_path / "a", image_dir, settings))
    ckpt = pretrain(tiny_config(tmp_path / "b", image_dir, {**settings, "runtime.grad_checkpointing": True}))
    assert_same_weights(student_state(plain.checkpoint), student_state(ckpt.checkpoint), atol=1e-6)


@pytest.mark.filterwarnings("ignore:CUDA is not available")
def test_teacher_dtype_resolution() -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    bf16, fp16, fp32 = torch.bfloat16, torch.float16, torch.float32
    assert teacher_compute_dtype("auto", cpu, fp32) == fp32  # CPU: no change
    assert teacher_compute_dtype("auto", cuda, bf16) == bf16 and teacher_compute_dtype("auto", cuda, fp16) == fp16
    assert teacher_compute_dtype("auto", cuda, fp32) == fp32
    assert teacher_compute_dtype("fp32", cuda, bf16) == fp32  # fp32 weights under the run's autocast
    assert teacher_compute_dtype("bf16", cpu, fp32) == bf16 and teacher_compute_dtype("fp16", cpu, fp32) == fp16


def test_bf16_teacher_on_cpu_and_exact_resume(
    tmp_path: Path, image_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """runtime.teacher_dtype=bf16 on CPU: the teacher computes in bf16 while the student and its AdamW state stay
    fp32; checkpoints keep the random teacher in fp32 (restored, then cast), so a resumed run is bit-identical to an
    uninterrupted one."""
    models: list[Any] = []  # the model of each run, in order
    real_loss = pretrain_module.milan_loss

    def spy(batch: Any, model: Any, *args: Any, **kwargs: Any) -> Any:
        if not models or models[-1] is not model:
            models.append(model)
        return real_loss(batch, model, *args, **kwargs)

    monkeypatch.setattr(pretrain_module, "milan_loss", spy)
    bf16: dict[str, object] = {"runtime.teacher_dtype": "bf16", "checkpoint.every_epochs": 0}
    run = tmp_path / "run"
    first = pretrain(tiny_config(run, image_dir, {**bf16, "schedule.max_steps": 3}))  # stops mid-epoch
    assert "(cpu, float32, 1 process(es), teacher bfloat16)" in capsys.readouterr().out
    teacher, student = models[0].teacher, models[0].student
    assert teacher.compute_dtype == torch.bfloat16 and all(p.dtype == torch.bfloat16 for p in teacher.parameters())
    assert all(p.dtype == torch.float32 for p in student.parameters())
    ckpt = load_training_checkpoint(first.checkpoint)
    assert all(v.dtype == torch.float32 for v in ckpt["teacher"].values())
    assert all(s["exp_avg"].dtype == torch.float32 for s in ckpt["optimizer"]["state"].values())

    resumed = pretrain(tiny_config(run, image_dir, bf16), resume="auto")
    assert resumed.state.step == 8 and models[1].teacher.compute_dtype == torch.bfloat16
    for name, value in models[1].teacher.state_dict().items():
        assert torch.equal(value, teacher.state_dict()[name]), name
    straight = pretrain(tiny_config(tmp_path / "straight", image_dir, bf16))
    assert_same_weights(student_state(run / "checkpoints" / "last.pt"), student_state(straight.checkpoint))
    fp32 = pretrain(tiny_config(tmp_path / "fp32", image_dir, {"checkpoint.every_epochs": 0}))
    assert models[3].teacher.compute_dtype is None  # auto on CPU: the fp32 teacher, unchanged
    assert_same_weights(load_training_checkpoint(straight.checkpoint)["teacher"], ckpt["teacher"])
    assert_same_weights(load_training_checkpoint(fp32.checkpoint)["teacher"], ckpt["teacher"])
    losses = [[r["loss"] for r in read_metrics(s.run_dir / "metrics.jsonl")] for s in (straight, fp32)]
    assert losses[0] != losses[1] and losses[0] == pytest.approx(losses[1], abs=1e-2)  # bf16 targets: close, not equal
