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
from typing import Any

import numpy as np
import torch

from milan import distributed as dist
from milan.checkpoint.io import CheckpointError
from milan.train.checkpointing import Checkpointer, CheckpointWriteError, load_training_checkpoint
from milan.train.config import RuntimeConfig, ScheduleConfig
from milan.train.loop import TrainState, resolve_dtype

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no run-folder locks
    fcntl = None  # type: ignore[assignment]

LOCK_FILE = ".lock"


class RunFolderError(RuntimeError):
    """The run folder cannot be used: in use by another process, not writable, or holding only unusable checkpoints."""


@dataclass(frozen=True)
class FinishedRun:
    """A resumed run that has nothing left to do (see :func:`start_run`).

    Attributes:
        state: Its training position (at the end of the schedule).
        checkpoint: The checkpoint that says so.
        eval_history: The evaluations stored in it (classifier jobs).
    """

    state: TrainState
    checkpoint: Path
    eval_history: list[dict[str, Any]] = field(default_factory=list)


@dataclass(frozen=True)
class RunContext:
    """What :func:`start_run` gives a job.

    Attributes:
        device: This process's device.
        dtype: Compute dtype (autocast, grad scaler).
        run_dir: The run folder.
        resume_from: Checkpoint to resume from (``None``: a fresh start).
        t_start: ``time.perf_counter()`` when the job started (for its wall time).
        finished: Set when the resumed run is already complete: the job should return without writing anything.
    """

    device: torch.device
    dtype: torch.dtype
    run_dir: Path
    resume_from: Path | None
    t_start: float
    finished: FinishedRun | None = None

    def header(self, job: str, details: Sequence[str] = ()) -> str:
        """The job's first log line: ``milan JOB -> RUN_DIR  (device, dtype, N process(es)[, details...])``."""
        dtype = str(self.dtype).removeprefix("torch.")
        parts = [str(self.device), dtype, f"{dist.world_size()} process(es)", *details]
        return f"milan {job} -> {self.run_dir}  ({', '.join(parts)})"


@contextmanager
def start_run(
    out_dir: str,
    runtime: RuntimeConfig,
    resume: str | None = None,
    *,
    schedule: ScheduleConfig | None = None,
    done_file: str | None = None,
) -> Iterator[RunContext]:
    """Sets a job up, holds its run folder, and tears the process group down at the end.

    Initialises the process group when launched by torchrun (with ``runtime.dist_timeout_s``; a process group that
    already exists, e.g. a caller's, is used and left alone), applies the runtime section (:func:`setup_runtime`),
    and on the main process takes the run folder (:func:`resolve_run_dir`): locks it, checks that it and its
    checkpoint paths are writable, removes temporary files a killed run left, and finds the resume checkpoint.

    Args:
        out_dir: The configured run folder.
        runtime: The runtime section.
        resume: ``"auto"``, a checkpoint path, or ``None`` (see :func:`resolve_run_dir`).
        schedule: The run's schedule: with it, a resume whose checkpoint is at the end of the schedule (all
            ``epochs``, or ``max_steps``) is reported as finished (``RunContext.finished``) and changes no file.
        done_file: A file the finished run leaves in its folder (e.g. ``results.json``): without it the run is not
            finished (it was stopped after its last checkpoint, before writing it).

    Yields:
        The job's context.

    Raises:
        RunFolderError: The folder is in use by another process, cannot be written, or holds only unusable
            checkpoints (``--resume auto``).
        CheckpointWriteError: A checkpoint path cannot be written (e.g. ``last.pt`` is a folder).
        CheckpointError: ``resume`` names a file that is not a training checkpoint.
    """
    t_start = time.perf_counter()
    owns_process_group = not dist.is_enabled()  # a caller's process group is left alone
    device = dist.init(runtime.device, timeout_s=runtime.dist_timeout_s)
    lock: RunLock | None = None
    try:
        dtype = setup_runtime(runtime, device)
        decision: tuple[Any, ...] | None = None
        error: tuple[type[Exception], str] | None = None
        if dist.is_main():
            try:
                lock, decision = _take_run_dir(Path(out_dir), resume, schedule, done_file)
            except (RunFolderError, CheckpointWriteError, CheckpointError) as e:
                error = (type(e), str(e))
                if not dist.is_enabled():
                    raise
        decision, error = dist.broadcast_object((decision, error))
        if error is not None:
            raise error[0](error[1])
        assert decision is not None
        run_dir, ckpt, finished = decision
        done = None
        if finished is not None:
            state, path, history = finished
            done = FinishedRun(TrainState(**state), Path(path), history)
        resume_from = Path(ckpt) if ckpt is not None else None
        yield RunContext(device, dtype, Path(run_dir), resume_from, t_start, done)
    finally:
        if lock is not None:
            lock.release()
        if owns_process_group:
            dist.destroy()


def setup_runtime(runtime: RuntimeConfig, device: torch.device) -> torch.dtype:
    """Applies CPU threads and TF32 from the runtime section; returns the compute dtype."""
    if runtime.cpu_threads is not None:
        torch.set_num_threads(runtime.cpu_threads)
    if device.type == "cuda" and runtime.tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return resolve_dtype(runtime.precision, device)


def seed_everything(seed: int) -> None:
    """Seeds Python, NumPy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class RunLock:
    """An exclusive ``flock`` on ``RUN_DIR/.lock``, held by one process; the OS drops it when that process dies.

    The file holds the holder's process id and host, for the message a second process prints. On filesystems
    without ``flock`` support the lock is skipped with a warning (concurrent runs are then not detected).

    Args:
        run_dir: The run folder (must exist).
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


def resolve_run_dir(out_dir: str, resume: str | None) -> tuple[Path, Path | None]:
    """The run folder and the checkpoint to resume from, decided on the main process and shared with the others.

    The folder is only looked at here, not locked: jobs take it with :func:`start_run`.

    Args:
        out_dir: The configured run folder.
        resume: ``None``: a fresh run (an ``out_dir`` that already holds a run gets a ``-2``, ``-3`` ... suffix, so
            nothing is overwritten); ``"auto"``: the newest valid checkpoint in ``out_dir`` (or a fresh start there
            when it has none; an error when it has only unusable ones); or a checkpoint path (checked here, so that
            a bad file fails before anything is built).

    Returns:
        ``(run folder, checkpoint or None)``.

    Raises:
        CheckpointError: ``resume`` names a file that is not a training checkpoint.
        RunFolderError: ``resume="auto"`` and every checkpoint in ``out_dir`` is unusable.
    """
    decision = None
    if dist.is_main():
        lock, (run_dir, ckpt, _) = _take_run_dir(Path(out_dir), resume, None, None, prepare=False)
        if lock is not None:
            lock.release()
        decision = (run_dir, ckpt)
    run_dir, ckpt = dist.broadcast_object(decision)
    return Path(run_dir), (Path(ckpt) if ckpt is not None else None)


def _holds_a_run(folder: Path) -> bool:
    return folder.is_dir() and any(p.name != LOCK_FILE for p in folder.iterdir())


def _make_dir(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RunFolderError(f"cannot create the run folder {folder}: {e.strerror or e}; choose another out_dir") from e


def _lock(folder: Path) -> RunLock | None:
    """The folder's lock, or ``None`` when another process holds it."""
    lock = RunLock(folder)
    try:
        return lock if lock.acquire() else None
    except OSError as e:
        raise RunFolderError(
            f"cannot write to the run folder {folder}: {e.strerror or e}; choose another out_dir"
        ) from e


def _take_run_dir(
    out_dir: Path,
    resume: str | None,
    schedule: ScheduleConfig | None,
    done_file: str | None,
    *,
    prepare: bool = True,
) -> tuple[RunLock | None, tuple[str, str | None, tuple[dict[str, int], str, list[Any]] | None]]:
    """Main process: the locked run folder, the resume checkpoint and, if the run is complete, its end state."""
    if resume is None:
        return _take_new_run_dir(out_dir, prepare)
    if prepare:
        _make_dir(out_dir)
    lock = _lock(out_dir) if prepare else None
    if prepare and lock is None:
        raise RunFolderError(
            f"run folder {out_dir} is in use by {RunLock(out_dir).holder()}; wait for it to end, or start a new run "
            "without --resume"
        )
    try:
        checkpointer = Checkpointer(out_dir)
        if prepare:
            _prepare(out_dir, checkpointer)
        if resume == "auto":
            found, skipped = checkpointer.scan()
            if found is None and skipped:
                reasons = "; ".join(f"{p.name}: {why}" for p, why in skipped)
                raise RunFolderError(
                    f"--resume auto: no usable checkpoint in {checkpointer.dir} ({reasons}); nothing was changed. "
                    "Move the damaged files away to start a new run there, or pass --resume FILE"
                )
            if found is None:
                print(f"--resume auto: no checkpoint in {checkpointer.dir}; starting a new run there")
                return lock, (str(out_dir), None, None)
            path, ckpt = found
            for bad, why in skipped:
                print(f"--resume auto: skipping unusable checkpoint {bad} ({why}); resuming from {path}")
        else:
            path = Path(resume)
            ckpt = load_training_checkpoint(path)  # fail early with a clear message
        return lock, (str(out_dir), str(path), _finished(out_dir, path, ckpt, schedule, done_file))
    except BaseException:
        if lock is not None:
            lock.release()
        raise


def _take_new_run_dir(
    out_dir: Path, prepare: bool
) -> tuple[RunLock | None, tuple[str, str | None, tuple[dict[str, int], str, list[Any]] | None]]:
    """The first of ``out_dir``, ``out_dir-2``, ... that holds no run and that no other process holds."""
    run_dir, n = out_dir, 1
    while True:
        if not _holds_a_run(run_dir):  # never overwrite a previous run
            if not prepare:
                break
            _make_dir(run_dir)
            lock = _lock(run_dir)
            if lock is not None and not _holds_a_run(run_dir):
                break
            if lock is not None:  # another run started and ended here meanwhile
                lock.release()
        n += 1
        run_dir = out_dir.with_name(f"{out_dir.name}-{n}")
    if run_dir != out_dir:
        print(f"{out_dir} already holds a run; writing this one to {run_dir} (--resume auto continues {out_dir})")
    if not prepare:
        return None, (str(run_dir), None, None)
    assert lock is not None
    try:
        _prepare(run_dir, Checkpointer(run_dir))
    except BaseException:
        lock.release()
        raise
    return lock, (str(run_dir), None, None)


def _prepare(run_dir: Path, checkpointer: Checkpointer) -> None:
    """Checks that the checkpoints can be written, and removes what a killed run left mid-write."""
    checkpointer.check_writable()
    files, freed = checkpointer.clean_orphans()
    if files:
        print(
            f"removed {files} unfinished temporary checkpoint file(s) ({freed / 1e6:.1f} MB) left by an interrupted run"
        )


def _finished(
    run_dir: Path, path: Path, ckpt: dict[str, Any], schedule: ScheduleConfig | None, done_file: str | None
) -> tuple[dict[str, int], str, list[Any]] | None:
    """The checkpoint's state, path and evaluations if the run has nothing left to do, else ``None``."""
    if schedule is None:
        return None
    state = {k: int(v) for k, v in ckpt["state"].items()}
    at_end = state["epoch"] >= schedule.epochs or (
        schedule.max_steps is not None and state["step"] >= schedule.max_steps
    )
    if not at_end or (done_file is not None and not (run_dir / done_file).is_file()):
        return None
    if state["epoch"] >= schedule.epochs:
        how = "a larger schedule.epochs=N"
    else:
        how = "a larger schedule.max_steps=N (or schedule.max_steps=null for the whole schedule)"
    print(
        f"run {run_dir} is finished (epoch {state['epoch']}/{schedule.epochs}, step {state['step']}; {path}): nothing "
        f"to do, no file was changed. To train longer, resume with {how}"
    )
    return state, str(path), list(ckpt.get("eval_history") or [])


__all__ = [
    "FinishedRun",
    "RunContext",
    "RunFolderError",
    "RunLock",
    "resolve_run_dir",
    "seed_everything",
    "setup_runtime",
    "start_run",
]
