"""Fixtures of the evaluation tests: CIFAR-10 subsets from the shared archives and a tiny encoder checkpoint."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from milan.data import extract_archive_subset
from milan.data.sources import natural_key
from milan.models.factory import build_milan, model_config

CIFAR = Path("/work/shared/data/cifar10_jpg")


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """Tiny models run fastest on one thread (several oversubscribe shared cores); restore the count after."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def cifar(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Class-balanced CIFAR-10 subsets as ImageFolder trees: train 100/class, train_small 30/class, val 30/class."""
    if not CIFAR.is_dir():
        pytest.skip(f"shared CIFAR-10 archives not found at {CIFAR}")
    root = tmp_path_factory.mktemp("cifar")
    train = extract_archive_subset(CIFAR / "train.tar.gz", root / "train", per_class=100)
    small = root / "train_small"  # the first 30 of each class, linked (no second pass over the archive)
    for folder in sorted(p for p in train.iterdir() if p.is_dir()):
        (small / folder.name).mkdir(parents=True)
        for image in sorted(folder.iterdir(), key=lambda p: natural_key(p.name))[:30]:
            (small / folder.name / image.name).symlink_to(image)
    return {
        "train": train,
        "train_small": small,
        "val": extract_archive_subset(CIFAR / "test.tar.gz", root / "val", per_class=30),
    }


@pytest.fixture(scope="session")
def tiny_encoder_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A randomly initialised milan_test_tiny student saved in our checkpoint layout.

    Honest note: no pretraining happens (seconds of pretraining on CPU would not change the features measurably);
    the jobs' tests check that the evaluation machinery learns from frozen or fine-tuned features, not that
    pretraining helped.
    """
    torch.manual_seed(0)
    cfg = model_config("milan_test_tiny")
    model = build_milan(dataclasses.replace(cfg, teacher=dataclasses.replace(cfg.teacher, kind="none")))
    path = tmp_path_factory.mktemp("ckpt") / "tiny_student.pt"
    torch.save({"model": model.student.state_dict(), "config": {"model": dataclasses.asdict(cfg)}}, path)
    return path


def job_overrides(out: Path, ckpt: Path, data: dict[str, Path], **extra: object) -> list[str]:
    """Overrides for a fast, quiet CPU run of a job on the CIFAR subsets."""
    base: dict[str, object] = {
        "out_dir": out,
        "encoder.pretrained": ckpt,
        "data.train": data["train"],
        "data.val": data["val"],
        "data.train_per_class": None,  # the presets name archives; here the subsets are folders already
        "data.val_per_class": None,
        "data.num_workers": 0,
        "runtime.device": "cpu",
        "runtime.cpu_threads": 1,
        "log.progress": False,
    }
    base.update(extra)
    return [f"{k}={'null' if v is None else v}" for k, v in base.items()]
