"""Safe loading: code-needing pickles are refused without running anything; damaged files give clear errors."""

from __future__ import annotations

import argparse
import os
import pickle
import random
import zipfile
from pathlib import Path

import pytest
import torch

from milan.checkpoint.io import CheckpointError, atomic_save, read_safetensors_metadata, safe_load, save_safetensors


class _Payload:
    """Unpickling this would create a marker file (if anything ever executed it)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, (f"touch {self.marker}",))


def _state() -> dict[str, torch.Tensor]:
    return {"w": torch.randn(64, 64, generator=torch.Generator().manual_seed(0)), "b": torch.arange(10)}


def test_atomic_save_roundtrip_and_no_temp_left(tmp_path: Path) -> None:
    path = atomic_save({"model": _state(), "epoch": 3, "args": argparse.Namespace(lr=0.1)}, tmp_path / "c.pth")
    loaded = safe_load(path)
    assert all(torch.equal(loaded["model"][k], v) for k, v in _state().items())
    assert set(loaded) == {"model", "epoch", "args"} and loaded["epoch"] == 3
    assert loaded["args"].lr == 0.1  # argparse.Namespace (original MILAN/MAE `args`) is allowed
    assert [p.name for p in tmp_path.iterdir()] == ["c.pth"]


@pytest.mark.parametrize(("umask", "mode"), [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_written_files_follow_the_umask(tmp_path: Path, umask: int, mode: int) -> None:
    """Like any file a program creates (today: always 0600, the temporary file's mode)."""
    old = os.umask(umask)
    try:
        atomic_save({"epoch": 1}, tmp_path / "c.pth")
        save_safetensors(_state(), tmp_path / "w.safetensors")
    finally:
        os.umask(old)
    assert (tmp_path / "c.pth").stat().st_mode & 0o777 == mode
    assert (tmp_path / "w.safetensors").stat().st_mode & 0o777 == mode


def test_a_failed_write_keeps_the_previous_file_and_leaves_no_temp(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import safetensors.torch

    atomic_save({"epoch": 1}, tmp_path / "c.pth")
    save_safetensors(_state(), tmp_path / "w.safetensors")
    with pytest.raises(Exception):  # noqa: B017 - whatever torch.save raises for an unpicklable object
        atomic_save({"epoch": 2, "bad": lambda: None}, tmp_path / "c.pth")

    def disk_full(tensors: object, filename: str, metadata: object = None) -> None:
        Path(filename).write_bytes(b"partial")
        raise OSError("no space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", disk_full)
    with pytest.raises(OSError, match="no space"):
        save_safetensors({"w": torch.zeros(2)}, tmp_path / "w.safetensors")
    assert safe_load(tmp_path / "c.pth") == {"epoch": 1}
    assert torch.equal(safe_load(tmp_path / "w.safetensors")["b"], _state()["b"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.pth", "w.safetensors"]


def test_safetensors_roundtrip_with_metadata_and_no_suffix(tmp_path: Path) -> None:
    sd = _state()
    path = save_safetensors(sd, tmp_path / "weights.bin", {"milan": '{"kind": "encoder"}'})  # sniffed, not by suffix
    loaded = safe_load(path)
    assert all(torch.equal(loaded[k], sd[k]) for k in sd)
    assert read_safetensors_metadata(path) == {"format": "pt", "milan": '{"kind": "encoder"}'}


@pytest.mark.parametrize("container", ["zip", "legacy-torch", "plain-pickle"])
def test_malicious_pickle_is_refused_and_never_runs(tmp_path: Path, container: str) -> None:
    marker = tmp_path / "PWNED"
    path = tmp_path / "evil.pth"
    obj = {"state_dict": _state(), "payload": _Payload(marker)}
    if container == "zip":
        torch.save(obj, path)
    elif container == "legacy-torch":
        torch.save(obj, path, _use_new_zipfile_serialization=False)
    else:
        path.write_bytes(pickle.dumps(obj, protocol=4))
    with pytest.raises(CheckpointError) as info:
        safe_load(path)
    message = str(info.value)
    assert message.startswith(f"refusing to load {path}"), message
    assert "system" in message and "arbitrary code" in message
    assert not marker.exists()


def test_malicious_torchscript_archive_is_refused(tmp_path: Path) -> None:
    """A TorchScript archive whose data.pkl calls os.system: our restricted reader refuses it, nothing runs."""
    marker = tmp_path / "PWNED"
    good = tmp_path / "good.pt"
    torch.jit.save(torch.jit.script(torch.nn.Linear(3, 2)), str(good))
    evil = tmp_path / "evil.pt"
    with zipfile.ZipFile(good) as src, zipfile.ZipFile(evil, "w", zipfile.ZIP_STORED) as dst:
        for name in src.namelist():
            data = src.read(name)
            if name.endswith("/data.pkl"):
                data = pickle.dumps(_Payload(marker), protocol=2)
            dst.writestr(name, data)
    with pytest.raises(CheckpointError, match=r"refusing to read TorchScript archive .*(posix|os)\.system"):
        safe_load(evil)
    assert not marker.exists()
    assert set(safe_load(good)) == {"weight", "bias"}


@pytest.mark.parametrize("kind", ["zip", "legacy", "safetensors"])
def test_truncated_file(tmp_path: Path, kind: str) -> None:
    path = tmp_path / ("c.safetensors" if kind == "safetensors" else "c.pth")
    if kind == "safetensors":
        save_safetensors(_state(), path)
    else:
        torch.save(_state(), path, _use_new_zipfile_serialization=kind == "zip")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"truncated|corrupt") as info:
        safe_load(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_corrupt_bytes_fail_the_crc_check(tmp_path: Path) -> None:
    path = tmp_path / "c.pth"
    torch.save(_state(), path)
    data = bytearray(path.read_bytes())
    start = data.index(b"data/0") + 200  # inside the first tensor's bytes
    data[start : start + 64] = bytes(64)
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="CRC"):
        safe_load(path)


def _random_bytes(seed: int, n: int) -> bytes:
    return random.Random(seed).randbytes(n)


@pytest.mark.parametrize(
    ("content", "pattern"),
    [
        (_random_bytes(0, 4096), "not a PyTorch, safetensors or TorchScript file"),
        (b"C" + _random_bytes(1, 4095), "not a PyTorch, safetensors or TorchScript file"),  # a pickle opcode
        (b"\x80\x04" + _random_bytes(2, 4094), "not a PyTorch, safetensors or TorchScript file"),  # pickle header
        (b"hello, not a checkpoint\n" * 3, "not a PyTorch, safetensors or TorchScript file"),
        (b"", "empty"),
    ],
    ids=["random-bytes", "random-bytes-opcode", "random-bytes-pickle-header", "text", "empty"],
)
def test_garbage_files(tmp_path: Path, content: bytes, pattern: str) -> None:
    path = tmp_path / "c.pth"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=pattern):
        safe_load(path)


def test_missing_file_and_directory(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="not found"):
        safe_load(tmp_path / "nope.pth")
    with pytest.raises(CheckpointError, match="not a file"):
        safe_load(tmp_path)
