from __future__ import annotations

import errno
import os
import random
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn as nn

from milan.checkpoint.io import CheckpointError
from milan.train.checkpointing import (
    Checkpointer,
    CheckpointWriteError,
    build_checkpoint,
    load_training_checkpoint,
    restore_checkpoint,
    rng_state,
    set_rng_state,
)
from milan.train.loop import TrainState


def trained_pair(seed: int = 0) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(2):
        model(torch.randn(3, 4)).sum().backward()
        opt.step()
        opt.zero_grad()
    return model, opt


def ckpt_at(step: int) -> dict[str, object]:
    model, opt = trained_pair(step)
    return build_checkpoint(model, opt, TrainState(epoch=step, step=step), {"seed": step})


def test_keeps_last_and_the_newest_k_numbered(tmp_path: Path) -> None:
    c = Checkpointer(tmp_path, keep=2)
    for epoch in range(1, 8):
        c.save(ckpt_at(epoch), epoch_end=epoch if epoch % 2 == 0 else None)  # checkpoint.every_epochs=2
    names = sorted(p.name for p in c.dir.iterdir())
    assert names == ["epoch_0004.pt", "epoch_0006.pt", "last.prev.pt", "last.pt"]
    assert load_training_checkpoint(c.last)["state"]["step"] == 7
    assert load_training_checkpoint(c.previous)["state"]["step"] == 6  # the last.pt before the newest save
    assert load_training_checkpoint(c.dir / "epoch_0006.pt")["state"]["step"] == 6
    c.save(ckpt_at(8))  # a mid-epoch save only refreshes last.pt (and last.prev.pt)
    assert sorted(p.name for p in c.dir.iterdir()) == names
    assert load_training_checkpoint(c.previous)["state"]["step"] == 7


def test_epoch_copies_are_independent_of_last_pt(tmp_path: Path) -> None:
    """Before: epoch_N.pt was a hard link of last.pt, so damage to one was damage to both."""
    c = Checkpointer(tmp_path, keep=3)
    c.save(ckpt_at(1), epoch_end=1)
    c.save(ckpt_at(2), epoch_end=2)
    epoch = c.dir / "epoch_0002.pt"
    assert all(p.stat().st_nlink == 1 for p in c.dir.iterdir())
    assert epoch.stat().st_ino != c.last.stat().st_ino and epoch.read_bytes() == c.last.read_bytes()
    with c.last.open("r+b") as f:  # damaged in place (a disk error, a stray write)
        f.seek(c.last.stat().st_size // 2)
        f.write(b"\0" * 4096)
    (path, ckpt), skipped = c.scan()
    assert path == epoch and ckpt["state"]["step"] == 2 and [p for p, _ in skipped] == [c.last]


def test_a_failed_write_leaves_the_previous_checkpoint(tmp_path: Path) -> None:
    c = Checkpointer(tmp_path)
    c.save(ckpt_at(1))
    bad = {**ckpt_at(2), "oops": lambda: None}  # cannot be pickled: torch.save fails half-way
    with pytest.raises(Exception, match=r"pickle|lambda|Can't"):
        c.save(bad)
    assert load_training_checkpoint(c.last)["state"]["step"] == 1
    assert [p.name for p in c.dir.iterdir()] == ["last.pt"]  # no temporary file left behind


def test_resume_falls_back_past_a_damaged_newest_file(tmp_path: Path) -> None:
    c = Checkpointer(tmp_path, keep=3)
    c.save(ckpt_at(1), epoch_end=1)
    c.save(ckpt_at(2), epoch_end=2)
    data = c.last.read_bytes()
    c.last.write_bytes(data[: len(data) // 2])  # truncated in place
    os.utime(c.last)  # the newest file
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a note for the caller to print, not a Python warning with a source path
        (path, ckpt), skipped = c.scan()
    assert path.name == "epoch_0002.pt" and ckpt["state"]["step"] == 2
    assert skipped == [
        (c.last, f"cannot read checkpoint {c.last}: truncated or corrupt zip archive (File is not a zip file)")
    ]
    assert Checkpointer(tmp_path / "empty").scan() == (None, [])


def test_the_previous_last_pt_is_the_fallback_for_mid_epoch_saves(tmp_path: Path) -> None:
    c = Checkpointer(tmp_path, keep=3)
    c.save(ckpt_at(1), epoch_end=1)
    c.save(ckpt_at(2))  # mid-epoch saves
    c.save(ckpt_at(3))
    c.last.write_bytes(b"garbage")
    (path, ckpt), _ = c.scan()
    assert path == c.previous and ckpt["state"]["step"] == 2  # not epoch_0001.pt: one save lost, not an epoch


def enospc_save(obj: object, f: Any, *args: Any, **kwargs: Any) -> None:
    """What torch.save does on a full disk: some bytes, then its zip writer's error chained to the OS error."""
    f.write(b"PK\x03\x04" + b"\0" * 1000)
    try:
        raise OSError(errno.ENOSPC, "No space left on device")
    except OSError:
        raise RuntimeError(
            "[enforce fail at inline_container.cc:672] . PytorchStreamWriter failed writing file data/3: file write "
            "failed"
        ) from None  # torch chains it implicitly (__context__)


def test_disk_full_is_one_line_and_the_previous_checkpoint_stays(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    c = Checkpointer(tmp_path)
    c.save(ckpt_at(1))
    before = c.last.read_bytes()
    big = ckpt_at(2)
    monkeypatch.setattr(torch, "save", enospc_save)
    with pytest.raises(CheckpointWriteError) as info:
        c.save(big)
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"no space left writing {c.last} (about 0.0")
    assert message.endswith(f"MB free); the previous checkpoint {c.last} is intact")
    assert c.last.read_bytes() == before and [p.name for p in c.dir.iterdir()] == ["last.pt"]

    # the same error without the OS error in the chain: the free space decides
    def no_context(obj: object, f: Any, *args: Any, **kwargs: Any) -> None:
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")

    monkeypatch.setattr(torch, "save", no_context)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 10**9, 10))  # type: ignore[attr-defined]
    with pytest.raises(CheckpointWriteError, match=r"no space left writing .* MB needed, 0.0 MB free"):
        c.save(big)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**12, 0, 10**12))  # type: ignore[attr-defined]
    with pytest.raises(RuntimeError, match="unexpected pos") as other:
        c.save(big)  # plenty of room: not called a full disk
    assert not isinstance(other.value, CheckpointWriteError)
    fresh = Checkpointer(tmp_path / "new")
    monkeypatch.setattr(torch, "save", enospc_save)
    with pytest.raises(CheckpointWriteError, match="no checkpoint was written before"):
        fresh.save(big)


def test_paths_taken_and_orphans(tmp_path: Path) -> None:
    c = Checkpointer(tmp_path)
    c.save(ckpt_at(1))
    (c.dir / "epoch_0003.pt").mkdir()
    with pytest.raises(CheckpointWriteError, match=r"epoch_0003.pt is a folder, so checkpoints cannot be written"):
        c.check_writable()
    (c.dir / "epoch_0003.pt").rmdir()
    c.check_writable()
    (c.dir / ".last.pt.k2j3h4.tmp").write_bytes(b"x" * 1000)
    (c.dir / ".epoch_0002.pt.abc.tmp").write_bytes(b"x" * 500)
    assert c.clean_orphans() == (2, 1500)
    assert sorted(p.name for p in c.dir.iterdir()) == ["last.pt"]


def test_not_a_training_checkpoint(tmp_path: Path) -> None:
    torch.save({"model": {}}, tmp_path / "x.pt")
    with pytest.raises(CheckpointError, match="not a milan training checkpoint"):
        load_training_checkpoint(tmp_path / "x.pt")


def test_round_trip_restores_model_optimizer_state_and_rng(tmp_path: Path) -> None:
    model, opt = trained_pair(0)
    random.seed(5)
    np.random.seed(5)
    torch.manual_seed(5)
    ckpt = build_checkpoint(model, opt, TrainState(3, 17, 2, 99), {"a": 1}, world_size=4)
    Checkpointer(tmp_path).save(ckpt)
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    fresh, fresh_opt = trained_pair(1)
    loaded = load_training_checkpoint(tmp_path / "checkpoints" / "last.pt")  # weights_only load
    assert loaded["config"] == {"a": 1} and loaded["meta"]["world_size"] == 4
    state = restore_checkpoint(loaded, fresh, fresh_opt)
    assert state == TrainState(3, 17, 2, 99)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected
    for (k, a), b in zip(model.state_dict().items(), fresh.state_dict().values(), strict=True):
        assert torch.equal(a, b), k
    # the optimizer continues identically
    x = torch.randn(3, 4)
    for m, o in ((model, opt), (fresh, fresh_opt)):
        m(x).sum().backward()
        o.step()
    for a, b in zip(model.parameters(), fresh.parameters(), strict=True):
        assert torch.equal(a, b)


def test_restore_into_a_different_model_is_a_clear_error() -> None:
    model, opt = trained_pair(0)
    ckpt = build_checkpoint(model, opt, TrainState(), {})
    other = nn.Linear(4, 2)
    with pytest.raises(CheckpointError, match="does not match this model"):
        restore_checkpoint(ckpt, other, torch.optim.AdamW(other.parameters()))


def test_rng_state_round_trip() -> None:
    state = rng_state()
    a = (random.random(), np.random.rand(3).tolist(), torch.rand(3).tolist())
    set_rng_state(state)
    assert (random.random(), np.random.rand(3).tolist(), torch.rand(3).tolist()) == a


def test_restore_keeps_this_runs_optimizer_settings_and_groups() -> None:
    """Before: the groups' settings came from the checkpoint, so a resume with optim.weight_decay=... changed nothing
    (while saying 'changed'), and a checkpoint whose groups were laid out differently could not be restored."""
    model, opt = trained_pair(0)
    ckpt = build_checkpoint(model, opt, TrainState(), {})
    fresh, _ = trained_pair(1)
    decay, rest = [fresh[0].weight, fresh[2].weight], [fresh[0].bias, fresh[1].weight, fresh[1].bias, fresh[2].bias]
    regrouped = torch.optim.AdamW([{"params": decay, "weight_decay": 0.2}, {"params": rest, "weight_decay": 0.0}])
    restore_checkpoint(ckpt, fresh, regrouped)
    assert [g["weight_decay"] for g in regrouped.param_groups] == [0.2, 0.0]
    for p, q in zip(model.parameters(), fresh.parameters(), strict=True):
        assert torch.equal(opt.state[p]["exp_avg_sq"], regrouped.state[q]["exp_avg_sq"])
