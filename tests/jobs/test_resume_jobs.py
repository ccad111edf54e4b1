"""The classifier jobs share the engine's resume and interruption handling (issue 10 §2, issue 11 §4)."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest

from milan.cli import main
from milan.errors import RunInterrupted
from milan.jobs.linprobe import linprobe
from milan.train.checkpointing import load_training_checkpoint
from milan.train.config import LinprobeConfig, load_config
from tests.jobs.conftest import job_overrides
from tests.train.test_kill_resume import last_step
from tests.train.test_resume import files_of

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
QUICK = {"schedule.epochs": 2, "log.tensorboard": False, "log.plot": False, "batch_size": 50, "eval_every": 1}


def signal_at(metrics: Path, step: int, signum: int) -> threading.Thread:
    """Sends ``signum`` to this process once ``metrics`` records ``step`` (the handler runs in the main thread)."""

    def watch() -> None:
        while last_step(metrics) < step:
            time.sleep(0.002)
        os.kill(os.getpid(), signum)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def test_a_linear_probe_stopped_by_sigterm_resumes_exactly(
    tmp_path: Path, cifar: dict[str, Path], tiny_encoder_ckpt: Path
) -> None:
    """Before: SIGTERM ended the job at once with nothing saved. 2 epochs of 6 steps (300 images, batch 50)."""
    preset = CONFIGS / "linprobe/cifar10_tiny_cpu.yaml"
    data = {**cifar, "train": cifar["train_small"]}
    straight = linprobe(
        load_config(LinprobeConfig, preset, job_overrides(tmp_path / "straight", tiny_encoder_ckpt, data, **QUICK))
    )
    run = tmp_path / "run"
    cfg = load_config(LinprobeConfig, preset, job_overrides(run, tiny_encoder_ckpt, data, **QUICK))
    watcher = signal_at(run / "metrics.jsonl", 2, signal.SIGTERM)
    with pytest.raises(RunInterrupted, match=r"SIGTERM received: stopped after step \d+ \(epoch \d, batch ") as stopped:
        linprobe(cfg)
    watcher.join()
    assert stopped.value.exit_status == 143
    state = load_training_checkpoint(run / "checkpoints" / "last.pt")["state"]
    assert 2 < state["step"] < 12 and state["step"] == 6 * state["epoch"] + state["batch_in_epoch"]
    assert not (run / "results.json").exists()

    assert main(["linprobe", "--resume", "auto", f"out_dir={run}"]) == 0  # the run's own config
    result = json.loads((run / "results.json").read_text())
    assert result["step"] == straight.state.step == 12
    assert result["top1"] == straight.final["top1"] and result["heads"] == straight.summary["heads"]
    a = load_training_checkpoint(run / "checkpoints" / "last.pt")["model"]
    b = load_training_checkpoint(straight.checkpoint)["model"]  # type: ignore[arg-type]
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)  # bit-identical

    before = files_of(run)
    assert main(["linprobe", "--resume", "auto", f"out_dir={run}"]) == 0  # finished: nothing to do
    assert files_of(run) == before
    again = linprobe(cfg, resume="auto")
    assert again.summary == result and again.state.step == 12 and again.final["top1"] == result["top1"]
