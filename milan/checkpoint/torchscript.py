"""Reading the weights of a TorchScript archive without running TorchScript or any pickled code.

``torch.jit.load`` compiles and runs the archive's code, and ``torch.load(weights_only=True)`` refuses TorchScript
archives, so OpenAI's published CLIP files (``ViT-B-16.pt`` ...) have no safe loader in torch. The archive is a zip:
``<name>/data.pkl`` pickles the module tree (objects of TorchScript classes named ``__torch__.*``, whose state holds
their parameters, buffers and submodules) and each tensor's bytes sit in ``<name>/data/<key>``.

:func:`read_torchscript` unpickles ``data.pkl`` with a restricted unpickler: every ``__torch__.*`` class becomes an
inert :class:`ScriptObject` that only records its state, tensors are rebuilt from the raw records, a handful of
torch helpers that only build lists/tensors are allowed, and any other global is refused. Nothing from the archive
is imported, compiled or called. The module tree is then flattened into ``state_dict``-style names
(``visual.conv1.weight`` ...).
"""

from __future__ import annotations

import os
import pickle
import sys
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import Any, NamedTuple

import torch

from milan.checkpoint.bounds import MAX_INFLATED_METADATA, check_tensors, check_zip, read_record
from milan.checkpoint.errors import CheckpointError
from milan.checkpoint.inert import pickle_globals

_STORAGE_DTYPES: dict[str, torch.dtype] = {
    "FloatStorage": torch.float32,
    "DoubleStorage": torch.float64,
    "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16,
    "LongStorage": torch.int64,
    "IntStorage": torch.int32,
    "ShortStorage": torch.int16,
    "CharStorage": torch.int8,
    "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
}


class ScriptObject:
    """Inert stand-in for an instance of a TorchScript class; ``state`` is what the archive pickled for it."""

    qualified_name = ""

    def __init__(self, *args: Any) -> None:
        self.state: Any = args

    def __setstate__(self, state: Any) -> None:
        self.state = state


class _StorageType(NamedTuple):
    dtype: torch.dtype


def _rebuild_tensor(
    storage: torch.Tensor, offset: int, size: tuple[int, ...], stride: tuple[int, ...], *_: Any
) -> torch.Tensor:
    """``torch._utils._rebuild_tensor_v2`` over a flat tensor holding the storage's bytes (a view: nothing copied)."""
    values = [offset, *size, *stride]
    if not all(isinstance(v, int) and v >= 0 for v in values) or len(size) != len(stride):
        raise pickle.UnpicklingError(f"malformed tensor view: offset {offset!r}, shape {size!r}, strides {stride!r}")
    if 0 not in size:
        extent = offset + sum((n - 1) * st for n, st in zip(size, stride, strict=True)) + 1
        if extent > storage.numel():
            raise pickle.UnpicklingError(
                f"a tensor view of shape {tuple(size)} reaches element {extent} of a storage of {storage.numel()}"
            )
    return torch.as_strided(storage, tuple(size), tuple(stride), int(offset))


def _first(value: Any, *_: Any) -> Any:
    return value


_ALLOWED: dict[tuple[str, str], Any] = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("collections", "OrderedDict"): OrderedDict,
    ("torch.jit._pickle", "restore_type_tag"): _first,
    ("torch.jit._pickle", "build_intlist"): list,
    ("torch.jit._pickle", "build_doublelist"): list,
    ("torch.jit._pickle", "build_boollist"): list,
    ("torch.jit._pickle", "build_tensorlist"): list,
}


class _ArchiveUnpickler(pickle.Unpickler):
    def __init__(self, data: bytes, zf: zipfile.ZipFile, prefix: str, path: Path) -> None:
        import io

        super().__init__(io.BytesIO(data))
        self._zf = zf
        self._prefix = prefix
        self._path = path
        self._storages: dict[str, torch.Tensor] = {}
        self._classes: dict[str, type[ScriptObject]] = {}

    def find_class(self, module: str, name: str) -> Any:
        if module.startswith("__torch__.") or module == "__torch__":
            qualified = f"{module}.{name}"
            if qualified not in self._classes:
                cls = type(name, (ScriptObject,), {"qualified_name": qualified})
                self._classes[qualified] = cls
            return self._classes[qualified]
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(_STORAGE_DTYPES[name])
        allowed = _ALLOWED.get((module, name))
        if allowed is None:
            raise pickle.UnpicklingError(f"TorchScript archive references {module}.{name}, which is not allowed")
        return allowed

    def persistent_load(self, pid: Any) -> torch.Tensor:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise pickle.UnpicklingError(f"unexpected persistent id {pid!r:.80}")
        _, storage_type, key, _location, numel = pid
        if not isinstance(storage_type, _StorageType):
            raise pickle.UnpicklingError(f"unknown storage type {storage_type!r:.80}")
        if not isinstance(numel, int) or numel < 0:
            raise pickle.UnpicklingError(f"malformed storage size {numel!r:.80}")
        cache_key = f"{key}:{storage_type.dtype}"
        if cache_key not in self._storages:
            record = f"{self._prefix}/data/{key}"
            try:
                info = self._zf.getinfo(record)
            except KeyError as e:
                raise CheckpointError(f"TorchScript archive {self._path} lacks the tensor record {record!r}") from e
            dtype = storage_type.dtype
            need = numel * torch.empty((), dtype=dtype).element_size()
            if info.file_size < need:
                raise CheckpointError(f"TorchScript archive {self._path}: record {record!r} is shorter than its tensor")
            if info.compress_type != zipfile.ZIP_STORED and info.file_size > need:
                raise CheckpointError(
                    f"TorchScript archive {self._path}: compressed record {record!r} would inflate to "
                    f"{info.file_size} bytes but its tensor needs {need}; refusing to inflate it"
                )
            raw = read_record(self._zf, info, need)  # never more than the tensor needs, whatever the record claims
            if len(raw) < need:
                raise CheckpointError(f"TorchScript archive {self._path}: record {record!r} is truncated")
            flat = torch.frombuffer(bytearray(raw), dtype=dtype) if raw else torch.empty(0, dtype=dtype)
            self._storages[cache_key] = flat
        return self._storages[cache_key]


def read_torchscript(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Reads every tensor attribute of a TorchScript archive's module tree, safely.

    Args:
        path: A file written by ``torch.jit.save`` (e.g. OpenAI's ``ViT-B-16.pt``).

    Returns:
        ``{dotted.name: tensor}`` in module order, as ``torch.jit.load(path).state_dict()`` would name them (plain
        tensor attributes that are not parameters or buffers are included too). Tensors keep their stored dtype.

    Raises:
        CheckpointError: Not a TorchScript archive, corrupt, or it references anything but TorchScript classes,
            tensors and lists.
    """
    path = Path(path)
    try:
        with zipfile.ZipFile(path) as zf:
            check_zip(path, zf)
            pkls = [n for n in zf.namelist() if n.count("/") == 1 and n.endswith("/data.pkl")]
            if len(pkls) != 1 or f"{pkls[0].split('/')[0]}/constants.pkl" not in zf.namelist():
                raise CheckpointError(f"{path} is not a TorchScript archive (no <name>/data.pkl + constants.pkl)")
            prefix = pkls[0].split("/")[0]
            order = f"{prefix}/byteorder"
            stored_order = read_record(zf, order, 16).decode().strip() if order in zf.namelist() else sys.byteorder
            if stored_order != sys.byteorder:
                raise CheckpointError(f"{path}: stored with {stored_order} byte order; not supported here")
            root = _ArchiveUnpickler(read_record(zf, pkls[0]), zf, prefix, path).load()
    except CheckpointError:
        raise
    except pickle.UnpicklingError as e:  # incl. malformed views (see _rebuild_tensor)
        raise CheckpointError(f"refusing to read TorchScript archive {path}: {e}") from e
    except Exception as e:  # zip/pickle structure errors on a damaged file
        raise CheckpointError(f"cannot read TorchScript archive {path} (truncated or corrupt?): {e}") from e
    out: dict[str, torch.Tensor] = {}
    _flatten(root, "", out, set())
    if not out:
        raise CheckpointError(f"TorchScript archive {path} holds no tensors")
    check_tensors(out, path)  # no stride-0 view expands into more than the file holds
    return {k: v.clone() for k, v in out.items()}  # own storage: no views into the whole record buffers


def torchscript_classes(path: str | os.PathLike[str]) -> list[str]:
    """The qualified names of the TorchScript classes in an archive's module tree (``__torch__....QuickGELU`` ...).

    Read from the pickle's opcodes: nothing is unpickled. An empty list if ``path`` is not a TorchScript archive.
    """
    try:
        with zipfile.ZipFile(path) as zf:
            pkls = [n for n in zf.namelist() if n.count("/") == 1 and n.endswith("/data.pkl")]
            if len(pkls) != 1:
                return []
            data = read_record(zf, pkls[0], MAX_INFLATED_METADATA)
        names = {f"{m}.{n}" for m, n in pickle_globals(data)}
    except Exception:  # damaged: the reader reports it
        return []
    return sorted(n for n in names if n.startswith("__torch__."))


def _flatten(obj: Any, prefix: str, out: dict[str, torch.Tensor], seen: set[int]) -> None:
    if isinstance(obj, torch.Tensor):
        out[prefix] = obj
        return
    if not isinstance(obj, ScriptObject) or id(obj) in seen:
        return
    seen.add(id(obj))
    state = obj.state
    if isinstance(state, tuple) and len(state) == 1 and isinstance(state[0], dict):
        state = state[0]
    if isinstance(state, dict):
        for name, value in state.items():
            if isinstance(name, str):
                _flatten(value, f"{prefix}.{name}" if prefix else name, out, seen)
