"""Shared fixtures of the engine tests: a small folder of JPEGs and tiny, fast configs."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from milan.train.config import PretrainConfig, load_config


def write_jpegs(folder: Path, n: int, size: tuple[int, int] = (40, 36), seed: int = 0) -> Path:
    """``n`` noisy RGB JPEGs (with a little structure so crops differ) in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        w, h = size
        base = rng.integers(0, 256, (1, 1, 3))
        ramp = np.linspace(0, 120, w)[None, :, None]
        noise = rng.integers(0, 60, (h, w, 3))
        pixels = np.clip(base + ramp + noise, 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"img_{i:03d}.jpg", quality=90)
    return folder


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """Tiny models run fastest on one thread, and far more predictably on a shared machine (with 2 threads and
    other processes competing for the cores, OpenMP synchronisation made steps ~15x slower here)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def image_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """16 small JPEGs."""
    return write_jpegs(tmp_path_factory.mktemp("images"), 16)


def tiny_overrides(run_dir: Path, data: Path | str, extra: dict[str, object] | None = None) -> list[str]:
    """Overrides for a fast CPU run of milan_test_tiny (32 px, 4 x 4 patches) without bar/TensorBoard/plot."""
    base = {
        "model_name": "milan_test_tiny",
        "out_dir": str(run_dir),
        "data.path": str(data),
        "data.num_workers": 0,
        "batch_size": 4,
        "optim.lr": 1e-3,
        "schedule.epochs": 2,
        "schedule.warmup_epochs": 1,
        "runtime.device": "cpu",
        "runtime.cpu_threads": 1,
        "log.progress": False,
        "log.tensorboard": False,
        "log.plot": False,
        "log.every_steps": 1,
        "checkpoint.every_epochs": 1,
    }
    base.update(extra or {})
    return [f"{k}={'null' if v is None else v}" for k, v in base.items()]


def tiny_config(run_dir: Path, data: Path | str, extra: dict[str, object] | None = None) -> PretrainConfig:
    return load_config(PretrainConfig, overrides=tiny_overrides(run_dir, data, extra))


def student_state(path: Path) -> dict[str, torch.Tensor]:
    """The student weights stored in a training checkpoint."""
    from milan.train.checkpointing import load_training_checkpoint

    return load_training_checkpoint(path)["model"]


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float = 0.0) -> None:
    assert a.keys() == b.keys()
    worst = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    assert worst <= atol, f"max weight difference {worst} > {atol}"
