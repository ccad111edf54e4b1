"""``milan segment`` end to end: the ADE20K preset on generated data, resume, evaluate and visualize, errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from milan.checkpoint.segmenter import load_segmenter, segmentation_spec
from milan.jobs.segment import segment
from milan.train.checkpointing import load_training_checkpoint
from milan.train.config import SegmentConfig, load_config
from milan.train.logging import read_metrics
from tests.segment.conftest import REPO, generic_overrides

ADE_PRESET = REPO / "configs/segment/milan_vit_base_patch16_ade20k_512_160k.yaml"
CAMVID_PRESET = REPO / "configs/segment/camvid_tiny_cpu.yaml"


def camvid(out: Path, root: Path, encoder: Path, *extra: str, **more: object) -> SegmentConfig:
    return load_config(SegmentConfig, CAMVID_PRESET, [*generic_overrides(out, root, encoder, **more), *extra])


def test_a_tiny_run_writes_its_artifacts_and_prints_miou(
    tmp_path: Path, folder_root: Path, tiny_encoder8: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = camvid(tmp_path / "r", folder_root, tiny_encoder8, **{"schedule.iters": 5, "eval.every_steps": 2})
    result = segment(cfg)
    run = result.run_dir
    out = capsys.readouterr().out
    assert "done: segment mIoU" in out and "on 3 images" in out
    summary = json.loads((run / "results.json").read_text())
    assert summary["job"] == "segment" and summary["step"] == 5 and summary["epoch"] == 1  # 4 steps, then 1 of 4
    assert summary["images_seen"] == 10 and summary["eval_images"] == 3
    assert {"mIoU", "mAcc", "aAcc", "IoU", "Acc", "max_mIoU", "wall_time", "segmenter"} <= summary.keys()
    assert sorted(summary["IoU"]) == ["0", "1", "2", "3"]
    evals = read_metrics(run / "metrics.jsonl", "eval")
    assert [e["step"] for e in evals] == [2, 4, 5]  # every 2 steps, inside the epoch loop, and at the end
    assert evals[-1]["mIoU"] == summary["mIoU"] and [r["step"] for r in read_metrics(run / "metrics.jsonl")] == [
        1, 2, 3, 4, 5
    ]  # fmt: skip
    log = (run / "log.txt").read_text()
    assert "4 steps/epoch x 2 epochs (the last one partial) = 5 steps" in log and "5 iterations (schedule.iters)" in log
    lrs = [r["lr"] for r in read_metrics(run / "metrics.jsonl")]
    peak = cfg.optim.lr
    assert peak is not None and lrs[0] == pytest.approx(1e-6 * peak)  # warm-up of 1 step from 1e-6 x lr
    assert lrs[1:] == pytest.approx([peak, peak * 3 / 4, peak / 2, peak / 4])  # poly (power 1) to 0 at step 5
    assert "skipped 0 of 10 images" in log  # the last, partial epoch's 2 images are counted too
    blob = torch.load(run / "segmenter.pt", weights_only=True)
    assert blob["class_names"] == ["0", "1", "2", "3"] and blob["metrics"]["mIoU"] == summary["mIoU"]
    assert blob["config"]["data"]["crop_size"] == 64 and blob["spec"]["kind"] == "segmentation"
    ckpt = load_training_checkpoint(run / "checkpoints" / "last.pt")
    assert ckpt["spec"] == blob["spec"] and ckpt["state"]["step"] == 5
    assert segmentation_spec(run / "checkpoints" / "last.pt") == blob["spec"]
    model, spec = load_segmenter(run / "segmenter.pt")
    assert model.num_classes == 4 and not model.training and spec["eval"] == {
        "scale": [96, 64], "mode": "slide", "crop": 64, "stride": 43
    }  # fmt: skip
