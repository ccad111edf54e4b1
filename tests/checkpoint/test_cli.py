"""``milan inspect`` / ``export`` / ``convert`` through the real CLI entry point."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from milan.checkpoint import load_encoder, load_milan, load_teacher, read_checkpoint
from milan.cli import main
from milan.models import build_milan, model_config
from tests.checkpoint.conftest import open_clip_model, randomize_


@pytest.fixture
def milan_ckpt(tmp_path: Path) -> tuple[Path, torch.nn.Module]:
    model = randomize_(build_milan(model_config("milan_test_tiny"))).eval()
    path = tmp_path / "last.pt"
    torch.save({"model": model.state_dict(), "epoch": 3}, path)
    return path, model


def test_inspect(milan_ckpt: tuple[Path, torch.nn.Module], capsys: pytest.CaptureFixture[str]) -> None:
    path, model = milan_ckpt
    assert main(["inspect", str(path), "--num-heads", "4", "--decoder-num-heads", "4"]) == 0
    out = capsys.readouterr().out
    total = sum(v.numel() for v in model.state_dict().values() if v.is_floating_point())
    assert "format:      milan" in out and "MILAN pretraining model" in out
    assert "encoder:     width 64, depth 2, heads 4, patch 8, grid 4x4 (32 px)" in out
    assert "decoder:     prompting, width 32, depth 2, heads 4, in 64 -> out 32" in out
    assert "teacher:     width 128, depth 2, heads 2, patch 8" in out and "act quick_gelu" in out
    assert "mmpretrain layout" in out and f"parameters:  {total:,}" in out
    assert "student.encoder.blocks.{0..1}" in out and "24 tensors" in out


def test_export_and_convert(
    milan_ckpt: tuple[Path, torch.nn.Module], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path, model = milan_ckpt
    x = torch.randn(2, 3, 32, 32)
    out = tmp_path / "enc.safetensors"
    assert main(["export", str(path), "--to", "timm", "--out", str(out), "--pth", "--num-heads", "4"]) == 0
    printed = capsys.readouterr().out
    assert "timm.create_model('vit_base_patch16_224', pretrained=True" in printed and "num_heads=4" in printed
    assert (tmp_path / "enc.pth").is_file()
    torch.testing.assert_close(load_encoder(out)(x), model.encoder(x), atol=0, rtol=0)

    assert main(["export", str(path), "--to", "hf", "--out", str(tmp_path / "hf"), "--num-heads", "4"]) == 0
    assert {p.name for p in (tmp_path / "hf").iterdir()} == {
        "config.json",
        "model.safetensors",
        "preprocessor_config.json",
    }

    dst = tmp_path / "converted.pth"
    args = ["convert", "--from", "milan", "--to", "milan", str(path), str(dst), "--num-heads", "4"]
    assert main([*args, "--decoder-num-heads", "4"]) == 0
    loaded = load_milan(dst)
    torch.testing.assert_close(loaded.encoder(x), model.encoder(x), atol=0, rtol=0)


def test_convert_teacher_formats(tmp_path: Path) -> None:
    torch.save(open_clip_model(quick_gelu=True).state_dict(), tmp_path / "clip.pth")
    dst = tmp_path / "tower.safetensors"
    assert main(["convert", "--from", "openai-clip", "--to", "timm", str(tmp_path / "clip.pth"), str(dst)]) == 0
    assert read_checkpoint(dst).tower == read_checkpoint(tmp_path / "clip.pth").tower
    x = torch.randn(1, 3, 32, 32)
    torch.testing.assert_close(load_teacher(dst)(x).features, load_teacher(tmp_path / "clip.pth")(x).features)


def test_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"PK\x03\x04" + b"\x00" * 100)  # a zip header and nothing else
    assert main(["inspect", str(bad)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("milan inspect: error: cannot read checkpoint") and "\n" not in err
    torch.save({"foo": torch.zeros(1)}, tmp_path / "foo.pth")
    assert main(["convert", "--from", "hf", "--to", "timm", str(tmp_path / "foo.pth"), str(tmp_path / "x")]) == 1
    assert "unrecognised checkpoint layout" in capsys.readouterr().err


def test_python_m_milan_inspect_fresh_process(milan_ckpt: tuple[Path, torch.nn.Module]) -> None:
    path, _ = milan_ckpt
    proc = subprocess.run(
        [sys.executable, "-m", "milan", "inspect", str(path), "--groups", "2"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert "format:      milan" in proc.stdout and "... 4 more groups" in proc.stdout


def test_an_assumed_teacher_activation_is_one_warning_line(tmp_path: Path) -> None:
    """The CLI prints milan's warnings as one line, without Python's source location."""
    torch.save(open_clip_model(quick_gelu=False).state_dict(), tmp_path / "clip.pth")
    proc = subprocess.run(
        [sys.executable, "-m", "milan", "inspect", str(tmp_path / "clip.pth"), "--groups", "1"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("milan: warning: ") and "using QuickGELU" in lines[0] and "--act gelu" in lines[0]
    assert ".py:" not in lines[0] and "CheckpointWarning" not in lines[0]
