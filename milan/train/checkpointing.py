"""Training checkpoints: atomic writes, ``last.pt`` plus numbered copies, and resume with fallback.

Layout of ``RUN_DIR/checkpoints/``: ``last.pt`` (refreshed at every save), ``last.prev.pt`` (the ``last.pt`` before
it) and an independent copy ``epoch_NNNN.pt`` of each epoch-end save, the newest ``checkpoint.keep`` of them kept.
Every file is written to a temporary file and renamed, so a crash never leaves a partial checkpoint under a real name
(temporary files left by a killed run are removed by :meth:`Checkpointer.clean_orphans`); a damaged file leaves
an older one to resume from (:meth:`Checkpointer.scan`). A checkpoint is a plain dict of tensors and containers
(loaded with ``weights_only=True``)::

    {"format": "milan-train", "version": 1,
     "model": {...},                 # trainable module's state dict (MILAN: the student, keys encoder.* decoder.*)
     "teacher": {...},               # only for a random teacher (no teacher.checkpoint), so a resume is exact
     "optimizer": {...}, "scaler": {...} | None,
     "state": {"epoch", "step", "batch_in_epoch", "images_seen"},
     "rng": {"python", "numpy", "torch", "cuda"},
     "config": {...},                # the resolved config (plain data)
     "meta": {"world_size", "time", "torch"}}
"""

from __future__ import annotations

import dataclasses
import errno
import os
import random
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
import torch
import torch.nn as nn
from torch.utils._pytree import tree_leaves, tree_map_only

from milan import distributed as dist
from milan.checkpoint.io import CheckpointError, atomic_path, atomic_save, safe_load
from milan.errors import UserError
from milan.train.loop import TrainState

FORMAT = "milan-train"
VERSION = 1
REQUIRED_KEYS = ("model", "optimizer", "state", "config")
_EPOCH_FILE = re.compile(r"^epoch_(\d+)\.pt$")
_TEMP_FILE = re.compile(r"^\..+\.tmp$")  # what atomic writes leave behind when killed mid-write


class CheckpointWriteError(UserError, RuntimeError):
    """A checkpoint could not be written (no space left, read-only or unwritable folder); the previous one is intact."""


class RunFolderError(UserError, RuntimeError):
    """The run folder cannot be used: in use by another process, not writable, or holding only unusable checkpoints."""


def is_sharded(module: nn.Module) -> bool:
    """Whether ``module`` (wrapped or not) is sharded with FSDP2: its full state is then gathered by every process."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(dist.unwrap(module), FSDPModule)


def rng_state() -> dict[str, Any]:
    """Python, NumPy, torch CPU and CUDA generator states, as tensors and plain containers."""
    _, words, gauss = random.getstate()
    _, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": [list(words), gauss],
        "numpy": [torch.from_numpy(np.asarray(keys, dtype=np.int64)), int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():  # type: ignore[no-untyped-call]
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restores :func:`rng_state` (CUDA's on as many devices as it was saved from)."""
    words, gauss = state["python"]
    random.setstate((3, tuple(int(w) for w in words), gauss))
    keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state(("MT19937", keys.numpy().astype(np.uint32), int(pos), int(has_gauss), float(cached)))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def build_checkpoint(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    state: TrainState,
    config: dict[str, Any],
    *,
    scaler: torch.amp.GradScaler | None = None,
    extra: dict[str, Any] | None = None,
    world_size: int = 1,
) -> dict[str, Any]:
    """Assembles a checkpoint dict (see the module docstring); ``extra`` adds top-level entries (``{"teacher": ...}``).

    ``model`` is the trained module unwrapped from DDP/compile, or the sharded FSDP2 module (every process must then
    call this: gathering its full state is collective). ``torch.distributed.checkpoint``'s state-dict API keys the
    optimizer state by parameter name, so a checkpoint does not depend on the strategy or the number of processes (a
    DDP run can resume as FSDP2 and vice versa).
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=is_sharded(model))
    model_sd, optim_sd = get_state_dict(model, optimizer, options=options)
    return {
        "format": FORMAT,
        "version": VERSION,
        "model": tree_map_only(torch.Tensor, lambda t: t.detach().cpu(), model_sd),
        "optimizer": tree_map_only(torch.Tensor, lambda t: t.detach().cpu(), optim_sd),
        "scaler": scaler.state_dict() if scaler is not None else None,
        "state": dataclasses.asdict(state),
        "rng": rng_state(),
        "config": config,
        "meta": {"world_size": world_size, "time": time.time(), "torch": str(torch.__version__)},
        **(extra or {}),
    }


def restore_checkpoint(
    ckpt: dict[str, Any],
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    *,
    scaler: torch.amp.GradScaler | None = None,
) -> TrainState:
    """Loads model, optimizer, scaler and RNG states from a checkpoint; returns its training position.

    The optimizer keeps its own parameter groups and their settings (the run's config decides them: an override of
    ``optim.weight_decay`` on resume takes effect) and takes each parameter's state (moments, step) by its name.

    Raises:
        CheckpointError: The model weights do not fit ``model`` (different architecture).
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    try:
        # The state of each parameter (by name) from the checkpoint; the groups and their settings (weight decay,
        # betas, lr scales) from this run's optimizer, i.e. from its config.
        names = {id(p): n for n, p in model.named_parameters()}
        groups = [{**g, "params": [names[id(p)] for p in g["params"]]} for g in optimizer.param_groups]
        optim_sd = {"state": ckpt["optimizer"]["state"], "param_groups": groups}
        options = StateDictOptions(full_state_dict=True)
        set_state_dict(model, optimizer, model_state_dict=ckpt["model"], optim_state_dict=optim_sd, options=options)
    except (RuntimeError, KeyError, ValueError) as e:
        raise CheckpointError(f"the checkpoint does not match this model/optimizer: {str(e).splitlines()[0]}") from e
    if scaler is not None and ckpt.get("scaler"):
        scaler.load_state_dict(ckpt["scaler"])
    if ckpt.get("rng"):
        set_rng_state(ckpt["rng"])
    return TrainState(**{k: int(v) for k, v in ckpt["state"].items()})


def load_training_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Loads a training checkpoint with ``weights_only=True`` and checks its layout.

    Raises:
        CheckpointError: Unreadable, or not a training checkpoint of this library.
    """
    ckpt = safe_load(path)
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a milan training checkpoint (no format={FORMAT!r} entry)")
    missing = [k for k in REQUIRED_KEYS if k not in ckpt]
    if missing:
        raise CheckpointError(f"{path} lacks {', '.join(missing)}")
    return ckpt


class Checkpointer:
    """Writes and finds the checkpoints of one run folder (in ``run_dir/checkpoints``).

    Args:
        keep: Numbered copies to keep (0: keep only ``last.pt``).
    """

    def __init__(self, run_dir: str | os.PathLike[str], *, keep: int = 3) -> None:
        self.dir = Path(run_dir) / "checkpoints"
        self.last = self.dir / "last.pt"
        self.previous = self.dir / "last.prev.pt"  # the last.pt before the newest save: its fallback
        self.keep = keep

    def save(self, ckpt: dict[str, Any], *, epoch_end: int | None = None) -> Path:
        """Writes ``last.pt`` and, with ``epoch_end`` (the finished epochs), its numbered copy; returns ``last.pt``.

        Raises:
            CheckpointWriteError: No space left, or the folder is not writable; the previous checkpoint is intact.
        """
        written = self.dir / f".{self.last.name}.next.tmp"  # complete before anything else changes
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            atomic_save(ckpt, written)
            if self.last.is_file():  # last.prev.pt: a second name of its bytes (renaming over last.pt leaves them)
                tmp = self.dir / f".{self.previous.name}.tmp"
                tmp.unlink(missing_ok=True)
                try:
                    os.link(self.last, tmp)
                except OSError:  # no hard links: move it (resume finds last.prev.pt until last.pt exists)
                    os.replace(self.last, self.previous)
                else:
                    os.replace(tmp, self.previous)
            os.replace(written, self.last)
        except (OSError, RuntimeError) as e:
            written.unlink(missing_ok=True)
            nbytes = sum(t.numel() * t.element_size() for t in tree_leaves(ckpt) if isinstance(t, torch.Tensor))
            _raise_write_error(e, self.last, nbytes, intact=self.last)
        if epoch_end is not None and self.keep > 0:
            copy = self.dir / f"epoch_{epoch_end:04d}.pt"
            try:  # an independent copy (own bytes, last.pt's modification time), written and renamed atomically
                with atomic_path(copy) as tmp:
                    shutil.copy2(self.last, tmp)
            except OSError as e:
                _raise_write_error(e, copy, self.last.stat().st_size, intact=self.last)
            for old in self.numbered()[: -self.keep]:
                old.unlink(missing_ok=True)
        return self.last

    def check_paths(self) -> None:
        """Checks, without writing, that no checkpoint path is taken by something else (e.g. a folder ``last.pt``).

        Raises:
            CheckpointWriteError: One line naming the path.
        """
        taken = [self.dir] if self.dir.exists() and not self.dir.is_dir() else []
        if not taken and self.dir.is_dir():
            names = (self.last.name, self.previous.name)
            taken = [
                p for p in self.dir.iterdir() if (p.name in names or _EPOCH_FILE.match(p.name)) and not p.is_file()
            ]
        if taken:
            kind = "a folder" if taken[0].is_dir() else "not a regular file"
            raise CheckpointWriteError(
                f"{taken[0]} is {kind}, so checkpoints cannot be written there: move it away or choose another out_dir"
            )

    def check_writable(self) -> None:
        """Checks, before a run trains, that the folder can be created and written and that no path is taken.

        Raises:
            CheckpointWriteError: One line naming the path and the reason.
        """
        self.check_paths()
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            fd, probe = tempfile.mkstemp(prefix=".write-test.", suffix=".tmp", dir=self.dir)
            os.close(fd)
            os.unlink(probe)
        except OSError as e:
            raise CheckpointWriteError(
                f"cannot write checkpoints to {self.dir}: {e.strerror or e}; choose another out_dir"
            ) from e

    def clean_orphans(self) -> tuple[int, int]:
        """Deletes the temporary files that a killed run left mid-write; returns ``(files, bytes)`` removed.

        Call it only while no other process writes this folder (the run folder's lock is held).
        """
        files, freed = 0, 0
        for p in self.dir.iterdir() if self.dir.is_dir() else ():
            if _TEMP_FILE.match(p.name) and p.is_file():
                size = p.stat().st_size
                p.unlink(missing_ok=True)
                files, freed = files + 1, freed + size
        return files, freed

    def numbered(self) -> list[Path]:
        """Numbered checkpoints, oldest first."""
        if not self.dir.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.dir.iterdir() if (m := _EPOCH_FILE.match(p.name))]
        return [p for _, p in sorted(found)]

    def scan(self, resume: str = "auto") -> tuple[tuple[Path, dict[str, Any]] | None, list[tuple[Path, str]]]:
        """The newest checkpoint that loads and has the required entries, and the newer files that did not.

        Newest by modification time (``last.pt`` first among equals); ``resume`` is the ``--resume`` the error names.

        Returns:
            ``((path, checkpoint), [(unusable path, one-line reason), ...])``, or ``(None, [])``: no checkpoint.

        Raises:
            RunFolderError: The folder holds checkpoints, but none is usable (nothing is changed then).
        """
        files = [*self.numbered(), *(p for p in (self.last, self.previous) if p.exists())]
        skipped: list[tuple[Path, str]] = []
        for path in sorted(files, key=lambda p: (p.stat().st_mtime_ns, p.name == "last.pt"), reverse=True):
            try:
                return (path, load_training_checkpoint(path)), skipped
            except CheckpointError as e:
                skipped.append((path, str(e).splitlines()[0] if str(e) else type(e).__name__))
        if skipped:
            reasons = "; ".join(f"{p.name}: {why}" for p, why in skipped)
            raise RunFolderError(
                f"--resume {resume}: no usable checkpoint in {self.dir} ({reasons}); nothing was changed. "
                "Move the damaged files away to start a new run there, or pass --resume FILE"
            )
        return None, []


def _raise_write_error(error: BaseException, path: Path, nbytes: int, *, intact: Path) -> NoReturn:
    """Re-raises a failed write of ``path`` as one line when the disk is to blame (full, read-only, unwritable).

    torch's zip writer reports a full disk as ``[enforce fail at inline_container.cc:...] ... file write failed``,
    with the OS error in the chain or not at all: then too little free space for ``nbytes`` says it.
    """
    chain: list[BaseException] = []
    e: BaseException | None = error
    while e is not None and e not in chain:
        chain.append(e)
        e = e.__cause__ or e.__context__
    os_error = next((e for e in chain if isinstance(e, OSError)), None)
    torch_failed = isinstance(error, RuntimeError) and any(
        "inline_container" in str(e) or "write failed" in str(e) for e in chain
    )
    try:
        free: int | None = shutil.disk_usage(path.parent).free
    except OSError:
        free = None
    kept = f"the previous checkpoint {intact} is intact" if intact.is_file() else "no checkpoint was written before"
    full = any(isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT) for e in chain)
    if full or (torch_failed and free is not None and free < nbytes):
        room = f", {free / 1e6:.1f} MB free" if free is not None else ""
        needed = f"about {nbytes / 1e6:.1f} MB needed{room}"
        raise CheckpointWriteError(f"no space left writing {path} ({needed}); {kept}") from error
    if os_error is not None:
        raise CheckpointWriteError(f"cannot write {path}: {os_error.strerror or os_error}; {kept}") from error
    raise error
