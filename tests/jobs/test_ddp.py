"""Two gloo processes (torchrun) evaluate exactly what one process does; the probe trains and exports."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from milan.jobs.evaluate import evaluate_checkpoint
from milan.jobs.knn import knn
from milan.train.config import KnnConfig, load_config
from tests.jobs.conftest import job_overrides
from tests.jobs.ddp_jobs import gather_cases

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.ddp
def test_two_processes_evaluate_like_one(tmp_path, cifar, tiny_encoder_ckpt):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    args = [str(REPO / "tests/jobs/ddp_jobs.py"), str(tmp_path), str(tiny_encoder_ckpt)]
    result = subprocess.run(
        [*cmd, *args, str(cifar["train_small"]), str(cifar["val"])], env=env, capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    got = json.loads((tmp_path / "ddp.json").read_text())
    assert "2 process(es)" in result.stdout and "effective 50" in result.stdout
    # each process evaluated a shard; the summed counts cover the whole split once
    assert got["evaluate"]["count"] == 300 and got["linprobe"]["heads"][0]["count"] == 300
    one = evaluate_checkpoint(str(tmp_path / "lp" / "classifier.pt"), str(cifar["val"]), device="cpu", num_workers=0)
    assert (got["evaluate"]["top1"], got["evaluate"]["top5"]) == pytest.approx((one["top1"], one["top5"]))
    assert got["linprobe"]["top1"] == pytest.approx(one["top1"])  # synced BN statistics = the exported ones
    data = {"train": cifar["train_small"], "val": cifar["val"]}
    single = knn(_knn_cfg(tmp_path / "knn1", tiny_encoder_ckpt, data))
    assert got["knn"] == pytest.approx(single.metrics[5], abs=1 / 3 + 1e-6)  # at most one image of 300 differs
    # the row gather: every process gets the shards concatenated in rank order, whatever their sizes
    expected = {k: torch.cat([gather_cases(0)[k], gather_cases(1)[k]]) for k in ("rows", "labels")}
    expected |= {"features": torch.ones(2, 4), "none": torch.zeros(0, 5)}
    for rank in (0, 1):
        gathered = torch.load(tmp_path / f"gathered{rank}.pt", weights_only=True)
        for key, want in expected.items():
            assert gathered[key].dtype == want.dtype and torch.equal(gathered[key], want), (rank, key)


def _knn_cfg(out: Path, ckpt: Path, data: dict[str, Path]) -> KnnConfig:
    return load_config(KnnConfig, overrides=job_overrides(out, ckpt, data, cache_dir=None, k="[5]"))
