"""Reading pickles without importing or calling anything they name.

Three tools, used by :mod:`milan.checkpoint.io` and :mod:`milan.checkpoint.bounds`:

* :func:`pickle_globals`: the names a pickle stream refers to (classes, functions), found from its opcodes alone.
* :func:`standins`: inert stand-ins for named classes and functions, to be allowed through
  ``torch.serialization.safe_globals`` under ``torch.load(weights_only=True)``. Training frameworks pickle their
  bookkeeping next to the weights (mmengine's ``MessageHub`` keeps its history in ``HistoryBuffer`` objects holding
  numpy arrays, and refers to their methods through ``getattr``); with each such name mapped to an :class:`Inert`
  record, the weights and the plain metadata load as usual and those objects come back as records of what was
  pickled (name, arguments, state). No module is imported and nothing named in the file is called.
* :func:`storage_claims`: every tensor storage a torch pickle refers to (record key, element count, element size),
  read with every name inert, so that the sizes can be checked against the file before torch allocates anything.
"""

from __future__ import annotations

import functools
import io
import pickle
import pickletools
from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO, Any, ClassVar

import torch

# Names whose objects may be replaced by inert records (anything else that torch's weights_only loader refuses stays
# refused): OpenMMLab's training bookkeeping, numpy arrays and scalars inside it, and ``getattr``, which pickles
# refer to methods by (e.g. ``getattr(HistoryBuffer, 'min')``).
_INERT_PACKAGES = ("mmengine", "mmcv", "mmpretrain", "mmselfsup", "mmcls", "numpy")
_INERT_NAMES = {("builtins", "getattr"), ("__builtin__", "getattr")}


class Inert:
    """What the pickle built from a name we do not import: the name, the call's arguments, the restored state."""

    qualified_name: ClassVar[str] = ""
    args: tuple[Any, ...] = ()
    state: Any = None

    def __init__(self, *args: Any) -> None:
        self.args = args

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __repr__(self) -> str:
        return f"<inert {self.qualified_name}>"


def inert_allowed(module: str, name: str) -> bool:
    """Whether objects named ``module.name`` may be read as :class:`Inert` records instead of being refused."""
    return (module, name) in _INERT_NAMES or module.split(".")[0] in _INERT_PACKAGES


@functools.cache
def standin(module: str, name: str) -> type[Inert]:
    """The inert stand-in for ``module.name``: a subclass of :class:`Inert` that torch's allowlist finds by that name.

    Calling it (the pickle's REDUCE), creating it (NEWOBJ) and restoring its state (BUILD) only record what the pickle
    gave; the real class or function is never imported.
    """
    module, name = python3_name(module, name)
    # torch's weights_only allowlist looks classes up by ``__module__`` + ``__qualname__``.
    attrs = {"qualified_name": f"{module}.{name}", "__module__": module, "__qualname__": name}
    return type(name.rpartition(".")[2] or "Inert", (Inert,), attrs)


def standins(names: list[tuple[str, str]]) -> list[type[Inert]]:
    """Stand-ins for ``names`` (``(module, name)`` pairs that :func:`inert_allowed` accepts)."""
    return [standin(m, n) for m, n in dict.fromkeys(names)]


def python3_name(module: str, name: str) -> tuple[str, str]:
    """The Python 3 name of a protocol-2 global (``__builtin__.getattr`` -> ``builtins.getattr``), as torch maps it."""
    from _compat_pickle import IMPORT_MAPPING, NAME_MAPPING

    if (module, name) in NAME_MAPPING:
        return NAME_MAPPING[(module, name)]
    return IMPORT_MAPPING.get(module, module), name


def pickle_globals(data: bytes) -> Iterator[tuple[str, str]]:
    """``(module, name)`` of every global the pickle stream(s) in ``data`` refer to, found without unpickling.

    Legacy ``torch.save`` files are several pickles in a row followed by raw storage bytes; the scan stops at the
    first byte that is not a pickle.

    Raises:
        Exception: ``data`` does not start with a pickle.
    """
    stream = io.BytesIO(data)
    strings: list[str] = []
    first = True
    while stream.tell() < len(data):
        start = stream.tell()
        try:
            for op, arg, _ in pickletools.genops(stream):
                if op.name in ("GLOBAL", "INST") and isinstance(arg, str):
                    module, _, name = arg.partition(" ")
                    yield module, name
                elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                    yield strings[-2], strings[-1]
                elif isinstance(arg, str):
                    strings.append(arg)
        except Exception:
            if first:
                raise
            stream.seek(start)
            break
        first = False


# ----------------------------------------------------------------------------------------------------------------
# Storage claims


@dataclass(frozen=True)
class StorageClaim:
    """One tensor storage a pickle refers to: its record ``key``, ``numel`` elements of ``itemsize`` bytes."""

    key: str
    numel: int
    itemsize: int

    @property
    def nbytes(self) -> int:
        return self.numel * self.itemsize


class _Sink:
    """Absorbs whatever a pickle does with an object built from a global (calls, state, items, appends)."""

    storage_name: ClassVar[str | None] = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __call__(self, *args: Any, **kwargs: Any) -> _Sink:
        return _Sink()

    def __setstate__(self, state: Any) -> None:
        pass

    def __setitem__(self, key: Any, value: Any) -> None:
        pass

    def append(self, item: Any) -> None:
        pass

    def extend(self, items: Any) -> None:
        pass


class _ClaimScanner(pickle.Unpickler):
    """Unpickles with every global replaced by :class:`_Sink` and records the storage persistent ids."""

    def __init__(self, file: IO[bytes]) -> None:
        super().__init__(file)
        self.claims: list[StorageClaim] = []

    def find_class(self, module: str, name: str) -> Any:
        if module == "torch" and name.endswith("Storage"):
            return type(name, (_Sink,), {"storage_name": name})
        return _Sink

    def persistent_load(self, pid: Any) -> Any:
        # zip files and TorchScript: ('storage', type, key, location, numel); legacy files add view metadata.
        if isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage":
            storage_name = getattr(pid[1], "storage_name", None)
            if not isinstance(storage_name, str) or not isinstance(pid[4], int) or pid[4] < 0:
                raise pickle.UnpicklingError(f"malformed storage reference {pid!r:.120}")
            self.claims.append(StorageClaim(str(pid[2]), int(pid[4]), _itemsize(storage_name)))
        return _Sink()


def storage_claims(file: IO[bytes]) -> tuple[Any, list[StorageClaim]]:
    """Reads one pickle from ``file`` with every global inert.

    Returns:
        (the unpickled object, in which every object built from a global is a placeholder; the storages referred to).

    Raises:
        pickle.UnpicklingError, EOFError, ...: Not a pickle, or a malformed one.
    """
    scanner = _ClaimScanner(file)
    obj = scanner.load()
    return obj, scanner.claims


def _itemsize(storage_name: str) -> int:
    if storage_name == "UntypedStorage":
        return 1
    try:
        dtype = torch.serialization.StorageType(storage_name).dtype  # type: ignore[no-untyped-call]
    except (KeyError, AttributeError) as e:
        raise pickle.UnpicklingError(f"unknown storage type torch.{storage_name}") from e
    return int(torch.empty((), dtype=dtype).element_size())
