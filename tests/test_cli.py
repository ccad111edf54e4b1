"""The ``milan`` command line: one-line errors at the boundary, the traceback switch, --version, config, models,
presets named from anywhere (issues 10 §6 and 11 §5)."""

from __future__ import annotations

import dataclasses
import errno
import importlib.machinery
import os
import shutil
import sys
import types
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from milan import __version__
from milan.cli import main
from milan.errors import TRACEBACK_ENV, UserError
from milan.jobs.config import JOBS, describe, field_docs
from milan.train.config import ConfigError, PretrainConfig, field_types, load_config
from tests.train.conftest import tiny_overrides, write_jpegs

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _no_traceback_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(TRACEBACK_ENV, "0")  # restored after each test, also when main() sets it


def _one_line_error(err: str, text: str) -> None:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert text in lines[0], err
    assert "Traceback" not in err


# ---------------------------------------------------------------------------------------------------------------
# Misuse is one line, not a traceback (issue 11 §5)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_cuda_without_a_gpu_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Before: a traceback ending in RuntimeError: runtime.device=cuda but no CUDA device is visible."""
    args = tiny_overrides(tmp_path / "run", write_jpegs(tmp_path / "img", 2), {"runtime.device": "cuda"})
    assert main(["pretrain", *args]) == 1
    _one_line_error(capsys.readouterr().err, "milan pretrain: error: runtime.device=cuda but no CUDA device is visible")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("override", "text"),
    [
        ("model.mask_ratio=1.0", "model.mask_ratio must be in [0, 1), got 1.0; e.g. model.mask_ratio=0.75"),
        ("optim.lr=-1", "optim.lr must be >= 0, got -1.0"),
    ],
)
def test_out_of_range_values_are_one_line(
    tmp_path: Path, override: str, text: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Before: tracebacks from masking.num_visible ("mask_ratio must be in [0, 1)") and torch's AdamW
    ("Invalid learning rate: -1.0") after the run had started."""
    args = tiny_overrides(tmp_path / "run", tmp_path / "no-images-needed", {})
    assert main(["pretrain", *args, override]) == 2
    _one_line_error(capsys.readouterr().err, text)
    assert not (tmp_path / "run").exists()


def test_fp16_on_cpu_says_it_runs_fp32(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Before: runtime.precision=fp16 on CPU silently trained in fp32."""
    images = write_jpegs(tmp_path / "img", 4)
    extra = {"runtime.precision": "fp16", "schedule.max_steps": 1}
    assert main(["pretrain", *tiny_overrides(tmp_path / "run", images, extra)]) == 0
    out = capsys.readouterr().out
    notes = [line for line in out.splitlines() if "runtime.precision=fp16" in line]
    assert len(notes) == 1 and "runs in fp32 on cpu" in notes[0], out
    assert "(cpu, float32," in out


def test_traceback_switch_and_env_show_the_traceback(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    args = ["pretrain", *tiny_overrides(tmp_path / "run", tmp_path / "x", {}), "optim.lr=-1"]
    with pytest.raises(ConfigError, match=r"optim\.lr must be >= 0"):
        main(["--traceback", *args])
    monkeypatch.setenv(TRACEBACK_ENV, "1")
    with pytest.raises(ConfigError, match=r"optim\.lr must be >= 0"):
        main(args)


@pytest.fixture
def fake_command(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[BaseException]]:
    """A ``milan boom`` command that raises whatever the test puts in the list."""
    raised: list[BaseException] = []
    module = types.ModuleType("milan_test_boom")
    module.__spec__ = importlib.machinery.ModuleSpec("milan_test_boom", None)
    module.add_arguments = lambda parser, command: None  # type: ignore[attr-defined]

    def run(args: object) -> int:
        raise raised[0]

    module.run = run  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "milan_test_boom", module)
    import milan.cli

    real = milan.cli.commands
    monkeypatch.setattr(milan.cli, "commands", lambda: {**real(), "boom": ("milan_test_boom", "raises")})
    yield raised


@pytest.mark.parametrize(
    ("error", "code", "text"),
    [
        (OSError(errno.ENOSPC, "No space left on device", "/runs/x/last.pt"), 1, "No space left on device: /runs/x"),
        (PermissionError(errno.EACCES, "Permission denied", "/ro/runs"), 1, "Permission denied: /ro/runs"),
        (UserError("the thing is wrong; do this"), 1, "the thing is wrong; do this"),
        (ConfigError("bad value\n  with a second line"), 2, "bad value; with a second line"),
    ],
)
def test_user_errors_at_the_boundary(
    fake_command: list[BaseException], error: BaseException, code: int, text: str, capsys: pytest.CaptureFixture[str]
) -> None:
    fake_command.append(error)
    assert main(["boom"]) == code
    _one_line_error(capsys.readouterr().err, f"milan boom: error: {text}")


def test_checkpoint_errors_are_one_line(fake_command: list[BaseException], capsys: pytest.CaptureFixture[str]) -> None:
    from milan.checkpoint.io import CheckpointError

    fake_command.append(CheckpointError("x.pt: truncated file"))
    assert main(["boom"]) == 1
    _one_line_error(capsys.readouterr().err, "milan boom: error: x.pt: truncated file")


def test_bugs_keep_their_traceback(fake_command: list[BaseException]) -> None:
    fake_command.append(ZeroDivisionError("a bug"))
    with pytest.raises(ZeroDivisionError):
        main(["boom"])


def test_interrupt_is_one_line(fake_command: list[BaseException], capsys: pytest.CaptureFixture[str]) -> None:
    fake_command.append(KeyboardInterrupt())
    assert main(["boom"]) == 130
    _one_line_error(capsys.readouterr().err, "milan boom: interrupted")


# ---------------------------------------------------------------------------------------------------------------
# Discoverable configuration (issue 10 §6)


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    """Before: "milan: unknown command '--version'"."""
    assert main(["--version"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"milan-pretrain {__version__} (torch {torch.__version__}")


def test_help_documents_the_switches(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for text in ("--traceback", TRACEBACK_ENV, "--version", "config", "models", "--config demo_cpu"):
        assert text in out


def test_models_lists_every_variant_with_exact_counts(capsys: pytest.CaptureFixture[str]) -> None:
    """Before: "milan: unknown command 'models'"."""
    from milan.models import build_milan, list_models, model_config

    assert main(["models"]) == 0
    out = capsys.readouterr().out
    for name in list_models():
        assert name in out
    model = build_milan(model_config("milan_demo_small"))  # the oracle: count a real build
    enc = sum(p.numel() for p in model.encoder.parameters() if p.requires_grad)
    dec = sum(p.numel() for p in model.decoder.parameters() if p.requires_grad)
    (row,) = [line for line in out.splitlines() if line.startswith("milan_demo_small ")]
    assert f"{enc / 1e6:.2f} M" in row and f"{dec / 1e6:.2f} M" in row
    assert f"{100 * dec / (enc + dec):.0f} %" in row
    (base,) = [line for line in out.splitlines() if line.startswith("milan_vit_base_patch16 ")]
    assert "85.65 M" in base and "25.88 M" in base and "86.2 M" in base  # ViT-B/16, its decoder, CLIP ViT-B/16


def _flat_keys(cls: type, prefix: str = "") -> list[str]:
    out = []
    for f in dataclasses.fields(cls):
        tp = field_types(cls)[f.name]
        if dataclasses.is_dataclass(tp):
            out += [f"{prefix}{f.name}", *_flat_keys(tp, f"{prefix}{f.name}.")]  # type: ignore[arg-type]
        else:
            out.append(f"{prefix}{f.name}")
    return out


@pytest.mark.parametrize("job", list(JOBS))
def test_config_prints_every_key(job: str, capsys: pytest.CaptureFixture[str]) -> None:
    """Before: "milan: unknown command 'config'"."""
    assert main(["config", job]) == 0
    lines = capsys.readouterr().out.splitlines()
    cls = JOBS[job]
    printed = [line.split()[0].strip("[]") for line in lines[2:]]
    assert printed == _flat_keys(cls)


def test_config_descriptions_come_from_the_code(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config", "pretrain", "--config", "demo_cpu", "optim.blr=3e-4"]) == 0
    lines = capsys.readouterr().out.splitlines()
    row = {line.split()[0]: line for line in lines}
    assert "float >= 0" in row["optim.blr"] and "0.0003 *" in row["optim.blr"]
    assert "base lr: lr = blr * effective batch / 256" in row["optim.blr"]
    assert "float in [0, 1)" in row["model.mask_ratio"] and "0.75" in row["model.mask_ratio"]
    assert "runs/demo *" in row["out_dir"]  # set by the preset
    assert "int >= 1 | null" in row["model.teacher.img_size"] and "null" in row["model.teacher.img_size"]
    assert row["[optim]"].startswith("[optim]  AdamW")


def test_every_key_of_the_shared_and_model_sections_is_described() -> None:
    """The sections this module documents: a new field without a comment fails here."""
    from milan.models.factory import ModelConfig
    from milan.train.config import RunConfig

    cfg = load_config(PretrainConfig)
    rows = describe(cfg)
    owned = {f"{p}{k}" for p, cls in (("", RunConfig), ("model.", ModelConfig)) for k in _flat_keys(cls)}
    undescribed = [r.key for r in rows if r.key in owned and not r.description]
    assert undescribed == []


def test_field_docs_read_comments_beside_and_above() -> None:
    from milan.train.config import AdamWConfig, PretrainRuntimeConfig

    docs = field_docs(AdamWConfig)
    assert docs["clip_grad"] == "max global grad norm; None = no clipping (the reference)"
    assert docs["wd_exempt_tokens"].startswith("True: no decay on cls/mask tokens")  # the comment lines above it
    assert docs["wd_exempt_tokens"].endswith("are never decayed.")
    assert "teacher_dtype" in field_docs(PretrainRuntimeConfig)


def test_presets_are_named_from_any_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Before: "config file not found: demo_cpu" (and configs/... outside the clone)."""
    monkeypatch.chdir(tmp_path)
    outputs = []
    for name in ("demo_cpu", "pretrain/demo_cpu", "configs/pretrain/demo_cpu.yaml", "demo_cpu.yaml"):
        assert main(["pretrain", "--config", name, "--print-config"]) == 0, name
        outputs.append(capsys.readouterr().out)
    assert all(out == outputs[0] for out in outputs) and "model_name: milan_demo_small" in outputs[0]
    argv = ["linprobe", "--config", "cifar10_tiny_cpu", "data.train=t", "data.val=v", "--print-config"]
    assert main(argv) == 0  # the job's own preset (its data locations come from the user)
    assert "out_dir: runs/linprobe_cifar10_tiny" in capsys.readouterr().out
    assert main(["pretrain", "--config", "nope"]) == 2
    err = capsys.readouterr().err
    assert "config file not found: nope" in err and "presets: demo_cpu" in err
    assert main(["pretrain", "--config", "cifar10_tiny_cpu"]) == 2
    assert "exists for finetune, knn, linprobe: name one" in capsys.readouterr().err
    (tmp_path / "demo_cpu.yaml").write_text("batch_size: 3\n")  # a file in the folder wins over the preset
    assert main(["pretrain", "--config", "demo_cpu.yaml", "--print-config"]) == 0
    assert "batch_size: 3" in capsys.readouterr().out


def test_presets_are_package_data(tmp_path: Path) -> None:
    """A wheel built from the tree carries configs/ as milan/configs/ (so an installed package finds them)."""
    import subprocess

    if not (REPO / "pyproject.toml").is_file():
        pytest.skip("not a source tree")
    src = tmp_path / "src"  # a copy, so that the build leaves nothing in the tree
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info", "build")
    shutil.copytree(REPO / "milan", src / "milan", symlinks=True, ignore=ignore)  # milan/configs stays a link
    shutil.copytree(REPO / "configs", src / "configs")
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(REPO / name, src / name)
    cmd = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(tmp_path)]
    done = subprocess.run([*cmd, str(src)], capture_output=True, text=True, env={**os.environ, "PIP_NO_INDEX": "1"})
    if done.returncode != 0:
        pytest.skip(f"cannot build a wheel here: {done.stderr[-300:]}")
    (wheel,) = tmp_path.glob("*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for preset in (REPO / "configs").glob("*/*.yaml"):
        assert f"milan/configs/{preset.parent.name}/{preset.name}" in names


# ---------------------------------------------------------------------------------------------------------------
# Documentation that stands on its own (issue 10 §7)


def test_docs_and_presets_cite_nothing_outside_the_repository() -> None:
    """Before: README, presets and docstrings cited a reference document (``../shared/docs/milan_reference.md``)
    that is not in the repository."""
    import re

    files = [REPO / "README.md", *(REPO / "configs").glob("*/*.yaml"), *(REPO / "milan").rglob("*.py")]
    offenders = [
        f"{path.relative_to(REPO)}: {hit}"
        for path in files
        for hit in re.findall(r"\.\./shared\S*|milan_reference\.md|shared/docs\S*", path.read_text())
    ]
    assert offenders == []
    links = re.findall(r"\]\(((?!https?://|#)[^)\s]+)\)", (REPO / "README.md").read_text())
    assert links and [link for link in links if not (REPO / link).exists()] == []


def test_the_architecture_page_names_code_that_exists() -> None:
    """Each ``milan/FILE.py: name`` of docs/architecture.md is a file that defines that name."""
    import re

    refs = re.findall(r"`(milan/[\w/]+\.py)(?:: ([\w.]+))?`", (REPO / "docs/architecture.md").read_text())
    assert len(refs) > 20
    for path, name in (ref for ref in refs if "NAME" not in ref[0]):  # milan/jobs/NAME.py: a new job
        source = (REPO / path).read_text()
        last = name.rpartition(".")[2]
        assert not name or re.search(rf"^\s*(def|class) {last}\b|^{last}\b.*=", source, re.M), f"{path}: {name}"


def test_a_job_is_found_by_its_commands_and_its_schema() -> None:
    """A job is its module (``COMMANDS``) and its schema (``NameConfig`` in milan.train.config), nothing else."""
    from milan.jobs import commands

    found = commands()
    assert list(found) == [
        "finetune", "knn", "linprobe", "pretrain", "segment",  # the jobs with a config first
        "config", "convert", "evaluate", "export", "inspect", "models", "plot", "visualize",
    ]  # fmt: skip
    assert found["inspect"][0] == "milan.jobs.export"
    assert list(JOBS) == ["finetune", "knn", "linprobe", "pretrain", "segment"]
