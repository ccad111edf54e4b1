"""A teacher from a file on another patch grid: the Python API builds what the CLI builds (issue 10 §5)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from milan.checkpoint import load_teacher, model_from_config
from milan.models import clip_vision_tower, create_model, model_config
from milan.models.factory import model_flops


@pytest.fixture
def teacher_file(tmp_path: Path) -> Path:
    """A /4 teacher at 24 px (6 x 6 grid): neither its grid nor its patch size is milan_test_tiny's (4 x 4, /8)."""
    torch.manual_seed(3)
    tower = clip_vision_tower(img_size=24, patch_size=4, width=96, depth=3, num_heads=2, out_dim=32)
    path = tmp_path / "teacher.pt"
    torch.save(tower.state_dict(), path)
    return path


def test_create_model_runs_a_loaded_teacher_on_the_student_grid(teacher_file: Path) -> None:
    """Before: ValueError "teacher patch grid (6, 6) != student patch grid (4, 4)"."""
    model = create_model("milan_test_tiny", teacher=load_teacher(teacher_file))
    assert model.teacher is not None and model.teacher.grid_size == model.encoder.grid_size == (4, 4)
    cfg = model_config("milan_test_tiny")
    cfg.teacher.checkpoint = str(teacher_file)
    from_cli = model_from_config(cfg).teacher  # what `milan pretrain model.teacher.checkpoint=...` builds
    assert from_cli is not None
    images = torch.randn(2, 3, 32, 32)
    api_out, cli_out = model.teacher(images), from_cli(images)
    assert api_out.features.shape == (2, 17, 32)
    assert torch.equal(api_out.features, cli_out.features)
    assert torch.equal(api_out.cls_attention, cli_out.cls_attention)


def test_bf16_teacher_resizes_its_input_in_fp32(teacher_file: Path) -> None:
    """Before: NotImplementedError "compute_index_ranges_weights" not implemented for 'BFloat16' (CPU bicubic)."""
    fp32 = load_teacher(teacher_file, grid_size=4)  # runs at 16 px: 32 px inputs are resized
    bf16 = load_teacher(teacher_file, grid_size=4).to_compute_dtype(torch.bfloat16)
    images = torch.randn(2, 3, 32, 32)
    out, ref = bf16(images), fp32(images)
    assert out.features.dtype == torch.bfloat16 and out.features.shape == ref.features.shape == (2, 17, 32)
    torch.testing.assert_close(out.features.float(), ref.features, atol=0.1, rtol=0.05)
    torch.testing.assert_close(out.cls_attention, ref.cls_attention, atol=0.02, rtol=0.1)
    again = bf16.to_compute_dtype(torch.bfloat16)(images)  # casting twice keeps one input cast
    assert torch.equal(again.features, out.features)


def test_flops_count_the_loaded_teacher(teacher_file: Path) -> None:
    """Before: the config's (random) teacher was counted whatever file was loaded."""
    cfg = model_config("milan_test_tiny")
    model = create_model("milan_test_tiny", teacher=load_teacher(teacher_file))
    assert model.teacher is not None
    counted = model_flops(cfg, model.teacher)
    assert counted.teacher != model_flops(cfg).teacher
    images = torch.randn(2, 3, 16, 16)  # the teacher's own resolution (16 px), so the resize is not in the count
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model.teacher(images)
    cls_row = 2 * (1 + 16) * 96  # the CLS attention row, which the analytic count leaves out
    assert counter.get_total_flops() == 2 * (counted.teacher + cls_row)


def test_pretrain_with_a_bf16_resized_teacher_reports_its_flops(
    tmp_path: Path, teacher_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The CLI end to end: bf16 teacher + input resize runs on CPU, and the start-up FLOPs include that teacher."""
    from milan.cli import main
    from tests.train.conftest import tiny_overrides, write_jpegs

    images = write_jpegs(tmp_path / "images", 4)
    extra = {"model.teacher.checkpoint": teacher_file, "runtime.teacher_dtype": "bf16", "schedule.max_steps": 1}
    assert main(["pretrain", *tiny_overrides(tmp_path / "run", images, extra)]) == 0
    out = capsys.readouterr().out
    teacher = create_model("milan_test_tiny", teacher=load_teacher(teacher_file)).teacher
    expected = model_flops(model_config("milan_test_tiny"), teacher).total / 1e9
    printed = re.search(r"teacher ([\d.]+) M frozen; ([\d.e+-]+) GFLOP per training image", out)
    assert printed is not None, out
    assert float(printed.group(1)) == pytest.approx(sum(p.numel() for p in teacher.parameters()) / 1e6, abs=0.01)
    assert printed.group(2) == f"{expected:.3g}"
    assert printed.group(2) != f"{model_flops(model_config('milan_test_tiny')).total / 1e9:.3g}"
