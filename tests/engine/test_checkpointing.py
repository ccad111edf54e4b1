from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

from milan.checkpoint.io import CheckpointError
from milan.engine.checkpointing import (
    Checkpointer,
    build_checkpoint,
    load_training_checkpoint,
    restore_checkpoint,
    rng_state,
    set_rng_state,
)
from milan.engine.loop import TrainState


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
    c = Checkpointer(tmp_path, keep=2, every_epochs=2)
    for epoch in range(1, 8):
        c.save(ckpt_at(epoch), epoch_end=epoch)
    names = sorted(p.name for p in c.dir.iterdir())
    assert names == ["epoch_0004.pt", "epoch_0006.pt", "last.pt"]
    assert load_training_checkpoint(c.last)["state"]["step"] == 7
    assert load_training_checkpoint(c.dir / "epoch_0006.pt")["state"]["step"] == 6
    c.save(ckpt_at(8))  # a mid-epoch save only refreshes last.pt
    assert sorted(p.name for p in c.dir.iterdir()) == names


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
    c.last.unlink()  # replace last.pt (a hard link of epoch_0002.pt) by a truncated copy
    c.last.write_bytes(data[: len(data) // 2])
    os.utime(c.last)  # the newest file
    with pytest.warns(UserWarning, match="skipping unusable checkpoint .*last.pt"):
        found = c.latest_valid()
    assert found is not None
    path, ckpt = found
    assert path.name == "epoch_0002.pt" and ckpt["state"]["step"] == 2
    assert Checkpointer(tmp_path / "empty").latest_valid() is None


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
