"""Distributed training on CPU with gloo: helpers, and 2 processes == 1 process with the same global batch."""

from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from milan import distributed as dist
from milan.jobs.pretrain import pretrain
from milan.train.checkpointing import load_training_checkpoint
from milan.train.logging import read_metrics
from tests.train.conftest import assert_same_weights, tiny_config, tiny_overrides, write_jpegs
from tests.train.test_kill_resume import last_step

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
    assert dist.broadcast_object({"x": 1}) == {"x": 1}
    assert dist.all_gather_rows(t) is t  # the 2-process case: tests/jobs/test_ddp.py
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


def worker_pids(agent: int) -> dict[int, int]:
    """``{rank: pid}`` of the processes torchrun ``agent`` started (from ``/proc``: their ``RANK`` variable)."""
    ranks = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            env = dict(v.split("=", 1) for v in (entry / "environ").read_text().split("\0") if "=" in v)
        except (OSError, ValueError, IndexError):
            continue
        if ppid == agent and "RANK" in env:
            ranks[int(env["RANK"])] = int(entry.name)
    return ranks


INTERRUPT: dict[str, object] = {"batch_size": 1, "schedule.epochs": 3, "checkpoint.every_epochs": 0}  # 8 steps/epoch


@pytest.fixture(scope="module")
def ddp_uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """16 images, and the last checkpoint of an uninterrupted 2-process run on them (24 steps)."""
    root = tmp_path_factory.mktemp("ddp_straight")
    images = write_jpegs(root / "images", 16)
    torchrun(root / "run", images, INTERRUPT)
    return images, root / "run" / "checkpoints" / "last.pt"


def interrupt(run: Path, images: Path, at: int, target: str, *args: str) -> tuple[int, int, int, str, str]:
    """Launches 2 processes with torchrun and, once ``metrics.jsonl`` has step ``at``, sends SIGTERM to torchrun
    (``target="torchrun"``, as a cluster does; torchrun forwards it to each process) or SIGINT to rank 1 only.

    Returns:
        ``(step, epoch, batch)`` of the stop line rank 0 printed, and torchrun's stdout and stderr.
    """
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "milan"]
    agent = subprocess.Popen(
        [*cmd, "pretrain", *tiny_overrides(run, images, INTERRUPT), *args],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        while last_step(run / "metrics.jsonl") < at:
            assert agent.poll() is None, agent.communicate()
            time.sleep(0.002)
        if target == "torchrun":
            agent.send_signal(signal.SIGTERM)
        else:
            os.kill(worker_pids(agent.pid)[1], signal.SIGINT)
        out, err = agent.communicate(timeout=120)
    finally:
        if agent.poll() is None:
            agent.kill()
            agent.wait()
    reason = "SIGTERM received" if target == "torchrun" else "SIGINT received by another process"  # rank 0's line
    m = re.search(rf"{reason}: stopped after step (\d+) \(epoch (\d), batch (\d)/8\); saved (\S+);", out)
    assert m is not None, (at, out[-2000:], err[-3000:])
    assert m.group(4) == str(run / "checkpoints" / "last.pt")
    step, epoch, batch = (int(g) for g in m.groups()[:3])
    return step, epoch, batch, out, err


@pytest.mark.ddp
def test_two_processes_stop_together_on_a_signal_and_resume_exactly(
    tmp_path: Path, ddp_uninterrupted: tuple[Path, Path]
) -> None:
    """SIGTERM to torchrun, which forwards it to both processes (they may see it at different steps), then SIGINT to
    rank 1 alone (rank 0 must stop at the same step): each time both finish that step, rank 0 writes one checkpoint
    and both exit 128 + signum. ``--resume auto`` then ends bit-identical to the uninterrupted run.

    Before: SIGTERM ended the processes at once, with nothing saved; SIGINT gave a traceback.
    """
    images, straight = ddp_uninterrupted
    run = tmp_path / "run"
    last = run / "checkpoints" / "last.pt"
    first = random.randint(2, 6)
    step, epoch, batch, _, err = interrupt(run, images, first, "torchrun")
    assert step > first
    assert load_training_checkpoint(last)["state"] == {
        "epoch": epoch, "step": step, "batch_in_epoch": batch, "images_seen": 2 * step
    }  # fmt: skip

    second = step + random.randint(2, 6)
    step, epoch, batch, out, err = interrupt(run, images, second, "rank 1", "--resume", "auto")
    assert f"resumed from {last}: epoch " in out and step > second
    assert "exitcode  : 130" in err  # torchrun reports the processes' status
    assert load_training_checkpoint(last)["state"] == {
        "epoch": epoch, "step": step, "batch_in_epoch": batch, "images_seen": 2 * step
    }  # fmt: skip

    out = torchrun(run, images, INTERRUPT, "--resume", "auto")
    assert f"resumed from {last}: epoch {epoch}, step {step}" in out
    done = load_training_checkpoint(last)
    assert done["state"]["step"] == 24
    assert_same_weights(done["model"], load_training_checkpoint(straight)["model"])  # bit-identical
    assert [r["step"] for r in read_metrics(run / "metrics.jsonl")] == list(range(1, 25))
