"""SIGTERM (preemption) and SIGINT (Ctrl-C) at a random step: the step finishes, a resumable checkpoint is written,
one line is printed, the exit status is 143 / 130; ``--resume auto`` then ends bit-identical to an uninterrupted run.

The signal is sent when ``metrics.jsonl`` reaches a chosen step (a record per step), not after a sleep. The 2-process
(gloo) version is in ``tests/test_distributed.py``.
"""

from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from milan.cli import main as cli
from milan.jobs.pretrain import pretrain
from milan.train.checkpointing import load_training_checkpoint
from milan.train.logging import read_metrics
from milan.train.loop import protect_workers
from tests.train.conftest import assert_same_weights, student_state, tiny_config, tiny_overrides
from tests.train.test_kill_resume import last_step

REPO = Path(__file__).resolve().parents[2]
SETTINGS: dict[str, object] = {"batch_size": 1, "schedule.epochs": 4}  # 16 steps per epoch, 64 in all


def signal_at_step(cmd: list[str], metrics: Path, step: int, signum: int) -> subprocess.CompletedProcess[str]:
    """Runs ``cmd``, sends ``signum`` once ``metrics`` records ``step``, and waits for the process to end."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        while last_step(metrics) < step:
            assert proc.poll() is None, f"the run ended before step {step}: {proc.communicate()}"
            time.sleep(0.002)
        proc.send_signal(signum)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory, image_dir: Path) -> Path:
    run = tmp_path_factory.mktemp("straight") / "run"
    summary = pretrain(tiny_config(run, image_dir, SETTINGS))
    assert summary.state.step == 64 and summary.checkpoint is not None
    return summary.checkpoint


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_saves_the_step_and_resume_auto_is_exact(
    tmp_path: Path, image_dir: Path, uninterrupted: Path, signum: signal.Signals
) -> None:
    """Before: SIGTERM ended the process at once, silently, with nothing saved (status -15); SIGINT printed a
    72-line ``KeyboardInterrupt`` traceback and saved nothing."""
    at = random.randint(2, 12)  # in the first epoch, so that the stop is (almost always) mid-epoch
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "milan", "pretrain", *tiny_overrides(run, image_dir, SETTINGS)]
    done = signal_at_step(cmd, run / "metrics.jsonl", at, signum)
    assert done.returncode == 128 + signum, (at, done.stderr[-2000:])
    assert done.stderr == ""  # no traceback
    last = run / "checkpoints" / "last.pt"
    line = done.stdout.splitlines()[-1]
    m = re.fullmatch(
        rf"{signum.name} received: stopped after step (\d+) \(epoch (\d), batch (\d+)/16\); saved {last}; continue "
        "with --resume auto",
        line,
    )
    assert m is not None, line
    step, epoch, batch = (int(g) for g in m.groups())
    state = load_training_checkpoint(last)["state"]
    assert at <= step < 64 and state == {"epoch": epoch, "step": step, "batch_in_epoch": batch, "images_seen": step}
    assert step == epoch * 16 + batch and step > at  # the step under way when the signal came, finished

    assert cli(["pretrain", "--resume", "auto", f"out_dir={run}"]) == 0  # the run's own config
    assert load_training_checkpoint(last)["state"]["step"] == 64
    assert_same_weights(student_state(last), student_state(uninterrupted))  # bit-identical
    assert [r["step"] for r in read_metrics(run / "metrics.jsonl")] == list(range(1, 65))


SECOND_SIGNAL = """
import os, signal, time
from milan.train.loop import StopRequest, stop_on_signals

before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
stop = StopRequest()
with stop_on_signals(stop):
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(0.1)
print("requested", stop.signum, flush=True)
assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before  # restored

signal.signal(signal.SIGINT, signal.SIG_IGN)  # e.g. a background job: an ignored signal stays ignored
ignored = StopRequest()
with stop_on_signals(ignored):
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(0.1)
print("ignored", ignored.signum, flush=True)

signal.signal(signal.SIGINT, signal.default_int_handler)
again = StopRequest()
with stop_on_signals(again):
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(0.1)
    os.kill(os.getpid(), signal.SIGINT)  # the second signal: out at once
    time.sleep(30)
print("not reached")
"""


def test_a_second_signal_exits_at_once() -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", SECOND_SIGNAL], env=env, capture_output=True, text=True, timeout=60)
    assert done.stdout.split("\n") == ["requested 15", "ignored 0", ""]
    assert done.returncode == 130 and done.stderr.strip() == "second SIGINT: exiting at once without saving"


class SignalsItself(torch.utils.data.Dataset[int]):
    """A dataset whose worker gets SIGTERM and SIGINT while loading (as from a cluster or a terminal's Ctrl-C)."""

    def __len__(self) -> int:
        return 4

    def __getitem__(self, i: int) -> int:
        if i == 1:
            os.kill(os.getpid(), signal.SIGTERM)
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)
        return i


def test_data_loader_workers_outlive_the_stop_signals() -> None:
    """The main process finishes its step and saves; a worker killed by the signal would make the loader raise."""
    loader = torch.utils.data.DataLoader(SignalsItself(), batch_size=1, num_workers=1)
    protect_workers(loader)
    protect_workers(loader)  # once is enough
    assert [int(b) for b in loader] == [0, 1, 2, 3]


def test_the_collective_timeout_is_a_config_key(monkeypatch: pytest.MonkeyPatch, image_dir: Path) -> None:
    """A frozen process makes the others wait this long (torch's default: 1,800 s)."""
    import torch.distributed as tdist

    from milan import distributed as dist

    seen = {}

    def init_process_group(backend: str, timeout: object, **kwargs: object) -> None:
        seen.update(backend=backend, timeout=timeout)
        raise RuntimeError("stop here")

    monkeypatch.setattr(tdist, "init_process_group", init_process_group)
    monkeypatch.setenv("WORLD_SIZE", "2")
    cfg = tiny_config(Path("unused"), image_dir, {"runtime.dist_timeout_s": 7.5})
    with pytest.raises(RuntimeError, match="stop here"):
        pretrain(cfg)
    assert seen["backend"] == "gloo" and seen["timeout"].total_seconds() == 7.5  # type: ignore[attr-defined]
    assert tiny_config(Path("unused"), image_dir).runtime.dist_timeout_s == 600.0
    assert not dist.is_enabled()
