"""Training checkpoints: atomic writes, ``last.pt`` plus numbered copies, and resume with fallback.

Layout of ``RUN_DIR/checkpoints/``: ``last.pt`` (refreshed at every save) and a numbered copy ``epoch_NNNN.pt``
of each epoch-end save, the newest ``checkpoint.keep`` of them kept. Every file is written to a
temporary file and renamed, so a crash never leaves a partial checkpoint under a real name. A checkpoint is a
plain dict of tensors and containers (loaded with ``weights_only=True``)::

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
import os
import random
import re
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from milan.checkpoint.io import CheckpointError, atomic_save, safe_load
from milan.engine.loop import TrainState

FORMAT = "milan-train"
VERSION = 1
REQUIRED_KEYS = ("model", "optimizer", "state", "config")
_EPOCH_FILE = re.compile(r"^epoch_(\d+)\.pt$")


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
    """Restores :func:`rng_state` (missing entries are left alone)."""
    if "python" in state:
        words, gauss = state["python"]
        random.setstate((3, tuple(int(w) for w in words), gauss))
    if "numpy" in state:
        keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state(("MT19937", keys.numpy().astype(np.uint32), int(pos), int(has_gauss), float(cached)))
    if "torch" in state:
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
    """Assembles a checkpoint dict (see the module docstring).

    Args:
        model: The trained module, unwrapped from DDP/compile (for FSDP2 pass the sharded module: its full state
            is gathered; every process must call this).
        optimizer: Its state.
        state: Training position.
        config: The resolved config as plain data.
        scaler: fp16 loss scaler.
        extra: More top-level entries (e.g. ``{"teacher": ...}``).
        world_size: Recorded in ``meta``.

    Returns:
        The checkpoint.
    """
    model_sd, optim_sd = _model_optimizer_state(model, optimizer)
    return {
        "format": FORMAT,
        "version": VERSION,
        "model": model_sd,
        "optimizer": optim_sd,
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
    restore_rng: bool = True,
) -> TrainState:
    """Loads model, optimizer, scaler and RNG states from a checkpoint; returns its training position.

    Raises:
        CheckpointError: The model weights do not fit ``model`` (different architecture).
    """
    try:
        _load_model_optimizer_state(model, optimizer, ckpt["model"], ckpt["optimizer"])
    except (RuntimeError, KeyError, ValueError) as e:
        raise CheckpointError(f"the checkpoint does not match this model/optimizer: {str(e).splitlines()[0]}") from e
    if scaler is not None and ckpt.get("scaler"):
        scaler.load_state_dict(ckpt["scaler"])
    if restore_rng and ckpt.get("rng"):
        set_rng_state(ckpt["rng"])
    return TrainState(**{k: int(v) for k, v in ckpt["state"].items()})


def _is_fsdp(model: nn.Module) -> bool:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - older torch
        return False
    return isinstance(model, FSDPModule)


def _model_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict[str, Any], Any]:
    """Full (unsharded) model and optimizer states keyed by parameter names, on the CPU.

    ``torch.distributed.checkpoint``'s state-dict API strips DDP/compile prefixes, gathers FSDP2 shards and keys the
    optimizer state by parameter name, so a checkpoint does not depend on the strategy or the number of processes
    (a DDP run can resume as FSDP2 and vice versa).
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    sharded = _is_fsdp(model)  # gathering shards is collective: every process calls this, rank 0 keeps the result
    model_sd, optim_sd = get_state_dict(
        model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=sharded)
    )
    return _to_cpu(model_sd), _to_cpu(optim_sd)


def _load_model_optimizer_state(
    model: nn.Module, optimizer: torch.optim.Optimizer, model_sd: Any, optim_sd: Any
) -> None:
    if optim_sd.get("state") and all(isinstance(k, int) for k in optim_sd["state"]):  # torch's own index-keyed format
        model.load_state_dict(model_sd)
        optimizer.load_state_dict(optim_sd)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    opts = StateDictOptions(full_state_dict=True)
    set_state_dict(model, optimizer, model_state_dict=model_sd, optim_state_dict=optim_sd, options=opts)


def _to_cpu(tree: Any) -> Any:
    if isinstance(tree, torch.Tensor):
        return tree.detach().cpu()
    if isinstance(tree, dict):
        return {k: _to_cpu(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(_to_cpu(v) for v in tree)
    return tree


class Checkpointer:
    """Writes and finds the checkpoints of one run folder.

    Args:
        run_dir: The run folder (checkpoints go to ``run_dir/checkpoints``).
        keep: Numbered copies to keep (0: keep only ``last.pt``).
        every_epochs: Epoch-end saves at multiples of this also keep a numbered copy (0: never).
        enabled: Whether this process writes (only the main process should).
    """

    def __init__(
        self, run_dir: str | os.PathLike[str], *, keep: int = 3, every_epochs: int = 1, enabled: bool = True
    ) -> None:
        self.dir = Path(run_dir) / "checkpoints"
        self.keep = keep
        self.every_epochs = every_epochs
        self.enabled = enabled

    @property
    def last(self) -> Path:
        """``checkpoints/last.pt``."""
        return self.dir / "last.pt"

    def save(self, ckpt: dict[str, Any], *, epoch_end: int | None = None) -> Path | None:
        """Writes ``last.pt`` atomically, plus a numbered copy when an epoch-end save is due.

        Args:
            ckpt: The checkpoint.
            epoch_end: The number of finished epochs when saving at an epoch end: a copy ``epoch_NNNN.pt`` is
                made when it is a multiple of ``every_epochs``, and numbered copies beyond the newest ``keep``
                are deleted.

        Returns:
            The path of ``last.pt`` (``None`` on processes that do not write).
        """
        if not self.enabled:
            return None
        atomic_save(ckpt, self.last)
        if epoch_end is not None and self.keep > 0 and self.every_epochs > 0 and epoch_end % self.every_epochs == 0:
            self._link_or_copy(self.last, self.dir / f"epoch_{epoch_end:04d}.pt")
            self._prune()
        return self.last

    def numbered(self) -> list[Path]:
        """Numbered checkpoints, oldest first."""
        if not self.dir.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.dir.iterdir() if (m := _EPOCH_FILE.match(p.name))]
        return [p for _, p in sorted(found)]

    def candidates(self) -> list[Path]:
        """Every checkpoint file, newest first (by modification time, then name)."""
        files = [*self.numbered(), self.last] if self.last.exists() else self.numbered()
        return sorted(files, key=lambda p: (p.stat().st_mtime_ns, p.name == "last.pt"), reverse=True)

    def latest_valid(self) -> tuple[Path, dict[str, Any]] | None:
        """The newest checkpoint that loads and has the required entries, with its contents.

        Unusable files (e.g. damaged outside our atomic writes) are skipped with a warning.
        """
        for path in self.candidates():
            try:
                return path, load_training_checkpoint(path)
            except CheckpointError as e:
                warnings.warn(f"skipping unusable checkpoint {path}: {e}", stacklevel=2)
        return None

    def _link_or_copy(self, src: Path, dst: Path) -> None:
        tmp = dst.with_name(f".{dst.name}.tmp")
        tmp.unlink(missing_ok=True)
        try:
            os.link(src, tmp)  # same bytes, no second write
        except OSError:
            tmp.write_bytes(src.read_bytes())
        os.replace(tmp, dst)

    def _prune(self) -> None:
        for old in self.numbered()[: -self.keep]:
            old.unlink(missing_ok=True)


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
