"""Checkpoint files that lie about their size, built small in a temporary folder (helpers for test_bounds.py)."""

from __future__ import annotations

import struct
import zipfile
import zlib
from pathlib import Path

import torch

from milan.models import build_milan, model_config

MIB = 1 << 20


def encoder_state(blow_up: int = 0) -> dict[str, torch.Tensor]:
    """milan_test_tiny's encoder; with ``blow_up``, every MLP is ``blow_up`` wide, stored as stride-0 views of one
    element each (the file stays small; a reader that trusts it allocates 2 x depth x blow_up x width floats)."""
    sd = {k: v.clone() for k, v in build_milan(model_config("milan_test_tiny")).student.encoder.state_dict().items()}
    if blow_up:
        width = sd["cls_token"].shape[-1]
        for key in list(sd):
            if key.endswith("mlp.fc1.weight"):
                sd[key] = torch.zeros(1).expand(blow_up, width)
            elif key.endswith("mlp.fc1.bias"):
                sd[key] = torch.zeros(1).expand(blow_up)
            elif key.endswith("mlp.fc2.weight"):
                sd[key] = torch.zeros(1).expand(width, blow_up)
    return sd


def rewrite_zip(
    src: Path,
    dst: Path,
    *,
    replace: dict[str, bytes] | None = None,
    bombs: dict[str, int] | None = None,
    lie: bool = False,
) -> Path:
    """Copies a zip archive, changing some records.

    Args:
        src: The archive to copy.
        dst: Where to write it.
        replace: ``{record: new bytes}`` (stored).
        bombs: ``{record: MiB}``: the record's bytes followed by that many MiB of zeros, deflated (about 1 KB per
            MiB); its headers declare the inflated size.
        lie: The bombs' headers declare their original size and CRC instead, whatever their streams inflate to.
    """
    replace, bombs = replace or {}, bombs or {}
    originals: dict[str, bytes] = {}
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for info in zin.infolist():
            name = info.filename
            if name in bombs:
                originals[name] = zin.read(name)
                record = zipfile.ZipInfo(name)
                record.compress_type = zipfile.ZIP_DEFLATED
                with zout.open(record, "w") as f:
                    f.write(originals[name])
                    zeros = bytes(MIB)
                    for _ in range(bombs[name]):
                        f.write(zeros)
            else:
                zout.writestr(name, replace.get(name, zin.read(name)))
    if lie:
        for name, original in originals.items():
            _patch_declared_size(dst, name, len(original), zlib.crc32(original))
    return dst


def _patch_declared_size(path: Path, name: str, size: int, crc: int) -> None:
    """Rewrites the uncompressed size and CRC of one record in both zip headers (archives without zip64)."""
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as zf:
        local = zf.getinfo(name).header_offset
    assert data[local : local + 4] == b"PK\x03\x04"
    struct.pack_into("<I", data, local + 14, crc)
    struct.pack_into("<I", data, local + 22, size)
    encoded = name.encode()
    central = data.find(b"PK\x01\x02")
    while central >= 0:
        (name_len,) = struct.unpack_from("<H", data, central + 28)
        if bytes(data[central + 46 : central + 46 + name_len]) == encoded:
            struct.pack_into("<I", data, central + 16, crc)
            struct.pack_into("<I", data, central + 24, size)
            break
        central = data.find(b"PK\x01\x02", central + 4)
    else:
        raise AssertionError(f"no central directory entry for {name}")
    path.write_bytes(bytes(data))


class ExpandedBuffer(torch.nn.Module):
    """A scriptable module whose buffer claims 10^12 elements, stored as a stride-0 view of one."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(2, 2)
        self.register_buffer("big", torch.zeros(1).expand(10**6, 10**6))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x)
