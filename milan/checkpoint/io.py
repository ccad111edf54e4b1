"""Safe checkpoint file I/O: atomic writes, and loads that never execute pickled code."""

from __future__ import annotations

import os
import pickle
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import torch


class CheckpointError(RuntimeError):
    """A checkpoint file that cannot be read safely (missing, truncated, corrupt or unsafe)."""


def atomic_save(obj: Any, path: str | os.PathLike[str]) -> Path:
    """``torch.save`` to a temporary file in the same folder, fsync, then rename over ``path``.

    A crash mid-write leaves the previous file intact; readers never see a partial file.

    Args:
        obj: Anything ``torch.save`` accepts (keep it to tensors and plain containers so that
            ``weights_only=True`` can load it).
        path: Destination.

    Returns:
        The destination path.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def safe_load(path: str | os.PathLike[str]) -> Any:
    """Loads a ``torch.save`` file with ``weights_only=True`` (or a ``.safetensors`` file) onto the CPU.

    Args:
        path: File to read.

    Returns:
        The loaded object.

    Raises:
        CheckpointError: The file is missing, empty, truncated/corrupt, or needs arbitrary code to unpickle.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint is empty (0 bytes): {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except Exception as e:  # safetensors raises its own error types
            raise CheckpointError(f"cannot read safetensors file {path}: {e}") from e
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"refusing to load {path}: it needs arbitrary code to unpickle, which weights_only=True forbids "
            f"(only tensors and plain containers are allowed). Details: {str(e).splitlines()[0]}"
        ) from e
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as e:
        raise CheckpointError(f"cannot read checkpoint {path} (truncated or corrupt?): {e}") from e
