"""Safe checkpoint file I/O: atomic writes, and loads that never execute pickled code.

What :func:`safe_load` accepts:

* ``torch.save`` files (zip or legacy format), read with ``weights_only=True``: tensors and plain containers only
  (plus ``argparse.Namespace``, which the original MILAN/MAE checkpoints use for their ``args``);
* training checkpoints of OpenMMLab's mmengine (mmpretrain, MMSelfSup 1.x): their weights and plain metadata load as
  above; the bookkeeping objects pickled next to them (the ``message_hub`` history, numpy arrays) come back as inert
  :class:`~milan.checkpoint.inert.Inert` records. mmengine is not imported and nothing named in the file is called;
* ``.safetensors`` files (recognised by their header, whatever the suffix);
* TorchScript archives (e.g. OpenAI's ``ViT-B-16.pt``): their tensors are read by a restricted unpickler that never
  runs TorchScript (see :mod:`milan.checkpoint.torchscript`), and come back as a flat ``{name: tensor}`` dict.

Before anything is materialised, every tensor's claimed size is checked against the bytes in the file (stride-0
views, storage records shorter than their tensors, compressed records that would inflate beyond them: see
:mod:`milan.checkpoint.bounds`).

Anything else raises :class:`CheckpointError` with a message naming the file and the problem: missing, empty,
truncated (no zip directory), corrupt (CRC mismatch), not a checkpoint at all, lying about its size, or a pickle
that would import and call Python objects (the message lists them; nothing is imported or run).

Files are written atomically (a temporary file in the same folder, renamed over the destination) and, like any file
a program creates, with the permissions the user's umask allows.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import struct
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from milan.checkpoint.bounds import check_legacy, check_tensors, check_zip, read_record
from milan.checkpoint.errors import CheckpointError
from milan.checkpoint.inert import inert_allowed, pickle_globals, python3_name, standins
from milan.checkpoint.torchscript import read_torchscript

__all__ = ["CheckpointError", "atomic_save", "read_safetensors_metadata", "safe_load", "save_safetensors"]


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
    with _atomic_path(Path(path)) as tmp, tmp.open("wb") as f:
        torch.save(obj, f)
    return Path(path)


def save_safetensors(
    tensors: dict[str, torch.Tensor], path: str | os.PathLike[str], metadata: dict[str, str] | None = None
) -> Path:
    """Writes tensors as ``.safetensors`` atomically (contiguous CPU tensors; shared storage is un-shared).

    Args:
        tensors: Flat ``{name: tensor}`` dict.
        path: Destination.
        metadata: String key/values stored in the header (``{"format": "pt"}`` is always added, which Hugging Face
            loaders require).

    Returns:
        The destination path.
    """
    from safetensors.torch import save_file

    data: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for key, value in tensors.items():
        t = value.detach().to("cpu").contiguous()
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen or t.numel() != t.untyped_storage().nbytes() // max(1, t.element_size()):
            t = t.clone()  # safetensors refuses tensors sharing (or viewing part of) a storage
        seen.add(t.untyped_storage().data_ptr())
        data[key] = t
    with _atomic_path(Path(path)) as tmp:
        save_file(data, tmp, metadata={"format": "pt", **(metadata or {})})
    return Path(path)


def read_safetensors_metadata(path: str | os.PathLike[str]) -> dict[str, str]:
    """The string metadata of a ``.safetensors`` header (empty when there is none)."""
    header = _safetensors_header(Path(path))
    if header is None:
        raise CheckpointError(f"not a safetensors file: {path}")
    meta = header.get("__metadata__") or {}
    return {str(k): str(v) for k, v in meta.items()}


def safe_load(path: str | os.PathLike[str]) -> Any:
    """Loads a checkpoint onto the CPU without ever executing pickled code.

    Args:
        path: A ``torch.save`` file, a ``.safetensors`` file, or a TorchScript archive.

    Returns:
        The loaded object (a flat ``{name: tensor}`` dict for safetensors files and TorchScript archives).

    Raises:
        CheckpointError: The file is missing, empty, truncated/corrupt, not a checkpoint, or needs arbitrary code to
            unpickle.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    if not path.is_file():
        raise CheckpointError(f"not a file: {path} (for a Hugging Face folder use milan.checkpoint.read_checkpoint)")
    size = path.stat().st_size
    if size == 0:
        raise CheckpointError(f"checkpoint is empty (0 bytes): {path}")
    with path.open("rb") as f:
        magic = f.read(4)
    if _safetensors_header(path) is not None or path.suffix == ".safetensors":
        return _load_safetensors(path)
    if magic == b"PK\x03\x04":
        return _load_zip(path)
    if not magic.startswith(b"\x80"):  # legacy torch.save files are pickles with a protocol >= 2 header
        raise CheckpointError(
            f"cannot read checkpoint {path}: not a PyTorch, safetensors or TorchScript file (it starts with {magic!r})"
        )
    return _load_legacy(path)


# ----------------------------------------------------------------------------------------------------------------


@contextmanager
def _atomic_path(path: Path) -> Iterator[Path]:
    """A temporary file next to ``path`` for the block to write; then fsynced and renamed over ``path``.

    The file ends with mode 0o666 less the umask, as ``open()`` creates files (``tempfile.mkstemp`` would give 0o600,
    and so do writers that replace the file with their own temporary one, e.g. safetensors). If the block raises,
    the temporary file is removed and ``path`` is left as it was.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        tmp = path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the umask applies here
        except FileExistsError:
            continue
        mode = os.fstat(fd).st_mode & 0o777
        os.close(fd)
        break
    try:
        yield tmp
        os.chmod(tmp, mode)
        with tmp.open("r+b") as f:  # the data reaches the disk before the rename makes it visible
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _safetensors_header(path: Path) -> dict[str, Any] | None:
    """The parsed JSON header if ``path`` looks like a safetensors file, else ``None``."""
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            return None
        (n,) = struct.unpack("<Q", head)
        if not 2 <= n <= min(size - 8, 100_000_000):
            return None
        raw = f.read(n)
    if not raw.startswith(b"{"):
        return None
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    return header if isinstance(header, dict) else None


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except Exception as e:  # safetensors raises its own error types
        raise CheckpointError(f"cannot read safetensors file {path} (truncated or corrupt?): {e}") from e


def _load_zip(path: Path) -> Any:
    try:
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
            check_zip(path, zf)  # before anything is inflated: records sized as the tensors need
            bad = zf.testzip()  # CRC-checks every record
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as e:
        raise CheckpointError(f"cannot read checkpoint {path}: truncated or corrupt zip archive ({e})") from e
    if bad is not None:
        raise CheckpointError(f"checkpoint {path} is corrupt: record {bad!r} fails its CRC check")
    if any(n.split("/")[-1] == "constants.pkl" and n.count("/") == 1 for n in names):
        return read_torchscript(path)

    def pickled() -> bytes:
        pkl = next((n for n in names if n.split("/")[-1] == "data.pkl" and n.count("/") == 1), None)
        if pkl is None:
            return b""
        with zipfile.ZipFile(path) as zf:
            return read_record(zf, pkl)

    return _torch_load(path, pickled)


def _load_legacy(path: Path) -> Any:
    check_legacy(path)
    return _torch_load(path, path.read_bytes)


def _torch_load(path: Path, pickled: Callable[[], bytes]) -> Any:
    """``torch.load(weights_only=True)``, then the size checks of every loaded tensor.

    A file refused only for training bookkeeping (see :func:`~milan.checkpoint.inert.inert_allowed`) is loaded again
    with those objects as inert records.
    """
    try:
        obj = _weights_only_load(path, [])
    except Exception as e:  # anything torch raises on a bad file becomes one clear message
        data = pickled()
        try:
            names = dict.fromkeys(python3_name(*g) for g in pickle_globals(data))
            unsafe = [g for g in names if ".".join(g) not in _allowed_globals()]
        except Exception:  # not a pickle stream at all
            unsafe = []
        if not unsafe or not all(inert_allowed(*g) for g in unsafe):
            raise _explain(path, data, e) from e
        try:
            obj = _weights_only_load(path, standins(unsafe))
        except Exception as again:
            raise CheckpointError(
                f"cannot read checkpoint {path}: its {', '.join('.'.join(g) for g in unsafe[:6])} objects could not "
                f"be read as inert records ({type(again).__name__}: {_first_line(again)})"
            ) from again
    check_tensors(obj, path)
    return obj


def _weights_only_load(path: Path, inert: list[Any]) -> Any:
    # argparse.Namespace is a plain attribute bag (the original MILAN/MAE checkpoints store their args as one);
    # building it runs no code from the file. The inert stand-ins only record what the pickle gives them.
    with torch.serialization.safe_globals([argparse.Namespace, *inert]):
        return torch.load(path, map_location="cpu", weights_only=True)


def _explain(path: Path, pickled: bytes, error: Exception) -> CheckpointError:
    """Turns a failed ``weights_only`` load into a readable error: unsafe globals, or not a checkpoint."""
    try:
        names = list(dict.fromkeys(".".join(python3_name(*g)) for g in pickle_globals(pickled)))
    except Exception:  # not a pickle stream at all
        return CheckpointError(
            f"cannot read checkpoint {path}: not a PyTorch, safetensors or TorchScript file, or corrupt "
            f"({type(error).__name__}: {_first_line(error)})"
        )
    unsafe = [n for n in names if n not in _allowed_globals()]
    if unsafe:
        return CheckpointError(
            f"refusing to load {path}: unpickling it would import and call {', '.join(unsafe[:8])}"
            f"{' ...' if len(unsafe) > 8 else ''}, which can run arbitrary code; weights_only=True allows only tensors "
            "and plain containers. If you trust the file, re-save its weights once with trusted code: load it in a "
            "session where you allow full unpickling (weights_only off) and save only its tensors, e.g. "
            "torch.save(ckpt['state_dict'], 'weights.pth'), or as .safetensors."
        )
    return CheckpointError(f"cannot read checkpoint {path} (truncated or corrupt?): {_first_line(error)}")


def _first_line(error: Exception) -> str:
    lines = [ln.strip() for ln in str(error).splitlines() if ln.strip()]
    detail = [ln for ln in lines if "Unsupported" in ln or "Invalid" in ln or "invalid" in ln]
    return (detail or lines or [type(error).__name__])[0][:300]


def _allowed_globals() -> set[str]:
    try:
        from torch._weights_only_unpickler import _get_allowed_globals

        return set(_get_allowed_globals()) | {"argparse.Namespace"}
    except (ImportError, AttributeError):  # private API moved: report every global
        return {"argparse.Namespace"}
