"""Checkpoint files that lie about their size: each tensor's claimed bytes are checked against the file first.

A torch file describes a tensor as a storage (a record of ``numel`` elements) and a view of it (shape, strides,
offset). Nothing forces the description to match the data: a file of a few KB can describe a 5 GB tensor as a
stride-0 view of one element, and a storage record can be a deflated zip entry that inflates to gigabytes. A reader
that trusts it allocates what the file claims. The checks here run before anything is materialised:

* :func:`check_zip` (zip-based ``torch.save`` files and TorchScript archives): every record lies inside the file and
  a stored record declares the size it occupies; a tensor record holds the bytes its storage needs (read from the
  archive's ``data.pkl``) and, if compressed, inflates to no more; any other compressed record (pickles, code) to
  at most :data:`MAX_INFLATED_METADATA` bytes. Records are then read with that size as a bound (:func:`read_record`;
  torch's reader also stops there), so nothing inflates beyond what the tensors need, even when a header lies about
  what its stream holds.
* :func:`check_legacy` (the pre-1.6 ``torch.save`` format): every storage the pickle declares is present, with the
  element count it declares, in the bytes that follow.
* :func:`check_tensors`: no loaded tensor claims more elements than its storage holds (a stride-0 or overlapping
  view) and every view stays inside its storage. It runs on the loaded, not yet copied, views.

Each violation is a one-line :class:`~milan.checkpoint.errors.CheckpointError` naming the record or the tensor.
The architecture built from the tensors' shapes is checked against them on the meta device before it is allocated
(:func:`milan.checkpoint.arch.build_strict`).
"""

from __future__ import annotations

import io
import struct
import zipfile
from pathlib import Path
from typing import Any

import torch

from milan.checkpoint.errors import CheckpointError
from milan.checkpoint.inert import Inert, storage_claims

MAX_INFLATED_METADATA = 64 << 20  # a compressed record that holds no tensor data (a pickle, code) inflates to <= this


def check_zip(path: Path, zf: zipfile.ZipFile) -> None:
    """Checks the record sizes of a zip-based checkpoint against the file and against its tensors' needs.

    Args:
        path: The file (for its size and the messages).
        zf: The open archive (only its central directory has been read).

    Raises:
        CheckpointError: A record reaches past the end of the file, declares a size it does not store, is shorter
            than its tensor storage, or would inflate to more than that storage (or than the metadata limit).
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
    for info in infos:
        parts = info.filename.split("/")
        if len(parts) != 2 or parts[1] != "data.pkl":  # the pickle the loaders read (TorchScript's others are not)
            continue
        _bound_metadata(path, info)
        tensor_dir = f"{parts[0]}/data/"
        try:
            _, claims = storage_claims(io.BytesIO(read_record(zf, info)))
        except Exception as e:  # read with every name inert: only a damaged or malformed pickle fails here
            raise CheckpointError(
                f"cannot read checkpoint {path}: its record {info.filename!r} is not a valid pickle, truncated or "
                f"corrupt ({type(e).__name__}: {str(e)[:200]})"
            ) from e
        for claim in claims:
            name = tensor_dir + claim.key
            if name not in by_name:
                raise CheckpointError(f"{path}: the tensor record {name!r} is missing")
            needs[name] = max(needs.get(name, 0), claim.nbytes)
    for name, need in needs.items():
        info = by_name[name]
        if info.file_size < need:
            raise CheckpointError(
                f"{path}: zip record {name!r} holds {_size(info.file_size)} but its tensor storage needs {_size(need)} "
                "(truncated or forged)"
            )
        if info.compress_type != zipfile.ZIP_STORED and info.file_size > need:
            raise CheckpointError(
                f"{path}: compressed zip record {name!r} would inflate to {_size(info.file_size)} but its tensor "
                f"storage needs only {_size(need)}; refusing to inflate it"
            )
    for info in infos:
        if info.filename not in needs:
            _bound_metadata(path, info)


def read_record(zf: zipfile.ZipFile, name: str | zipfile.ZipInfo, limit: int | None = None) -> bytes:
    """A record's bytes, never inflating more than its declared size (or ``limit``).

    ``ZipFile.read`` inflates each compressed chunk completely before cutting it to the declared size, so a record
    whose header lies about its size can still inflate to gigabytes; reading with a size bounds every step.
    """
    info = name if isinstance(name, zipfile.ZipInfo) else zf.getinfo(name)
    size = info.file_size if limit is None else min(info.file_size, limit)
    with zf.open(info) as f:
        return f.read(size) if size else b""


def check_legacy(path: Path) -> None:
    """Checks that a legacy ``torch.save`` file holds every storage its pickle declares, at the declared size.

    Files that are not in the legacy layout (plain pickles, garbage) pass unchecked: the loader reports them.

    Raises:
        CheckpointError: A storage's element count differs from the pickle's, or its bytes run past the file's end.
    """
    file_size = path.stat().st_size
    with path.open("rb") as f:
        try:
            for _ in range(3):  # magic number, protocol version, system info
                storage_claims(f)
            _, claims = storage_claims(f)
            keys, _ = storage_claims(f)
        except Exception:
            return
        if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
            return
        declared = {c.key: c for c in claims}
        for key in keys:
            claim = declared.get(key)
            head = f.read(8)
            if claim is None or len(head) < 8:
                return  # not the layout we know: the loader reports it
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


def check_tensors(obj: Any, path: str | Path) -> None:
    """Checks every tensor in a loaded object against its storage, before anything copies it.

    Args:
        obj: What a loader returned (nested dicts, lists, tuples, :class:`~milan.checkpoint.inert.Inert` records).
        path: The file, for the messages.

    Raises:
        CheckpointError: A tensor claims more elements than its storage holds, or a view leaves its storage.
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
    if min(t.stride(), default=0) < 0 or t.storage_offset() < 0:
        raise CheckpointError(f"{path}: tensor {name!r} has a negative stride or offset")
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
