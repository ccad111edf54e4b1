"""How every job starts: the process group, runtime settings, the run folder (locked) and resume checkpoint, seeding.

Pretraining, the classifier jobs and k-NN all open with :func:`start_run`::

    with start_run(cfg.out_dir, cfg.runtime, resume, schedule=cfg.schedule) as run:
        if run.finished is not None:
            return ...  # a resumed run with nothing left to do: no file was touched
        seed_everything(cfg.seed)
        ...  # build the model and data on run.device, train into run.run_dir from run.resume_from

The main process holds an exclusive OS lock (``flock``) on ``RUN_DIR/.lock`` for the whole run; the OS releases it
when the process ends, however it ends. A second new run with the same ``out_dir`` therefore goes to the next free
folder, and a second resume of a folder in use stops with one line naming the process that holds it.
"""

from __future__ import annotations

import os
import random
import socket
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from milan import distributed as dist
from milan.checkpoint.io import CheckpointError
from milan.train.checkpointing import Checkpointer, CheckpointWriteError, RunFolderError, load_training_checkpoint
from milan.train.config import RuntimeConfig, ScheduleConfig
from milan.train.loop import TrainState, resolve_dtype

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no run-folder locks
    fcntl = None  # type: ignore[assignment]

LOCK_FILE = ".lock"


@dataclass(frozen=True)
class FinishedRun:
    """A resumed run that has nothing left to do: its position, the checkpoint that says so, its evaluations."""

    state: TrainState
    checkpoint: Path
    eval_history: list[dict[str, Any]] = field(default_factory=list)


@dataclass(frozen=True)
class RunContext:
    """What :func:`start_run` gives a job."""

    device: torch.device
    dtype: torch.dtype  # compute dtype (autocast, grad scaler)
    run_dir: Path
    resume_from: Path | None  # checkpoint to resume from (None: a fresh start)
    finished: FinishedRun | None  # set when the resumed run is complete: the job returns without writing anything
    t_start: float  # time.perf_counter() when the job started (for its wall time)

    def header(self, job: str, details: Sequence[str] = ()) -> str:
        """The job's first log line: ``milan JOB -> RUN_DIR  (device, dtype, N process(es)[, details...])``."""
        dtype = str(self.dtype).removeprefix("torch.")
        parts = [str(self.device), dtype, f"{dist.world_size()} process(es)", *details]
        return f"milan {job} -> {self.run_dir}  ({', '.join(parts)})"


@contextmanager
def process_group(device: Literal["auto", "cpu", "cuda"] = "auto", timeout_s: float = 1800.0) -> Iterator[torch.device]:
    """Yields this process's device inside the process group torchrun asks for (:func:`milan.distributed.init`).

    The group is torn down at the end only if this call created it: a caller's (e.g. a job run from another job, or
    a test's) is used and left alone.
    """
    owned = not dist.is_enabled()
    try:
        yield dist.init(device, timeout_s=timeout_s)
    finally:
        if owned:
            dist.destroy()


@contextmanager
def start_run(
    out_dir: str,
    runtime: RuntimeConfig,
    resume: str | None = None,
    *,
    schedule: ScheduleConfig | None = None,
    done_file: str | None = None,
) -> Iterator[RunContext]:
    """Sets a job up and holds its run folder until the end.

    Joins the process group (:func:`process_group`, with ``runtime.dist_timeout_s``), applies the runtime section
    (CPU threads, TF32), and on the main process takes the run folder: locks it, checks that it and its
    checkpoint paths are writable, removes temporary files a killed run left, and finds the resume checkpoint.

    Args:
        out_dir: The configured run folder.
        runtime: The runtime section.
        resume: ``None``: a fresh run (an ``out_dir`` that already holds a run gets a ``-2``, ``-3`` ... suffix, so
            nothing is overwritten); ``"auto"``: the newest valid checkpoint in ``out_dir`` (or a fresh start there
            when it has none); or a checkpoint path.
        schedule: The run's schedule: with it, a resume whose checkpoint is at the end of the schedule (all
            ``epochs``, or ``max_steps``) is reported as finished (``RunContext.finished``) and changes no file.
        done_file: A file the finished run leaves in its folder (e.g. ``results.json``): without it the run is not
            finished (it was stopped after its last checkpoint, before writing it).

    Raises:
        RunFolderError: The folder is in use by another process, cannot be written, or holds only unusable
            checkpoints (``--resume auto``).
        CheckpointWriteError: A checkpoint path cannot be written (e.g. ``last.pt`` is a folder).
        CheckpointError: ``resume`` names a file that is not a training checkpoint.
    """
    t_start = time.perf_counter()
    with process_group(runtime.device, runtime.dist_timeout_s) as device:
        if runtime.cpu_threads is not None:
            torch.set_num_threads(runtime.cpu_threads)
        if device.type == "cuda" and runtime.tf32:
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        dtype = resolve_dtype(runtime.precision, device)
        lock: RunLock | None = None
        taken: tuple[Path, Path | None, FinishedRun | None] | None = None
        error: tuple[type[Exception], str] | None = None
        if dist.is_main():
            try:
                lock, taken = _take_run_dir(Path(out_dir), resume, schedule, done_file)
            except (RunFolderError, CheckpointWriteError, CheckpointError) as e:
                if not dist.is_enabled():
                    raise
                error = (type(e), str(e))  # raised on every process
        try:
            taken, error = dist.broadcast_object((taken, error))
            if error is not None:
                raise error[0](error[1])
            assert taken is not None
            run_dir, resume_from, finished = taken
            yield RunContext(device, dtype, run_dir, resume_from, finished, t_start)
        finally:
            if lock is not None:
                lock.release()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class RunLock:
    """An exclusive ``flock`` on ``RUN_DIR/.lock``, held by one process; the OS drops it when that process dies.

    The file holds the holder's process id and host, for the message a second process prints. On filesystems
    without ``flock`` support the lock is skipped with a warning (concurrent runs are then not detected).
    """

    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> bool:
        """Takes the lock without waiting; ``False`` if another process holds it.

        Raises:
            OSError: The lock file cannot be created (e.g. a read-only folder).
        """
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                return False
            except OSError as e:  # e.g. ENOLCK: a filesystem without flock
                print(f"WARNING: cannot lock {self.path} ({e.strerror}): other runs in this folder are not detected")
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()} {socket.gethostname()}\n".encode())
        self._fd = fd
        return True

    def holder(self) -> str:
        """``"process N"`` (``"process N on host H"`` for another host) as the lock file says."""
        try:
            pid, _, host = self.path.read_text().strip().partition(" ")
        except OSError:
            return "another process"
        if not pid:
            return "another process"
        return f"process {pid}" + (f" on host {host}" if host and host != socket.gethostname() else "")

    def release(self) -> None:
        """Releases the lock (the file stays, so that no other process can lock a file about to disappear)."""
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None


def _take_run_dir(
    out_dir: Path, resume: str | None, schedule: ScheduleConfig | None, done_file: str | None
) -> tuple[RunLock, tuple[Path, Path | None, FinishedRun | None]]:
    """Main process: the locked run folder, the checkpoint to resume from and, if the run is complete, its end.

    The checkpoints' folder is checked to be writable, and what a killed run left mid-write is removed.
    """
    lock, run_dir = _take_new_run_dir(out_dir) if resume is None else (_lock(out_dir), out_dir)
    if lock is None:
        raise RunFolderError(
            f"run folder {out_dir} is in use by {RunLock(out_dir).holder()}; wait for it to end, or start a new run "
            "without --resume"
        )
    try:
        checkpointer = Checkpointer(run_dir)
        checkpointer.check_writable()
        files, freed = checkpointer.clean_orphans()
        if files:
            print(
                f"removed {files} unfinished temporary checkpoint file(s) ({freed / 1e6:.1f} MB) left by an "
                "interrupted run"
            )
        if resume is None:
            return lock, (run_dir, None, None)
        if resume == "auto":
            found, skipped = checkpointer.scan(resume)
            if found is None:
                print(f"--resume auto: no checkpoint in {checkpointer.dir}; starting a new run there")
                return lock, (run_dir, None, None)
            path, ckpt = found
            for bad, why in skipped:
                print(f"--resume auto: skipping unusable checkpoint {bad} ({why}); resuming from {path}")
        else:
            path = Path(resume)
            ckpt = load_training_checkpoint(path)  # fail early with a clear message
        return lock, (run_dir, path, _finished(run_dir, path, ckpt, schedule, done_file))
    except BaseException:
        lock.release()
        raise


def _take_new_run_dir(out_dir: Path) -> tuple[RunLock, Path]:
    """The first of ``out_dir``, ``out_dir-2``, ... that holds no run and that no other process holds, locked."""
    run_dir, n = out_dir, 1
    while True:
        if not _holds_a_run(run_dir):  # never overwrite a previous run
            lock = _lock(run_dir)
            if lock is not None and not _holds_a_run(run_dir):
                break
            if lock is not None:  # another run started and ended here meanwhile
                lock.release()
        n += 1
        run_dir = out_dir.with_name(f"{out_dir.name}-{n}")
    if run_dir != out_dir:
        print(f"{out_dir} already holds a run; writing this one to {run_dir} (--resume auto continues {out_dir})")
    return lock, run_dir


def _holds_a_run(folder: Path) -> bool:
    return folder.is_dir() and any(p.name != LOCK_FILE for p in folder.iterdir())


def _lock(folder: Path) -> RunLock | None:
    """The (created) folder's lock, or ``None`` when another process holds it."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RunFolderError(f"cannot create the run folder {folder}: {e.strerror or e}; choose another out_dir") from e
    lock = RunLock(folder)
    try:
        return lock if lock.acquire() else None
    except OSError as e:
        raise RunFolderError(
            f"cannot write to the run folder {folder}: {e.strerror or e}; choose another out_dir"
        ) from e


def _finished(
    run_dir: Path, path: Path, ckpt: dict[str, Any], schedule: ScheduleConfig | None, done_file: str | None
) -> FinishedRun | None:
    """The run's end if it has nothing left to do (and says so), else ``None``."""
    if schedule is None:
        return None
    state = TrainState(**{k: int(v) for k, v in ckpt["state"].items()})
    iters = getattr(schedule, "iters", None)  # a schedule in optimizer steps (SegmentScheduleConfig.iters)
    length = state.step >= iters if iters is not None else state.epoch >= schedule.epochs
    at_end = length or (schedule.max_steps is not None and state.step >= schedule.max_steps)
    if not at_end or (done_file is not None and not (run_dir / done_file).is_file()):
        return None
    if iters is not None:
        where, how = f"step {state.step}/{iters}", "a larger schedule.iters=N"
    else:
        where, how = f"epoch {state.epoch}/{schedule.epochs}, step {state.step}", "a larger schedule.epochs=N"
    if not length:
        how = "a larger schedule.max_steps=N (or schedule.max_steps=null for the whole schedule)"
    print(
        f"run {run_dir} is finished ({where}; {path}): nothing to do, no file was changed. To train longer, resume "
        f"with {how}"
    )
    return FinishedRun(state, path, list(ckpt.get("eval_history") or []))
