"""A run killed with SIGKILL in mid-epoch and resumed with ``--resume auto`` ends with the uninterrupted weights."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from milan.jobs.pretrain import pretrain
from milan.train.checkpointing import Checkpointer
from tests.train.conftest import assert_same_weights, student_state, tiny_config, tiny_overrides

REPO = Path(__file__).resolve().parents[2]
# 16 images, batch 1: 16 steps per epoch, 4 epochs. A checkpoint after every step makes the kill land between (or
# during) atomic checkpoint writes.
SETTINGS: dict[str, object] = {"batch_size": 1, "schedule.epochs": 4, "checkpoint.every_steps": 1}


def last_step(metrics: Path) -> int:
    if not metrics.is_file():
        return 0
    steps = [0]
    for line in metrics.read_text().splitlines():
        with contextlib.suppress(json.JSONDecodeError, ValueError):  # a line cut short by the kill
            steps.append(int(json.loads(line).get("step", 0)))
    return max(steps)


@pytest.mark.parametrize("teacher_dtype", ["auto", "bf16"])  # bf16: the random teacher is restored in fp32, then cast
def test_sigkill_mid_epoch_then_resume_auto_matches_uninterrupted(
    tmp_path: Path, image_dir: Path, teacher_dtype: str
) -> None:
    settings = {**SETTINGS, "runtime.teacher_dtype": teacher_dtype}
    run = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "milan", "pretrain", *tiny_overrides(run, image_dir, settings)],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        while last_step(run / "metrics.jsonl") < 5:  # well inside the first 16-step epoch
            assert proc.poll() is None, f"the run ended before it could be killed: {proc.stderr.read()!r}"  # type: ignore[union-attr]
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    found, _ = Checkpointer(run).scan()
    assert found is not None
    killed_at = found[1]["state"]
    assert 0 < killed_at["batch_in_epoch"] < 16 and killed_at["epoch"] == 0  # a mid-epoch position

    quiet = {**settings, "checkpoint.every_steps": 0}  # checkpoint frequency does not change the training
    resumed = pretrain(tiny_config(run, image_dir, quiet), resume="auto")
    assert resumed.state.step == 64 and resumed.state.images_seen == 64
    straight = pretrain(tiny_config(tmp_path / "straight", image_dir, quiet))
    assert_same_weights(student_state(run / "checkpoints" / "last.pt"), student_state(straight.checkpoint))
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["event"] == "train"] == list(range(1, 65))
