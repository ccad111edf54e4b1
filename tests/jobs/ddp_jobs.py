"""Run under ``torchrun --nproc_per_node 2``: a linear probe, ``evaluate`` and k-NN in the same two processes.

Writes ``OUT/ddp.json`` (rank 0) with their metrics, and what ``milan.distributed.all_gather_rows`` (k-NN's feature
gather) returns on each process for shards of different sizes; ``tests/jobs/test_ddp.py`` compares them with one
process.
Usage: ``python -m torch.distributed.run --standalone --nproc_per_node 2 tests/jobs/ddp_jobs.py OUT CKPT TRAIN VAL``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from milan import distributed as dist
from milan.jobs.evaluate import evaluate_checkpoint
from milan.jobs.knn import knn
from milan.jobs.linprobe import linprobe
from milan.train.config import KnnConfig, LinprobeConfig, load_config


def gather_cases(rank: int) -> dict[str, torch.Tensor]:
    """What process ``rank`` contributes to the row gathers (different row counts, empty shards)."""
    rows = [3, 1][rank]
    return {
        "rows": torch.arange(rows * 2, dtype=torch.float32).reshape(rows, 2) + 100 * rank,  # (3, 2) and (1, 2)
        "labels": torch.arange(rows) + 10 * rank,  # (3,) and (1,) int64
        "features": torch.ones(2, 4) if rank == 0 else torch.zeros(0, 0),  # rank 1 extracted nothing
        "none": torch.zeros(0, 5),  # nobody has rows
    }


def main() -> None:
    out, ckpt, train, val = (Path(a) for a in sys.argv[1:5])
    dist.init("cpu")  # one process group for the three jobs (they leave a caller's group alone)
    torch.set_num_threads(1)
    gathered = {k: dist.all_gather_rows(v) for k, v in gather_cases(dist.rank()).items()}
    torch.save(gathered, out / f"gathered{dist.rank()}.pt")
    common = [f"encoder.pretrained={ckpt}", f"data.train={train}", f"data.val={val}", "data.num_workers=0",
              "runtime.device=cpu", "log.progress=false"]  # fmt: skip
    lp = linprobe(load_config(LinprobeConfig, overrides=[
        *common, f"out_dir={out / 'lp'}", "batch_size=25", "optim.lr=1.0", "schedule.epochs=1",
        "schedule.warmup_epochs=0", "log.tensorboard=false", "optim.lr_grid=[1.0,2.0]",
    ]))  # fmt: skip
    ev = evaluate_checkpoint(str(lp.run_dir / "classifier.pt"), str(val), device="cpu", num_workers=0, progress=False)
    kn = knn(load_config(KnnConfig, overrides=[*common, f"out_dir={out / 'knn'}", "cache_dir=null", "k=[5]"]))
    if dist.is_main():
        (out / "ddp.json").write_text(json.dumps({"linprobe": lp.final, "evaluate": ev, "knn": kn.metrics[5]}))
    dist.destroy()


if __name__ == "__main__":
    main()
