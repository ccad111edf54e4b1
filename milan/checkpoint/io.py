"""Safe checkpoint file I/O: loads that never execute pickled code nor allocate more than a file holds; atomic writes.

What :func:`safe_load` accepts:

* ``torch.save`` files (zip or legacy format), read with ``weights_only=True``: tensors and plain containers only
  (plus ``argparse.Namespace``, which the original MILAN/MAE checkpoints use for their ``args``);
* training checkpoints of OpenMMLab's mmengine (mmpretrain, MMSelfSup 1.x): the bookkeeping objects pickled next to
  the weights (mmengine's ``MessageHub`` history of ``HistoryBuffer`` objects holding numpy arrays, reached through
  ``getattr``) come back as inert :class:`Inert` records of what was pickled. mmengine is not imported and nothing
  named in the file is called;
* ``.safetensors`` files (recognised by their header, whatever the suffix);
* TorchScript archives (e.g. OpenAI's ``ViT-B-16.pt``), read without running their code.

A file can lie about its size: a tensor can be a stride-0 view of one element that claims gigabytes, a zip record
can deflate to gigabytes. Before anything is materialised, each tensor's claimed bytes are checked against the file
(:func:`check_zip`, :func:`check_legacy`, :func:`check_tensors`), and records are read with a bound
(:func:`read_record`). Every refusal is one :class:`~milan.errors.CheckpointError` line naming the file and the
problem: missing, empty, truncated, corrupt (CRC mismatch), not a checkpoint, lying about its size, or a pickle that
would import and call Python objects (the message lists them; nothing is imported or run).
"""

from __future__ import annotations

import argparse
import functools
import io
import os
import pickle
import secrets
import struct
import sys
import zipfile
from _compat_pickle import IMPORT_MAPPING, NAME_MAPPING
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, ClassVar, NamedTuple

import torch

from milan.errors import CheckpointError, CheckpointNotFoundError

__all__ = [
    "CheckpointError",
    "atomic_path",
    "atomic_save",
    "read_safetensors_metadata",
    "safe_load",
    "save_safetensors",
]

MAX_INFLATED_METADATA = 64 << 20  # a compressed record that holds no tensor data (a pickle, code) inflates to <= this


# ----------------------------------------------------------------------------------------------------------------
# Writing


def atomic_save(obj: Any, path: str | os.PathLike[str]) -> Path:
    """``torch.save`` to a temporary file next to ``path``, fsync, then rename: a crash leaves the old file intact.

    Keep ``obj`` to tensors and plain containers so that ``weights_only=True`` can load it.
    """
    with atomic_path(Path(path)) as tmp, tmp.open("wb") as f:
        torch.save(obj, f)
    return Path(path)


def save_safetensors(
    tensors: dict[str, torch.Tensor], path: str | os.PathLike[str], metadata: dict[str, str] | None = None
) -> Path:
    """Writes tensors as ``.safetensors`` atomically (contiguous CPU tensors; shared storage is un-shared).

    ``{"format": "pt"}`` is always added to ``metadata`` (Hugging Face loaders require it).
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
    with atomic_path(Path(path)) as tmp:
        save_file(data, tmp, metadata={"format": "pt", **(metadata or {})})
    return Path(path)


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A temporary file next to ``path`` for the block to write; then fsynced and renamed over ``path``.

    The file ends with mode 0o666 less the umask, as ``open()`` creates files (``tempfile.mkstemp`` would give 0o600,
    and so do writers that replace the file with their own temporary one, e.g. safetensors). If the block raises,
    the temporary file is removed and ``path`` is left as it was.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{secrets.token_hex(8)}.tmp"  # O_EXCL: never another writer's file
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the umask applies here
    mode = os.fstat(fd).st_mode & 0o777
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, mode)
        with tmp.open("r+b") as f:  # the data reaches the disk before the rename makes it visible
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


# ----------------------------------------------------------------------------------------------------------------
# Reading


def safe_load(path: str | os.PathLike[str]) -> Any:
    """Loads a checkpoint onto the CPU without ever executing pickled code (refusals: see the module docstring).

    Returns:
        The loaded object (a flat ``{name: tensor}`` dict for safetensors files and TorchScript archives).
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointNotFoundError(f"checkpoint not found: {path}")
    if not path.is_file():
        raise CheckpointError(f"not a file: {path} (for a Hugging Face folder use milan.checkpoint.read_checkpoint)")
    if path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint is empty (0 bytes): {path}")
    if read_safetensors_metadata(path) is not None or path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except Exception as e:  # safetensors raises its own error types
            raise CheckpointError(f"cannot read safetensors file {path} (truncated or corrupt?): {e}") from e
    with path.open("rb") as f:
        magic = f.read(4)
    if magic == b"PK\x03\x04":
        return _load_zip(path)
    if not magic.startswith(b"\x80"):  # legacy torch.save files are pickles with a protocol >= 2 header
        raise CheckpointError(
            f"cannot read checkpoint {path}: not a PyTorch, safetensors or TorchScript file (it starts with {magic!r})"
        )
    return _torch_load(path, check_legacy(path))


def read_safetensors_metadata(path: str | os.PathLike[str]) -> dict[str, str] | None:
    """The string metadata of a complete ``.safetensors`` file's header (whatever its suffix), else ``None``."""
    from safetensors import safe_open

    try:
        with safe_open(path, "pt") as f:  # reads and checks the bounded header only
            return dict(f.metadata() or {})
    except Exception:  # safetensors' own error types: not a safetensors file, or a damaged one
        return None


def _load_zip(path: Path) -> Any:
    """A ``torch.save`` zip archive, or a TorchScript one (it has ``NAME/constants.pkl`` next to ``NAME/data.pkl``)."""
    try:
        with zipfile.ZipFile(path) as zf:
            names = check_zip(path, zf)  # before anything is inflated: records sized as the tensors need
            bad = zf.testzip()  # CRC-checks every record
            if bad is not None:
                raise CheckpointError(f"checkpoint {path} is corrupt: record {bad!r} fails its CRC check")
            # TorchScript: ``NAME/constants.pkl`` next to the ``NAME/data.pkl`` that loaders read
            tops = [n.split("/")[0] for n in zf.namelist() if n.count("/") == 1 and n.endswith("/data.pkl")]
            if tops and f"{tops[0]}/constants.pkl" in zf.namelist():
                return _read_torchscript(path, zf, tops[0])
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as e:
        raise CheckpointError(f"cannot read checkpoint {path}: truncated or corrupt zip archive ({e})") from e
    return _torch_load(path, names)


def _torch_load(path: Path, names: list[tuple[str, str]] | None) -> Any:
    """``torch.load(weights_only=True)``, then the size checks of every loaded tensor.

    ``names`` are the globals the file's pickles name, as the size checks found them (``None``: no pickle). A file
    refused only for training bookkeeping (see ``_INERT_PACKAGES``) is loaded again with those objects as inert
    records.
    """
    try:
        obj = _weights_only_load(path, [])
    except Exception as e:  # anything torch raises on a bad file becomes one clear message
        if names is None:  # not a pickle stream at all
            raise CheckpointError(
                f"cannot read checkpoint {path}: not a PyTorch, safetensors or TorchScript file, or corrupt "
                f"({type(e).__name__}: {_first_line(e)})"
            ) from e
        unsafe = [g for g in dict.fromkeys(names) if ".".join(g) not in _allowed_globals()]
        if not unsafe:
            raise CheckpointError(f"cannot read checkpoint {path} (truncated or corrupt?): {_first_line(e)}") from e
        if not all(g == _INERT_GETATTR or g[0].split(".")[0] in _INERT_PACKAGES for g in unsafe):
            raise CheckpointError(
                f"refusing to load {path}: unpickling it would import and call "
                f"{', '.join('.'.join(g) for g in unsafe[:8])}{' ...' if len(unsafe) > 8 else ''}, which can run "
                "arbitrary code; weights_only=True allows only tensors and plain containers. If you trust the file, "
                "re-save its weights once with trusted code: load it in a session where you allow full unpickling "
                "(weights_only off) and save only its tensors, e.g. torch.save(ckpt['state_dict'], 'weights.pth'), "
                "or as .safetensors."
            ) from e
        try:
            obj = _weights_only_load(path, [standin(m, n) for m, n in unsafe])
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


# ----------------------------------------------------------------------------------------------------------------
# Pickles read without importing or calling anything they name

# Names whose objects may be read as inert records (anything else torch's weights_only loader refuses stays refused):
# OpenMMLab's training bookkeeping, numpy arrays and scalars inside it, and ``getattr``, by which pickles refer to
# methods (e.g. ``getattr(HistoryBuffer, 'min')``).
_INERT_PACKAGES = ("mmengine", "mmcv", "mmpretrain", "mmselfsup", "mmcls", "numpy")
_INERT_GETATTR = ("builtins", "getattr")


class Inert:
    """What the pickle built from a name we do not import: the name, the call's arguments, the restored state.

    Whatever else a pickle does with it (call it, set its items, append to it) is absorbed.
    """

    qualified_name: ClassVar[str] = ""
    args: tuple[Any, ...] = ()
    state: Any = None

    def __init__(self, *args: Any) -> None:
        self.args = args

    def __call__(self, *args: Any) -> Inert:
        return Inert(*args)

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __setitem__(self, key: Any, value: Any) -> None:
        pass

    def append(self, item: Any) -> None:
        pass

    def extend(self, items: Any) -> None:
        pass

    def __repr__(self) -> str:
        return f"<inert {self.qualified_name}>"


@functools.cache
def standin(module: str, name: str) -> type[Inert]:
    """The :class:`Inert` subclass that torch's ``weights_only`` allowlist finds by the name ``module.name``.

    Calling it (the pickle's REDUCE), creating it (NEWOBJ) and restoring its state (BUILD) only record what the pickle
    gave; the real class or function is never imported.
    """
    # torch's allowlist looks classes up by ``__module__`` + ``__qualname__``.
    attrs = {"qualified_name": f"{module}.{name}", "__module__": module, "__qualname__": name}
    return type(name.rpartition(".")[2] or "Inert", (Inert,), attrs)


class StorageClaim(NamedTuple):
    """One tensor storage a pickle refers to: its record ``key``, ``numel`` elements taking ``nbytes`` bytes."""

    key: str
    numel: int
    nbytes: int


def _view(storage: torch.Tensor, offset: int, size: Any, stride: Any, *_: Any) -> torch.Tensor:
    """``torch._utils._rebuild_tensor(_v2)`` over a flat tensor holding the storage's bytes (a view, nothing copied).

    ``as_strided`` refuses views that leave the storage; :func:`check_tensors` refuses stride-0 ones that claim more.
    """
    return storage.as_strided(tuple(size), tuple(stride), offset)


_SCRIPT_HELPERS: dict[tuple[str, str], Any] = {  # what TorchScript pickles call: they only build lists and tensors
    ("torch._utils", "_rebuild_tensor_v2"): _view,
    ("torch._utils", "_rebuild_tensor"): _view,
    ("collections", "OrderedDict"): OrderedDict,
    ("torch.jit._pickle", "restore_type_tag"): lambda value, *_: value,
    ("torch.jit._pickle", "build_intlist"): list,
    ("torch.jit._pickle", "build_doublelist"): list,
    ("torch.jit._pickle", "build_boollist"): list,
    ("torch.jit._pickle", "build_tensorlist"): list,
}


class _Unpickler(pickle.Unpickler):
    """Unpickles without importing or calling anything the pickle names; records the globals and storages it names.

    Scanning (no ``storage``): every global becomes an :class:`Inert` stand-in and every storage a placeholder, so any
    well-formed pickle reads and tells what it refers to. Reading a TorchScript ``data.pkl``: instances of
    ``__torch__.*`` classes become Inert records (their state holds their parameters, buffers and submodules),
    storages come from ``storage(key, dtype, numel)``, the helpers above are allowed and any other global is refused.
    """

    def __init__(self, file: IO[bytes], storage: Callable[[str, torch.dtype, int], torch.Tensor] | None = None) -> None:
        super().__init__(file)
        self._storage = storage
        self.globals: list[tuple[str, str]] = []
        self.claims: list[StorageClaim] = []

    def find_class(self, module: str, name: str) -> Any:
        # Python 2 names of protocol-2 pickles (``__builtin__.getattr``) as Python 3 and torch name them
        module, name = NAME_MAPPING.get((module, name)) or (IMPORT_MAPPING.get(module, module), name)
        self.globals.append((module, name))
        if module == "torch" and name.endswith("Storage"):
            return _dtype(name)  # the storage's dtype stands for its type in the persistent ids
        if self._storage is None or module.split(".")[0] == "__torch__":
            return standin(module, name)
        allowed = _SCRIPT_HELPERS.get((module, name))
        if allowed is None:
            raise pickle.UnpicklingError(f"TorchScript archive references {module}.{name}, which is not allowed")
        return allowed

    def persistent_load(self, pid: Any) -> Any:
        # zip files and TorchScript: ('storage', type, key, location, numel); legacy files add view metadata.
        if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage"):
            if self._storage is None:
                return Inert()
            raise pickle.UnpicklingError(f"unexpected persistent id {pid!r:.80}")
        _, dtype, key, _location, numel, *_ = pid
        if not isinstance(dtype, torch.dtype) or not isinstance(numel, int) or numel < 0:
            raise pickle.UnpicklingError(f"malformed storage reference {pid!r:.120}")
        self.claims.append(StorageClaim(str(key), numel, numel * dtype.itemsize))
        return Inert() if self._storage is None else self._storage(str(key), dtype, numel)


def _dtype(storage_name: str) -> torch.dtype:
    """``FloatStorage`` -> ``torch.float32`` ... (``UntypedStorage``: bytes)."""
    if storage_name == "UntypedStorage":
        return torch.uint8
    try:
        return torch.serialization.StorageType(storage_name).dtype  # type: ignore[no-untyped-call,no-any-return]
    except (KeyError, AttributeError) as e:
        raise pickle.UnpicklingError(f"unknown storage type torch.{storage_name}") from e


# ----------------------------------------------------------------------------------------------------------------
# Size checks, before anything is materialised


def check_zip(path: Path, zf: zipfile.ZipFile) -> list[tuple[str, str]] | None:
    """Checks the records of a zip-based checkpoint (``torch.save`` zip or TorchScript) against the file and tensors.

    Every record lies inside the file and a stored record declares the size it occupies; a tensor record holds the
    bytes its storage needs (read from the archive's ``data.pkl``) and, if compressed, inflates to no more; any other
    compressed record (pickles, code) to at most :data:`MAX_INFLATED_METADATA` bytes. Only the central directory and
    ``data.pkl`` are read.

    Returns:
        The globals ``data.pkl`` names (``None`` if there is none).
    """
    file_size = path.stat().st_size
    infos = zf.infolist()
    for info in infos:
        if info.header_offset + info.compress_size > file_size:
            raise CheckpointError(
                f"{path}: zip record {info.filename!r} claims {info.compress_size} bytes past the end of the "
                f"{file_size}-byte file (truncated or forged)"
            )
        if info.compress_type == zipfile.ZIP_STORED and info.file_size != info.compress_size:
            raise CheckpointError(
                f"{path}: zip record {info.filename!r} declares {info.file_size} bytes but stores {info.compress_size}"
            )
    by_name = {info.filename: info for info in infos}
    needs: dict[str, int] = {}
    names: list[tuple[str, str]] | None = None
    for info in infos:
        parts = info.filename.split("/")
        if len(parts) != 2 or parts[1] != "data.pkl":  # the pickle the loaders read (TorchScript's others are not)
            continue
        _bound_metadata(path, info)
        scanner = _Unpickler(io.BytesIO(read_record(zf, info)))
        try:
            scanner.load()
        except Exception as e:  # read with every name inert: only a damaged or malformed pickle fails here
            raise CheckpointError(
                f"cannot read checkpoint {path}: its record {info.filename!r} is not a valid pickle, truncated or "
                f"corrupt ({type(e).__name__}: {str(e)[:200]})"
            ) from e
        names = [*(names or []), *scanner.globals]
        for claim in scanner.claims:
            name = f"{parts[0]}/data/{claim.key}"
            if name not in by_name:
                raise CheckpointError(f"{path}: the tensor record {name!r} is missing")
            needs[name] = max(needs.get(name, 0), claim.nbytes)
    for info in infos:
        name, need = info.filename, needs.get(info.filename)
        if need is None:  # no tensor data: a pickle, code, constants
            _bound_metadata(path, info)
        elif info.file_size < need:
            raise CheckpointError(
                f"{path}: zip record {name!r} holds {_size(info.file_size)} but its tensor storage needs {_size(need)} "
                "(truncated or forged)"
            )
        elif info.compress_type != zipfile.ZIP_STORED and info.file_size > need:
            raise CheckpointError(
                f"{path}: compressed zip record {name!r} would inflate to {_size(info.file_size)} but its tensor "
                f"storage needs only {_size(need)}; refusing to inflate it"
            )
    return names


def read_record(zf: zipfile.ZipFile, name: str | zipfile.ZipInfo, limit: int | None = None) -> bytes:
    """A record's bytes, never inflating more than its declared size (or ``limit``).

    ``ZipFile.read`` inflates each compressed chunk completely before cutting it to the declared size, so a record
    whose header lies about its size can still inflate to gigabytes; reading with a size bounds every step.
    """
    info = name if isinstance(name, zipfile.ZipInfo) else zf.getinfo(name)
    size = info.file_size if limit is None else min(info.file_size, limit)
    with zf.open(info) as f:
        return f.read(size) if size else b""


def check_legacy(path: Path) -> list[tuple[str, str]] | None:
    """Checks that a legacy ``torch.save`` file holds every storage its pickle declares, at the declared size.

    Files that are not in the legacy layout (plain pickles, garbage) pass unchecked: the loader reports them.

    Returns:
        The globals its pickles name (``None`` if it does not start with a pickle).
    """
    file_size = path.stat().st_size
    scanners: list[_Unpickler] = []
    with path.open("rb") as f:
        try:
            for _ in range(5):  # magic number, protocol version, system info, the object, its storages' keys
                scanners.append(_Unpickler(f))
                keys = scanners[-1].load()
            legacy = isinstance(keys, list) and all(isinstance(k, str) for k in keys)
        except Exception:  # a damaged file or another layout (a plain pickle): the loader reports it
            legacy = False
        names = [g for scanner in scanners for g in scanner.globals] if len(scanners) > 1 else None
        if not legacy:
            return names
        declared = {c.key: c for c in scanners[3].claims}
        for key in keys:
            claim = declared.get(key)
            head = f.read(8)
            if claim is None or len(head) < 8:
                return names  # not the layout we know: the loader reports it
            (numel,) = struct.unpack("<q", head)
            if numel != claim.numel:
                raise CheckpointError(
                    f"{path}: storage {key!r} is declared with {claim.numel} elements but the file stores {numel}"
                )
            end = f.tell() + claim.nbytes
            if end > file_size:
                raise CheckpointError(
                    f"{path}: storage {key!r} needs {_size(claim.nbytes)} but the file ends "
                    f"{_size(end - file_size)} short of it (truncated or forged)"
                )
            f.seek(end)
    return names


def check_tensors(obj: Any, path: str | Path) -> None:
    """Checks every tensor in a loaded object (not yet copied) against its storage.

    No stride-0 or overlapping view may claim more elements than its storage holds, and every view stays inside it
    (torch refuses negative strides and offsets when it builds the tensor).
    """
    stack: list[tuple[str, Any]] = [("", obj)]
    seen: set[int] = set()
    while stack:
        name, value = stack.pop()
        if isinstance(value, torch.Tensor):
            _check_tensor(value, name or "<top level>", path)
            continue
        if id(value) in seen:
            continue
        seen.add(id(value))
        if isinstance(value, dict):
            stack.extend((f"{name}.{k}" if name else str(k), v) for k, v in value.items())
        elif isinstance(value, (list, tuple)):
            stack.extend((f"{name}.{i}" if name else str(i), v) for i, v in enumerate(value))
        elif isinstance(value, Inert):
            stack.extend([(name, value.args), (name, value.state)])
        elif hasattr(value, "__dict__") and not isinstance(value, type):  # e.g. argparse.Namespace
            stack.extend((f"{name}.{k}" if name else k, v) for k, v in vars(value).items())


def _check_tensor(t: torch.Tensor, name: str, path: str | Path) -> None:
    if t.layout != torch.strided or t.device.type == "meta" or t.numel() == 0:
        return
    itemsize = t.element_size()
    held = t.untyped_storage().nbytes() // itemsize
    if t.numel() > held:
        raise CheckpointError(
            f"{path}: tensor {name!r} claims shape {tuple(t.shape)} ({_size(t.numel() * itemsize)}) but the file "
            f"holds {held} element(s) ({_size(held * itemsize)}) for it (a stride-0 or overlapping view); refusing "
            "to expand it"
        )
    extent = t.storage_offset() + sum((s - 1) * st for s, st in zip(t.shape, t.stride(), strict=True)) + 1
    if extent > held:
        raise CheckpointError(
            f"{path}: tensor {name!r} (shape {tuple(t.shape)}) reaches element {extent} of a storage of {held}"
        )


def _bound_metadata(path: Path, info: zipfile.ZipInfo) -> None:
    if info.compress_type != zipfile.ZIP_STORED and info.file_size > MAX_INFLATED_METADATA:
        raise CheckpointError(
            f"{path}: compressed zip record {info.filename!r} would inflate to {_size(info.file_size)} (limit "
            f"{_size(MAX_INFLATED_METADATA)} for records that hold no tensor data); refusing to inflate it"
        )


def _size(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} bytes"


# ----------------------------------------------------------------------------------------------------------------
# TorchScript archives. Our own reader because torch has no safe one: ``torch.jit.load`` compiles and runs the
# archive's code, and ``torch.load(weights_only=True)`` refuses TorchScript archives (OpenAI's CLIP files are ones).


def _read_torchscript(path: Path, zf: zipfile.ZipFile, prefix: str) -> dict[str, torch.Tensor]:
    """Every tensor attribute of a (checked) TorchScript archive's module tree, without running any of its code.

    Returns:
        ``{dotted.name: tensor}`` in module order, as ``torch.jit.load(path).state_dict()`` would name them (plain
        tensor attributes that are not parameters or buffers included), in their stored dtype.

    Raises:
        CheckpointError: Corrupt, or it references anything but TorchScript classes, tensors and lists.
    """
    storages: dict[tuple[str, torch.dtype], torch.Tensor] = {}

    def storage(key: str, dtype: torch.dtype, numel: int) -> torch.Tensor:
        if (key, dtype) not in storages:  # check_zip has checked the record's size, testzip its whole content
            raw = read_record(zf, f"{prefix}/data/{key}", numel * dtype.itemsize)  # never more than the tensor needs
            storages[key, dtype] = torch.frombuffer(bytearray(raw), dtype=dtype) if raw else torch.empty(0, dtype=dtype)
        return storages[key, dtype]

    try:
        order = f"{prefix}/byteorder"
        stored_order = read_record(zf, order, 16).decode().strip() if order in zf.namelist() else sys.byteorder
        if stored_order != sys.byteorder:
            raise CheckpointError(f"{path}: stored with {stored_order} byte order; not supported here")
        root = _Unpickler(io.BytesIO(read_record(zf, f"{prefix}/data.pkl")), storage).load()
    except CheckpointError:
        raise
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"refusing to read TorchScript archive {path}: {e}") from e
    except Exception as e:  # zip/pickle structure errors on a damaged file, views outside their storage
        raise CheckpointError(f"cannot read TorchScript archive {path} (truncated or corrupt?): {e}") from e
    out: dict[str, torch.Tensor] = {}
    _flatten(root, "", out, set())
    if not out:
        raise CheckpointError(f"TorchScript archive {path} holds no tensors")
    check_tensors(out, path)  # no stride-0 view expands into more than the file holds
    return {k: v.clone() for k, v in out.items()}  # own storage: no views into the whole record buffers


def _flatten(obj: Any, prefix: str, out: dict[str, torch.Tensor], seen: set[int]) -> None:
    if isinstance(obj, torch.Tensor):
        out[prefix] = obj
        return
    if not isinstance(obj, Inert) or id(obj) in seen:
        return
    seen.add(id(obj))
    state = obj.state if obj.state is not None else obj.args
    if isinstance(state, tuple) and len(state) == 1 and isinstance(state[0], dict):
        state = state[0]
    if isinstance(state, dict):
        for name, value in state.items():
            if isinstance(name, str):
                _flatten(value, f"{prefix}.{name}" if prefix else name, out, seen)
