"""Distributed training on CPU with gloo: helpers, and 2 processes == 1 process with the same global batch."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from milan import distributed as dist
from milan.engine.checkpointing import load_training_checkpoint
from milan.engine.logging import read_metrics
from milan.engine.pretrain import pretrain
from tests.engine.conftest import assert_same_weights, tiny_config, tiny_overrides, write_jpegs

REPO = Path(__file__).resolve().parents[1]


def without_key_biases(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drops the key-projection biases: softmax ignores them, so their true gradient is 0 and AdamW turns float
    noise of order 1e-10 (which differs with the summation order) into updates of order lr."""
    out = dict(sd)
    for name, t in sd.items():
        if name.endswith("attn.qkv.bias"):
            d = t.shape[0] // 3
            out[name] = torch.cat([t[:d], t[2 * d :]])  # q and v parts
        elif name.endswith("attn.kv.bias"):
            out[name] = t[t.shape[0] // 2 :]  # v part
    return out


def test_helpers_are_no_ops_in_one_process() -> None:
    assert not dist.is_enabled() and dist.rank() == 0 and dist.world_size() == 1 and dist.is_main()
    t = torch.tensor([1.0, 3.0])
    assert torch.equal(dist.all_reduce_mean(t), t) and torch.equal(dist.all_reduce_sum(t), t)
    assert dist.reduce_means({"a": 2.0}, torch.device("cpu")) == {"a": 2.0}
    assert dist.broadcast_object({"x": 1}) == {"x": 1}
    assert dist.all_gather_rows(t) is t  # the 2-process case: tests/eval/test_ddp.py
    dist.barrier()
    m = nn.Linear(2, 2)
    assert dist.wrap_ddp(m, torch.device("cpu")) is m and dist.unwrap(m) is m
    assert dist.resolve_device("cpu") == torch.device("cpu")


def torchrun(run: Path, images: Path, settings: dict[str, object], *args: str) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "milan"]
    result = subprocess.run(
        [*cmd, "pretrain", *tiny_overrides(run, images, settings), *args],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


@pytest.mark.ddp
def test_two_gloo_processes_match_one_process_with_the_same_global_batch(tmp_path: Path) -> None:
    """DDP for 3 steps (stopping mid-epoch), then FSDP2 with gradient accumulation resumes from that checkpoint for
    the last step: the result equals one process with batch 8 (the same samples, crops and masks), up to float
    summation order."""
    images = write_jpegs(tmp_path / "images", 16)
    settings: dict[str, object] = {"schedule.epochs": 2, "checkpoint.every_epochs": 0, "batch_size": 4}
    run = tmp_path / "ddp"
    out = torchrun(run, images, {**settings, "schedule.max_steps": 3})  # the README's torchrun command, on CPU
    assert "2 process(es)" in out and "effective 8" in out
    mid = load_training_checkpoint(run / "checkpoints" / "last.pt")
    assert mid["state"] == {"epoch": 1, "step": 3, "batch_in_epoch": 1, "images_seen": 24}
    # FSDP2, and micro-batches of 2 with 2 accumulation steps (the same effective batch: exactly resumable); the
    # resumed run keeps its stored config (max_steps 3) unless told otherwise
    fsdp = {**settings, "runtime.strategy": "fsdp", "batch_size": 2, "accum_steps": 2, "schedule.max_steps": None}
    out = torchrun(run, images, fsdp, "--resume", "auto")
    assert "resumed from" in out and "step 3" in out and "WARNING" not in out.replace("WARNING: no model.teacher", "")
    single = pretrain(tiny_config(tmp_path / "single", images, {**settings, "batch_size": 8}))

    ddp_ckpt = load_training_checkpoint(run / "checkpoints" / "last.pt")
    one_ckpt = load_training_checkpoint(single.checkpoint)
    assert ddp_ckpt["meta"]["world_size"] == 2
    assert ddp_ckpt["state"] == one_ckpt["state"] == {"epoch": 2, "step": 4, "batch_in_epoch": 0, "images_seen": 32}
    assert ddp_ckpt["model"].keys() == one_ckpt["model"].keys()  # saved unwrapped, the same names
    assert_same_weights(ddp_ckpt["teacher"], one_ckpt["teacher"])  # outside DDP/FSDP: identical and untouched
    ddp_loss = [r["loss"] for r in read_metrics(run / "metrics.jsonl")]
    one_loss = [r["loss"] for r in read_metrics(single.run_dir / "metrics.jsonl")]
    assert len(ddp_loss) == 4 and ddp_loss == pytest.approx(one_loss, rel=1e-5)
    assert_same_weights(without_key_biases(ddp_ckpt["model"]), without_key_biases(one_ckpt["model"]), atol=1e-6)
    steps = [s["step"] for s in ddp_ckpt["optimizer"]["state"].values()]
    assert all(int(s) == 4 for s in steps)
