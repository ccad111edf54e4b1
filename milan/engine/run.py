"""How every job starts: the process group, runtime settings, the run folder (and resume checkpoint), seeding.

Pretraining, the classifier jobs and k-NN all open with :func:`start_run`::

    with start_run(cfg.out_dir, cfg.runtime, resume) as run:
        seed_everything(cfg.seed)
        ...  # build the model and data on run.device, train into run.run_dir from run.resume_from
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from milan import distributed as dist
from milan.engine.checkpointing import Checkpointer, load_training_checkpoint
from milan.engine.config import RuntimeConfig
from milan.engine.loop import resolve_dtype


@dataclass(frozen=True)
class RunContext:
    """What :func:`start_run` gives a job.

    Attributes:
        device: This process's device.
        dtype: Compute dtype (autocast, grad scaler).
        run_dir: The run folder.
        resume_from: Checkpoint to resume from (``None``: a fresh start).
        t_start: ``time.perf_counter()`` when the job started (for its wall time).
    """

    device: torch.device
    dtype: torch.dtype
    run_dir: Path
    resume_from: Path | None
    t_start: float

    def header(self, job: str, details: Sequence[str] = ()) -> str:
        """The job's first log line: ``milan JOB -> RUN_DIR  (device, dtype, N process(es)[, details...])``."""
        dtype = str(self.dtype).removeprefix("torch.")
        parts = [str(self.device), dtype, f"{dist.world_size()} process(es)", *details]
        return f"milan {job} -> {self.run_dir}  ({', '.join(parts)})"


@contextmanager
def start_run(out_dir: str, runtime: RuntimeConfig, resume: str | None = None) -> Iterator[RunContext]:
    """Sets a job up and tears the process group down at the end.

    Initialises the process group when launched by torchrun (a process group that already exists, e.g. a
    caller's, is used and left alone), applies the runtime section (:func:`setup_runtime`) and decides the run
    folder and resume checkpoint on the main process (:func:`resolve_run_dir`).

    Args:
        out_dir: The configured run folder.
        runtime: The runtime section.
        resume: ``"auto"``, a checkpoint path, or ``None`` (see :func:`resolve_run_dir`).

    Yields:
        The job's context.
    """
    t_start = time.perf_counter()
    owns_process_group = not dist.is_enabled()  # a caller's process group is left alone
    device = dist.init(runtime.device)
    try:
        dtype = setup_runtime(runtime, device)
        run_dir, resume_from = resolve_run_dir(out_dir, resume)
        yield RunContext(device, dtype, run_dir, resume_from, t_start)
    finally:
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


def resolve_run_dir(out_dir: str, resume: str | None) -> tuple[Path, Path | None]:
    """The run folder and the checkpoint to resume from, decided on the main process and shared with the others.

    Args:
        out_dir: The configured run folder.
        resume: ``None``: a fresh run (an ``out_dir`` that already holds a run gets a ``-2``, ``-3`` ... suffix, so
            nothing is overwritten); ``"auto"``: the newest valid checkpoint in ``out_dir`` (or a fresh start there);
            or a checkpoint path (checked here, so that a bad file fails before anything is built).

    Returns:
        ``(run folder, checkpoint or None)``.

    Raises:
        CheckpointError: ``resume`` names a file that is not a training checkpoint.
    """
    decision = _decide_run_dir(Path(out_dir), resume) if dist.is_main() else None
    run_dir, ckpt = dist.broadcast_object(decision)
    return Path(run_dir), (Path(ckpt) if ckpt is not None else None)


def _decide_run_dir(out_dir: Path, resume: str | None) -> tuple[str, str | None]:
    if resume is None:
        run_dir = out_dir
        n = 1
        while run_dir.exists() and any(run_dir.iterdir()):  # never overwrite a previous run
            n += 1
            run_dir = out_dir.with_name(f"{out_dir.name}-{n}")
        if run_dir != out_dir:
            print(f"{out_dir} already holds a run; writing this one to {run_dir} (--resume auto continues {out_dir})")
        return str(run_dir), None
    if resume == "auto":
        found = Checkpointer(out_dir).latest_valid()
        if found is None:
            print(f"--resume auto: no checkpoint in {out_dir / 'checkpoints'}; starting a new run there")
            return str(out_dir), None
        return str(out_dir), str(found[0])
    path = Path(resume)
    load_training_checkpoint(path)  # fail early with a clear message
    return str(out_dir), str(path)


__all__ = ["RunContext", "resolve_run_dir", "seed_everything", "setup_runtime", "start_run"]
