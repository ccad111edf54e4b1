"""Fixtures of the segmentation tests: generated image / label-map folders and a tiny patch-16 encoder checkpoint."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from milan.models.factory import DecoderConfig, EncoderConfig, ModelConfig, TeacherConfig, build_milan

REPO = Path(__file__).resolve().parents[2]


def write_pairs(
    images: Path,
    labels: Path,
    n: int,
    *,
    size: tuple[int, int] = (96, 64),
    values: int = 4,
    offset: int = 0,
    seed: int = 0,
    prefix: str = "img_",
) -> list[str]:
    """``n`` JPEG images and their 8-bit PNG label maps (``offset .. offset + values - 1``; image colour follows the
    label, so a model can learn something). Returns the stems."""
    images.mkdir(parents=True, exist_ok=True)
    labels.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    w, h = size
    colours = rng.integers(0, 256, (values, 3))
    stems = []
    for i in range(n):
        yy, xx = np.mgrid[0:h, 0:w]
        cx, cy = rng.integers(0, w), rng.integers(0, h)
        region = ((xx - cx) ** 2 // max(1, w // 3) + (yy - cy) ** 2 // max(1, h // 3) + i) % values
        pixels = np.clip(colours[region] + rng.integers(-20, 20, (h, w, 3)), 0, 255).astype(np.uint8)
        stem = f"{prefix}{i:04d}"
        Image.fromarray(pixels).save(images / f"{stem}.jpg", quality=92)
        Image.fromarray((region + offset).astype(np.uint8), mode="L").save(labels / f"{stem}.png")
        stems.append(stem)
    return stems


@pytest.fixture(scope="session")
def ade_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An ADE20K-release-shaped folder: 4 training and 2 validation pairs, labels 0 (other) .. 150."""
    root = tmp_path_factory.mktemp("ade") / "ADEChallengeData2016"
    for split, n, seed in (("training", 4, 0), ("validation", 2, 1)):
        write_pairs(
            root / "images" / split,
            root / "annotations" / split,
            n,
            values=151,
            seed=seed,
            prefix=f"ADE_{'train' if split == 'training' else 'val'}_",
        )
    return root


@pytest.fixture(scope="session")
def folder_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A generic layout (CamVid-like): train/ and test/ with images/ + labels/; 4 classes, ignore index 4."""
    root = tmp_path_factory.mktemp("generic")
    write_pairs(root / "train" / "images", root / "train" / "labels", 8, size=(64, 48), values=5, seed=0)
    write_pairs(root / "test" / "images", root / "test" / "labels", 3, size=(64, 48), values=5, seed=1)
    return root


def save_tiny_encoder(path: Path, patch_size: int = 16, depth: int = 2, embed_dim: int = 32, seed: int = 0) -> Path:
    """A randomly initialised student saved as a ``milan pretrain``-style state dict (32 px images)."""
    torch.manual_seed(seed)
    cfg = ModelConfig(
        encoder=EncoderConfig(img_size=32, patch_size=patch_size, embed_dim=embed_dim, depth=depth, num_heads=2),
        decoder=DecoderConfig(embed_dim=16, depth=1, num_heads=2),
        teacher=TeacherConfig(kind="none"),
    )
    model = build_milan(cfg)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": model.student.state_dict(), "config": {"model": dataclasses.asdict(cfg)}}, path)
    return path


@pytest.fixture(scope="session")
def tiny_encoder16(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Patch 16, 32 wide, 2 blocks (the ADE20K preset's 512 crops make a 32 x 32 grid)."""
    return save_tiny_encoder(tmp_path_factory.mktemp("enc") / "tiny16.pt")


@pytest.fixture(scope="session")
def tiny_encoder8(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Patch 8, 32 wide, 2 blocks (64 px crops: an 8 x 8 grid)."""
    return save_tiny_encoder(tmp_path_factory.mktemp("enc") / "tiny8.pt", patch_size=8)


def overrides(out: Path, root: Path, encoder: Path, **extra: object) -> list[str]:
    """A fast, quiet CPU run: tiny heads, 2 iterations, evaluation at the end only."""
    base: dict[str, object] = {
        "out_dir": out,
        "data.root": root,
        "encoder.pretrained": encoder,
        "encoder.num_heads": 2,
        "model.channels": 16,
        "model.aux_channels": 8,
        "batch_size": 2,
        "schedule.iters": 2,
        "schedule.warmup_iters": 1,
        "eval.every_steps": 0,
        "data.num_workers": 0,
        "runtime.device": "cpu",
        "runtime.cpu_threads": 1,
        "log.progress": False,
        "log.tensorboard": False,
        "log.every_steps": 1,
    }
    base.update(extra)
    return [f"{k}={'null' if v is None else v}" for k, v in base.items()]


def generic_overrides(out: Path, root: Path, encoder: Path, **extra: object) -> list[str]:
    """:func:`overrides` for the generic layout of :func:`folder_root` with 64 px crops."""
    generic: dict[str, object] = {
        "data.train_images": "train/images",
        "data.train_labels": "train/labels",
        "data.val_images": "test/images",
        "data.val_labels": "test/labels",
        "data.num_classes": 4,
        "data.ignore_index": 4,
        "data.reduce_zero_label": False,
        "data.crop_size": 64,
        "data.scale": "[96,64]",
        "eval.scale": "[96,64]",
        "eval.crop": 64,
        "eval.stride": 43,
        "data.class_names": None,
    }
    generic.update(extra)
    return overrides(out, root, encoder, **generic)
