"""Run folders under misuse and faults (issue 11 §3, §5): one line, a non-zero exit, nothing already saved is lost.

A lock held for the run's lifetime, damaged or unsafe checkpoints under ``--resume auto``, a folder named
``last.pt``, temporary files left by a kill, a full disk, a read-only output folder.
"""

from __future__ import annotations

import errno
import os
import pickle
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from milan.cli import main as cli
from milan.jobs.pretrain import pretrain
from milan.train.checkpointing import load_training_checkpoint
from milan.train.logging import read_metrics
from milan.train.run import RunFolderError
from tests.train.conftest import tiny_config, tiny_overrides
from tests.train.test_checkpointing import enospc_save
from tests.train.test_resume import files_of

REPO = Path(__file__).resolve().parents[2]
HOLD_LOCK = """
import sys, time
from pathlib import Path
from milan.train.run import RunLock
Path(sys.argv[1]).mkdir(parents=True, exist_ok=True)
assert RunLock(Path(sys.argv[1])).acquire()
print("locked", flush=True)
time.sleep(120)
"""


@pytest.fixture(scope="module")
def done_run(tmp_path_factory: pytest.TempPathFactory, image_dir: Path) -> Path:
    """A complete tiny run: 2 epochs of 4 steps, checkpoints at steps 4 and 8."""
    run = tmp_path_factory.mktemp("done") / "run"
    assert cli(["pretrain", *tiny_overrides(run, image_dir)]) == 0
    return run


@pytest.fixture
def run(tmp_path: Path, done_run: Path) -> Path:
    """A copy of the complete run, to damage."""
    copy = tmp_path / "run"
    shutil.copytree(done_run, copy)
    return copy


@pytest.fixture
def lock_holder(tmp_path: Path) -> Iterator[Any]:
    """Starts a process that locks a folder (as a running job does); yields ``start(folder) -> Popen``."""
    procs: list[subprocess.Popen[str]] = []

    def start(folder: Path) -> subprocess.Popen[str]:
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        proc = subprocess.Popen(
            [sys.executable, "-c", HOLD_LOCK, str(folder)], env=env, stdout=subprocess.PIPE, text=True
        )
        procs.append(proc)
        assert proc.stdout is not None and proc.stdout.readline().strip() == "locked"
        return proc

    yield start
    for proc in procs:
        proc.kill()
        proc.wait()


def test_a_run_folder_in_use_is_not_run_twice(
    run: Path, image_dir: Path, lock_holder: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    """Before: two ``--resume auto`` on one folder both ran (duplicated steps in metrics.jsonl, two summaries)."""
    holder = lock_holder(run)
    before = files_of(run)
    assert cli(["pretrain", "--resume", "auto", f"out_dir={run}", "schedule.epochs=3"]) == 1
    err = capsys.readouterr().err
    assert err == (
        f"milan pretrain: error: run folder {run} is in use by process {holder.pid}; wait for it to end, or start "
        "a new run without --resume\n"
    )
    assert files_of(run) == before
    with pytest.raises(RunFolderError, match="in use by process"):  # the Python API, the same
        pretrain(tiny_config(run, image_dir, {"schedule.epochs": 3}), resume="auto")
    fresh = run.with_name("fresh")  # an empty folder that a new run has just taken
    lock_holder(fresh)
    summary = pretrain(tiny_config(fresh, image_dir, {"schedule.max_steps": 1}))
    assert summary.run_dir == run.with_name("fresh-2") and sorted(p.name for p in fresh.iterdir()) == [".lock"]
    holder.kill()  # the OS drops the lock of a dead process
    holder.wait()
    assert cli(["pretrain", "--resume", "auto", f"out_dir={run}", "schedule.epochs=3"]) == 0
    assert [r["step"] for r in read_metrics(run / "metrics.jsonl")] == list(range(1, 13))


class Unsafe:
    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, ("echo pwned",))


def damage(path: Path, how: str) -> None:
    if how == "truncated":
        path.write_bytes(path.read_bytes()[:1000])
    else:  # a pickle that would run a command when loaded without weights_only
        path.write_bytes(pickle.dumps({"format": "milan-train", "model": Unsafe()}, protocol=2))


@pytest.mark.parametrize("how", ["truncated", "unsafe"])
def test_a_damaged_last_pt_falls_back_with_one_line(run: Path, how: str, capfd: pytest.CaptureFixture[str]) -> None:
    """Before: a raw ``UserWarning`` with a source path (``milan/train/run.py:129``) and the source line."""
    damage(run / "checkpoints" / "last.pt", how)
    assert cli(["pretrain", "--resume", "auto", f"out_dir={run}", "schedule.epochs=3"]) == 0
    out, err = capfd.readouterr()
    last, epoch_2 = run / "checkpoints" / "last.pt", run / "checkpoints" / "epoch_0002.pt"
    (note,) = [line for line in out.splitlines() if "unusable" in line]
    assert note.startswith(f"--resume: skipping unusable checkpoint {last} (") and "pwned" not in out
    assert f"resuming {run} from {epoch_2} (epoch 2, step 8)" in out
    assert "Warning" not in err and ".py:" not in err
    assert load_training_checkpoint(last)["state"]["step"] == 12


def test_only_unusable_checkpoints_stop_the_resume(run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Before: "no checkpoint in ...; starting a new run there", and training from step 0 over the old files."""
    for path in (run / "checkpoints").iterdir():
        damage(path, "truncated")
    before = files_of(run)
    assert cli(["pretrain", "--resume", "auto", f"out_dir={run}"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"no usable checkpoint in {run / 'checkpoints'} (last.pt: cannot read" in err
    assert "nothing was changed" in err and files_of(run) == before


def test_a_folder_named_last_pt_is_reported_before_training(run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Before: the run trained to its end, then crashed on save with ``IsADirectoryError`` (a traceback)."""
    last = run / "checkpoints" / "last.pt"
    last.unlink()
    last.mkdir()
    before = files_of(run)
    assert cli(["pretrain", "--resume", "auto", f"out_dir={run}", "schedule.epochs=3"]) == 1
    err = capsys.readouterr().err
    assert err == (
        f"milan pretrain: error: {last} is a folder, so checkpoints cannot be written there: move it away or "
        "choose another out_dir\n"
    )
    assert files_of(run) == before


def test_temporary_files_of_a_killed_run_are_removed(run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Before: ``.last.pt.*.tmp`` files left by a SIGKILL mid-write stayed for ever (up to 11 MB each)."""
    ckpts = run / "checkpoints"
    (ckpts / ".last.pt.x7k2m9.tmp").write_bytes(b"\0" * 300_000)
    (ckpts / ".epoch_0002.pt.a1b2c3.tmp").write_bytes(b"\0" * 200_000)
    assert cli(["pretrain", "--resume", "auto", f"out_dir={run}", "schedule.epochs=3"]) == 0
    assert (
        "removed 2 unfinished temporary checkpoint file(s) (0.5 MB) left by an interrupted run"
        in capsys.readouterr().out
    )
    assert not [p for p in ckpts.iterdir() if p.name.endswith(".tmp")]


def test_a_full_disk_is_one_line_and_keeps_the_last_checkpoint(
    tmp_path: Path, image_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Before: a 50-line chained traceback ending in ``RuntimeError: [enforce fail at inline_container.cc:672]``."""
    real_save = torch.save
    calls = {"n": 0}

    def save(obj: object, f: Any, *args: Any, **kwargs: Any) -> None:
        calls["n"] += 1
        (real_save if calls["n"] == 1 else enospc_save)(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)  # the second checkpoint (end of epoch 2) meets a full disk
    run = tmp_path / "run"
    assert cli(["pretrain", *tiny_overrides(run, image_dir)]) == 1
    err = capsys.readouterr().err
    last = run / "checkpoints" / "last.pt"
    pattern = rf"milan pretrain: error: no space left writing {last} \(about \d+\.\d MB needed, \d+\.\d MB free\); "
    assert re.fullmatch(pattern + rf"the previous checkpoint {last} is intact\n", err)
    assert load_training_checkpoint(last)["state"]["step"] == 4
    assert sorted(p.name for p in last.parent.iterdir()) == ["epoch_0001.pt", "last.pt"]


@pytest.fixture
def read_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A folder that behaves like a read-only filesystem (``EROFS`` on creating anything inside)."""
    root = tmp_path / "ro"
    root.mkdir()
    (root / "existing").mkdir()
    real_mkdir, real_open = os.mkdir, os.open

    def inside(path: Any) -> bool:
        return Path(os.fsdecode(path)).absolute().is_relative_to(root)

    def mkdir(path: Any, *args: Any, **kwargs: Any) -> None:
        if inside(path):
            raise OSError(errno.EROFS, "Read-only file system", os.fsdecode(path))
        real_mkdir(path, *args, **kwargs)

    def open_(path: Any, flags: int, *args: Any, **kwargs: Any) -> int:
        if inside(path) and flags & (os.O_CREAT | os.O_WRONLY | os.O_RDWR):
            raise OSError(errno.EROFS, "Read-only file system", os.fsdecode(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "mkdir", mkdir)
    monkeypatch.setattr(os, "open", open_)
    return root


def test_a_read_only_output_folder_is_one_line(
    read_only: Path, image_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Before: ``OSError: [Errno 30] Read-only file system`` with a traceback."""
    new = read_only / "run"
    assert cli(["pretrain", *tiny_overrides(new, image_dir)]) == 1
    assert capsys.readouterr().err == (
        f"milan pretrain: error: cannot create the run folder {new}: Read-only file system; choose another out_dir\n"
    )
    existing = read_only / "existing"
    assert cli(["pretrain", *tiny_overrides(existing, image_dir)]) == 1
    assert capsys.readouterr().err == (
        f"milan pretrain: error: cannot write to the run folder {existing}: Read-only file system; choose another "
        "out_dir\n"
    )


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root writes into read-only folders")
def test_an_unwritable_output_folder_is_one_line(
    tmp_path: Path, image_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "locked"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        assert cli(["pretrain", *tiny_overrides(folder / "run", image_dir)]) == 1
        assert "cannot create the run folder" in capsys.readouterr().err
    finally:
        folder.chmod(0o700)


def test_a_process_group_is_torn_down_by_its_owner_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """One owner rule for start_run and milan evaluate: a job inside a job leaves the caller's group alone."""
    import socket

    import milan.distributed as dist
    from milan.train.run import process_group

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(dist, "launched", lambda: True)  # a torchrun launch of one process
    with process_group("cpu", timeout_s=60) as device:
        assert device.type == "cpu" and dist.is_enabled()
        with process_group("cpu"):  # e.g. milan evaluate's run() around evaluate_checkpoint()
            assert dist.is_enabled()
        assert dist.is_enabled()
    assert not dist.is_enabled()
