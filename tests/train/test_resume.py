"""``--resume`` rebuilds the run from the config stored in its checkpoint (issue 10 §2).

``--config`` is optional, overrides apply on top (before or after ``--resume``) and are printed as changes, a finished
run resumed changes no file, and the throughput counts only the images of the launch.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from milan.cli import main as cli
from milan.jobs.pretrain import pretrain
from milan.train.checkpointing import load_training_checkpoint
from milan.train.config import PretrainConfig, load_config
from milan.train.logging import read_metrics
from tests.train.conftest import assert_same_weights, student_state, tiny_config, tiny_overrides

REPO = Path(__file__).resolve().parents[2]
DEMO = str(REPO / "configs/pretrain/demo_cpu.yaml")


def files_of(run: Path) -> dict[str, tuple[bytes, int]]:
    """Every file of a run folder: contents and modification time."""
    files = (p for p in run.rglob("*") if p.is_file() and p.name != ".lock")  # the lock: who holds the folder now
    return {str(p.relative_to(run)): (p.read_bytes(), p.stat().st_mtime_ns) for p in files}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory, image_dir: Path) -> Path:
    """A tiny 2-epoch run (8 steps), complete."""
    run = tmp_path_factory.mktemp("finished") / "run"
    assert cli(["pretrain", *tiny_overrides(run, image_dir)]) == 0
    return run


def test_resume_auto_without_config_takes_the_stored_config_and_prints_the_changes(
    tmp_path: Path, finished_run: Path, image_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Before: without --config the default ViT-B on builtin:samples was built ("fewer than batch_size=256")."""
    run = tmp_path / "run"
    assert cli(["pretrain", *tiny_overrides(run, image_dir, {"schedule.max_steps": 3})]) == 0
    capsys.readouterr()
    assert cli(["pretrain", "--resume", "auto", f"out_dir={run}", "schedule.max_steps=null"]) == 0
    out = capsys.readouterr().out
    assert f"resuming {run} from {run / 'checkpoints' / 'last.pt'} (epoch 0, step 3) with its stored config" in out
    assert "changed: schedule.max_steps: 3 -> null" in out
    assert "epoch 2/2, step 8, final loss" in out
    cfg = load_config(PretrainConfig, run / "config.yaml")
    assert cfg.model_name == "milan_test_tiny" and cfg.data.path == str(image_dir) and cfg.schedule.max_steps is None
    assert_same_weights(
        student_state(run / "checkpoints" / "last.pt"), student_state(finished_run / "checkpoints/last.pt")
    )


def test_a_run_of_an_older_version_resumes_without_its_retired_restore_order_key(
    tmp_path: Path, image_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Checkpoints of versions before issue 12 store model.restore_order, no longer a config key."""
    from milan.checkpoint import atomic_save

    run = tmp_path / "run"
    assert cli(["pretrain", *tiny_overrides(run, image_dir, {"schedule.max_steps": 3})]) == 0
    last = run / "checkpoints" / "last.pt"
    ckpt = load_training_checkpoint(last)
    ckpt["config"]["model"]["restore_order"] = False
    atomic_save(ckpt, last)
    capsys.readouterr()
    assert cli(["pretrain", "--resume", "auto", f"out_dir={run}", "schedule.max_steps=4"]) == 0
    assert "epoch 1/2, step 4, final loss" in capsys.readouterr().out


def test_overrides_before_and_after_resume(
    tmp_path: Path, finished_run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Before: ``a=1 --resume X b=2`` stopped with "unrecognized arguments: b=2"."""
    args = ["pretrain", "schedule.epochs=3", "--resume", str(finished_run), "log.every_steps=2", "--print-config"]
    assert cli(args) == 0
    captured = capsys.readouterr()
    printed = yaml.safe_load(captured.out)  # only the config on stdout; the notes go to stderr
    assert printed["schedule"]["epochs"] == 3 and printed["log"]["every_steps"] == 2
    assert printed["model_name"] == "milan_test_tiny" and printed["out_dir"] == str(finished_run)
    assert "changed: schedule.epochs: 2 -> 3, log.every_steps: 1 -> 2" in captured.err


def test_resume_file_without_config_continues_in_its_run_folder(
    tmp_path: Path, finished_run: Path, image_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Before: the default ViT-B was built and failed late (an optimizer-state or data error)."""
    run = tmp_path / "run"
    assert cli(["pretrain", *tiny_overrides(run, image_dir)]) == 0
    epoch_1 = run / "checkpoints" / "epoch_0001.pt"
    assert cli(["pretrain", "--resume", str(epoch_1)]) == 0  # back to the end of epoch 1, then on to the end again
    out = capsys.readouterr().out
    assert f"resuming {run} from {epoch_1} (epoch 1, step 4)" in out and f"milan pretrain -> {run} " in out
    assert load_training_checkpoint(run / "checkpoints" / "last.pt")["state"]["step"] == 8
    assert_same_weights(
        student_state(run / "checkpoints" / "last.pt"), student_state(finished_run / "checkpoints/last.pt")
    )
    assert [r["step"] for r in read_metrics(run / "metrics.jsonl")] == list(range(1, 9))


def test_a_finished_run_resumed_changes_no_file(
    tmp_path: Path, image_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Before: a no-op ``--resume auto`` with the demo preset rewrote config.yaml with the preset's values (and here
    went on training the preset's 160 epochs), and appended ``"final_loss": null`` summaries to metrics.jsonl."""
    run = tmp_path / "demo"
    settings = [f"data.path={image_dir}", "batch_size=8", "schedule.epochs=2", "schedule.warmup_epochs=1",
                "data.num_workers=0", "log.progress=false", "log.tensorboard=false", "log.plot=false"]  # fmt: skip
    assert cli(["pretrain", "--config", DEMO, f"out_dir={run}", *settings]) == 0
    before = files_of(run)
    capsys.readouterr()
    assert cli(["pretrain", "--config", DEMO, "--resume", "auto", f"out_dir={run}"]) == 0
    out = capsys.readouterr().out
    assert f"run {run} is finished (epoch 2/2, step 4;" in out and "nothing to do, no file was changed" in out
    assert "--config" in out and "not used for the resumed run" in out and "batch_size" in out
    assert files_of(run) == before
    assert cli(["pretrain", "--resume", "auto", f"out_dir={run}"]) == 0  # the same without --config
    assert files_of(run) == before
    summary = pretrain(tiny_config(tmp_path / "api", image_dir))
    again = pretrain(tiny_config(tmp_path / "api", image_dir), resume="auto")  # the Python API: the same
    assert again.state == summary.state and again.images_per_second == 0.0


def test_the_throughput_counts_only_this_launch(
    tmp_path: Path, image_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Before: "done: 32 images ..." after a launch that trained 8 of them (the run's total, over this launch's
    time)."""
    run = tmp_path / "run"
    pretrain(tiny_config(run, image_dir, {"schedule.max_steps": 6}))
    capsys.readouterr()
    resumed = pretrain(tiny_config(run, image_dir), resume="auto")
    out = capsys.readouterr().out
    assert resumed.state.images_seen == 32
    assert resumed.images_per_second * resumed.wall_time == pytest.approx(8.0)  # steps 7 and 8, 4 images each
    assert "done: 8 images in" in out and "; 32 since the run began)" in out


def test_resume_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    assert cli(["pretrain", "--resume", str(empty)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "has no checkpoint to resume and no config.yaml; pass --config FILE" in err
    assert cli(["pretrain", "--resume", str(tmp_path / "missing.pt")]) == 2
    assert "checkpoint not found" in capsys.readouterr().err
    assert cli(["pretrain", "--resume", str(empty), f"out_dir={tmp_path / 'other'}"]) == 2
    assert "name two different run folders" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("job", "dropped"),
    [
        ("finetune", ["log.plot", "data.draft", "runtime.strategy", "runtime.teacher_dtype"]),
        ("linprobe", ["optim.betas", "runtime.compile", "runtime.strategy"]),
    ],
)
def test_keys_an_older_version_stored_are_dropped_on_resume_with_one_note(
    tmp_path: Path, job: str, dropped: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    """Before: a linear probe or fine-tuning run started before the config split (each job only the keys it uses)
    could not resume: "unknown config key 'log.plot'" (and 'optim.betas', 'runtime.strategy' ...)."""
    from milan.checkpoint import atomic_save
    from milan.jobs.config import JOBS
    from milan.train.config import to_dict

    data = ["encoder.model_name=milan_test_tiny", "data.train=t", "data.val=v"]
    stored = to_dict(load_config(JOBS[job], overrides=[f"out_dir={tmp_path / 'run'}", *data]))
    old = {"log.plot": True, "data.draft": False, "optim.betas": [0.9, 0.95], "runtime.compile": False,
           "runtime.strategy": "ddp", "runtime.teacher_dtype": "auto"}  # fmt: skip
    for key in dropped:
        section, name = key.split(".")
        stored[section][name] = old[key]
    last = tmp_path / "run" / "checkpoints" / "last.pt"
    last.parent.mkdir(parents=True)
    state = {"epoch": 1, "step": 4, "batch_in_epoch": 0, "images_seen": 16}
    atomic_save({"format": "milan-train", "model": {}, "optimizer": {}, "state": state, "config": stored}, last)
    assert cli([job, "--resume", str(last), "--print-config"]) == 0
    out, err = capsys.readouterr()
    notes = [line for line in err.splitlines() if "no longer has" in line]
    assert notes == [f"the stored config holds keys this version no longer has; dropped: {', '.join(dropped)}"]
    assert yaml.safe_load(out)["encoder"]["model_name"] == "milan_test_tiny"
    if job == "finetune":  # a key is dropped only where the job lacks it: fine-tuning's AdamW keeps its betas
        stored["optim"]["betas"] = [0.9, 0.5]
        atomic_save({"format": "milan-train", "model": {}, "optimizer": {}, "state": state, "config": stored}, last)
        assert cli([job, "--resume", str(last), "--print-config"]) == 0
        out, err = capsys.readouterr()
        assert yaml.safe_load(out)["optim"]["betas"] == [0.9, 0.5] and "optim.betas" not in err
