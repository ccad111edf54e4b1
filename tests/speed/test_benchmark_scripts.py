"""benchmarks/step.py and benchmarks/gpu_check.sh, run on CPU with the tiny model (no timing assertions)."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import step

REPO = Path(__file__).resolve().parents[2]
TINY = ["--model", "milan_test_tiny", "--batch-size", "4", "--device", "cpu", "--warmup", "2"]
FAST = ["--rounds", "2", "--steps", "1", "--breakdown-steps", "1"]


def test_step_benchmark_record(tmp_path: Path) -> None:
    out = tmp_path / "r.json"
    assert step.main([*TINY, *FAST, "--precision", "fp32", "--channels-last", "--json", str(out)]) == 0
    record = json.loads(out.read_text())
    ours = record["ours"]
    assert set(record) >= {"date", "git", "hardware", "versions", "args", "flops_per_image", "ours"}
    assert record["git"]["commit"] and record["versions"]["torch"]
    assert len(ours["step_s"]) == 2 and ours["img_per_s"] > 0 and ours["peak_memory_gib"] > 0
    stages = ours["breakdown_s"]
    assert set(stages) == {"teacher_forward", "mask_draw", "student_forward", "loss", "backward", "optimizer", "other"}
    assert all(stages[k] > 0 for k in ("teacher_forward", "student_forward", "backward", "optimizer"))
    assert ours["optimizer"] == "fused" and ours["mfu"] is None  # no peak known for CPUs
    assert all(v == v and v < 10 for v in ours["warmup_losses"])  # finite cosine losses (in [0, 4])


@pytest.mark.parity
def test_step_benchmark_against_reference(tmp_path: Path) -> None:
    pytest.importorskip("mmpretrain")
    out = tmp_path / "r.json"
    args = [*TINY, "--rounds", "1", "--steps", "1", "--breakdown-steps", "1", "--precision", "fp32", "--reference"]
    args += ["--peak-tflops", "1", "--json", str(out)]
    assert step.main(args) == 0
    record = json.loads(out.read_text())
    assert record["loss_check"]["abs_diff"] < 1e-6  # same weights, same forced mask, before any update
    assert record["reference"]["optimizer"] == "for-loop"  # what mmengine builds on CPU
    assert len(record["ratio"]["per_round"]) == 1 and record["ratio"]["paired_median"] > 0
    assert record["reference"]["breakdown_s"]["mask_draw"] > 0
    assert 0 < record["ours"]["mfu"] < 1


@pytest.mark.parametrize("decode", ["cpu", "device"])
def test_step_benchmark_from_jpegs(tmp_path: Path, decode: str) -> None:
    from PIL import Image

    for i in range(8):
        Image.new("RGB", (48 + i, 40), (10 * i, 80, 160)).save(tmp_path / f"{i}.jpg")
    out = tmp_path / "r.json"
    args = [*TINY, *FAST, "--precision", "fp32", "--data", str(tmp_path), "--workers", "0", "--decode", decode]
    args += ["--json", str(out)]
    assert step.main(args) == 0
    data = json.loads(out.read_text())["data"]
    assert data["images"] == 8 and data["img_per_s"] > 0 and 0 <= data["data_wait_fraction"] < 1


def test_gpu_check_script_commands_parse() -> None:
    """Every step.py command of the GPU script parses (a typo would cost a GPU session)."""
    script = REPO / "benchmarks" / "gpu_check.sh"
    subprocess.run(["bash", "-n", str(script)], check=True)
    for smoke in ("0", "1"):
        env = {**os.environ, "DRY_RUN": "1", "SMOKE": smoke}
        lines = subprocess.run(
            ["bash", str(script)], check=True, capture_output=True, text=True, env=env, timeout=60
        ).stdout.splitlines()
        commands = [shlex.split(line) for line in lines if "benchmarks/step.py" in line]
        assert commands
        assert sum(step.parse_args(c[c.index("benchmarks/step.py") + 1 :]).decode == "device" for c in commands) == 1
        for argv in commands:
            args = step.parse_args(argv[argv.index("benchmarks/step.py") + 1 :])
            assert args.device == ("cpu" if smoke == "1" else "cuda")
        assert any("benchmarks/data.py" in line for line in lines)


def test_gpu_check_skips_the_reference_without_wheels(tmp_path: Path) -> None:
    """A fresh checkout has no dist/device-wheels: with mmpretrain not installed (simulated by a Python without its
    site-packages), the script says so and runs ours without --reference instead of failing."""
    bare = tmp_path / "python-without-site-packages"
    bare.write_text(f'#!/bin/sh\nexec {sys.executable} -S "$@"\n')
    bare.chmod(0o755)
    (tmp_path / "wheels").mkdir()
    outputs = {}
    for name, python in (("absent", str(bare)), ("present", sys.executable)):
        env = {**os.environ, "DRY_RUN": "1", "SMOKE": "1", "WHEELS": str(tmp_path / "wheels"), "PYTHON": python}
        outputs[name] = subprocess.run(
            ["bash", str(REPO / "benchmarks" / "gpu_check.sh")], check=True, capture_output=True, text=True, env=env,
            timeout=120,
        ).stdout  # fmt: skip
    steps = {k: [line for line in v.splitlines() if "benchmarks/step.py" in line] for k, v in outputs.items()}
    assert steps["absent"] and len(steps["absent"]) == len(steps["present"])
    assert not any("--reference" in line for line in steps["absent"])
    assert "SKIPPING the mmpretrain --reference comparisons" in outputs["absent"]
    assert "fetch_device_wheels.sh" in outputs["absent"]
    if all(importlib.util.find_spec(m) is not None for m in ("mmpretrain", "mmengine", "mmcv")):  # the parity extra
        assert any("--reference" in line for line in steps["present"])
        assert "SKIPPING" not in outputs["present"]


def test_git_state_outside_a_checkout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from benchmarks import environment

    assert len(environment.git_state()["commit"]) == 40  # this checkout
    monkeypatch.setattr(environment, "REPO", tmp_path)  # a copy of the tree without .git (the device machine)
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path.parent))
    monkeypatch.setenv("MILAN_GIT_COMMIT", "abc1234")
    monkeypatch.setenv("MILAN_GIT_DIRTY", "1")
    assert environment.git_state() == {"commit": "abc1234", "dirty": True}
    monkeypatch.delenv("MILAN_GIT_DIRTY")
    assert environment.git_state() == {"commit": "abc1234", "dirty": None}
    assert environment.package_version("torch") == importlib.metadata.version("torch")
    assert environment.package_version("no-such-distribution") is None
