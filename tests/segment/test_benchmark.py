"""benchmarks/segment: the whole pipeline (teacher, pretraining, fine-tuning of the three encoders, report) in its
smoke mode on the shared data (skipped where that data is absent)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks.proxy.data import DEFAULT_DATA
from benchmarks.segment import run


def test_smoke_mode_runs_every_arm_and_writes_the_report(tmp_path: Path) -> None:
    if not (DEFAULT_DATA / "camvid" / "train.tar.gz").is_file():
        pytest.skip(f"shared CamVid archives not found under {DEFAULT_DATA}")
    assert run.main(["--smoke", "--out", str(tmp_path), "--jobs", "1", "--threads", "1", "--device", "cpu"]) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert [(r["arm"], r["seed"]) for r in results["runs"]] == [("milan", 0), ("pixel_mae", 0), ("random_init", 0)]
    for r in results["runs"]:
        assert 0 <= r["mIoU"] <= 100 and r["test_images"] == 2 and r["segment_steps"] == 2 and len(r["IoU"]) == 11
    assert results["runs"][0]["pretrain_steps"] == results["runs"][1]["pretrain_steps"] > 0  # the same budget
    assert "NOT CLIP" in (tmp_path / "results.md").read_text() and (tmp_path / "results.png").stat().st_size > 0
    milan_cfg = (tmp_path / "runs" / "milan-seed0" / "config.yaml").read_text()
    assert "teacher" in milan_cfg and str(tmp_path / "teacher" / "teacher.pt") in milan_cfg
