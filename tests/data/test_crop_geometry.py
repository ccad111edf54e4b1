"""The two random-resized-crop geometries, and JPEG draft decoding as an explicit option.

``byol`` is the original MILAN linear probe's crop (ORIG ``util/crop.py``): one draw of area and log-aspect,
width and height rounded and clamped to the image, uniform placement, no retries, no centre-crop fallback. It is
checked against a naive implementation of that definition: box for box with the same random draws, and in
distribution with an unrelated random generator.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms import RandomResizedCrop as TorchvisionRRC
from torchvision.transforms import functional as TF

import milan.jobs.linprobe as linprobe_module
from milan.data import open_image, pretrain_transform
from milan.data.transforms import RandomResizedCropDecode, byol_crop_box, crop_box
from milan.train.config import LinprobeConfig, ProbeDataConfig, load_config

from .conftest import encode, noisy_rgb

SCALE = (0.08, 1.0)
RATIO = (3 / 4, 4 / 3)


def naive_box(width: int, height: int, draw: dict[str, float]) -> tuple[int, int, int, int]:
    """The definition, written out: ``draw`` holds the uniform variates (area in [0, 1), log-aspect, top, left)."""
    area = width * height * (SCALE[0] + (SCALE[1] - SCALE[0]) * draw["area"])
    aspect = math.exp(math.log(RATIO[0]) + (math.log(RATIO[1]) - math.log(RATIO[0])) * draw["aspect"])
    w = min(round(math.sqrt(area * aspect)), width)  # each side clamped to the image, independently
    h = min(round(math.sqrt(area / aspect)), height)
    top = math.floor(draw["top"] * (height - h + 1))  # placement uniform over the valid positions
    left = math.floor(draw["left"] * (width - w + 1))
    return top, left, h, w


def naive_sample(width: int, height: int, n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    keys = ("area", "aspect", "top", "left")
    return np.array([naive_box(width, height, dict(zip(keys, rng.random(4), strict=True))) for _ in range(n)])


def byol_sample(width: int, height: int, n: int, seed: int) -> np.ndarray:
    torch.manual_seed(seed)
    return np.array([byol_crop_box(width, height, SCALE, RATIO) for _ in range(n)])


def torchvision_sample(width: int, height: int, n: int, seed: int) -> np.ndarray:
    torch.manual_seed(seed)
    img = Image.new("RGB", (width, height))
    return np.array([TorchvisionRRC.get_params(img, list(SCALE), list(RATIO)) for _ in range(n)])


def test_byol_boxes_equal_the_definition_with_the_same_draws() -> None:
    for width, height in ((500, 375), (64, 200), (32, 32)):
        torch.manual_seed(3)
        expected = []
        for _ in range(300):  # the original's draws, in its order: area, log-aspect (float32), top, left
            area = torch.empty(1).uniform_(*SCALE).item()
            log_lo, log_hi = torch.log(torch.tensor(RATIO)).tolist()
            aspect = torch.exp(torch.empty(1).uniform_(log_lo, log_hi)).item()
            target = width * height * area
            w = min(round(math.sqrt(target * aspect)), width)
            h = min(round(math.sqrt(target / aspect)), height)
            top = int(torch.randint(0, height - h + 1, size=(1,)).item())
            left = int(torch.randint(0, width - w + 1, size=(1,)).item())
            expected.append((top, left, h, w))
        torch.manual_seed(3)
        assert [byol_crop_box(width, height, SCALE, RATIO) for _ in range(300)] == expected


def test_byol_distribution_matches_the_naive_definition_and_differs_from_torchvision() -> None:
    width, height, n = 500, 375, 20_000
    ours, naive, tv = (
        byol_sample(width, height, n, 0),
        naive_sample(width, height, n, 1),
        torchvision_sample(width, height, n, 2),
    )
    for boxes in (ours, naive, tv):  # every box lies inside the image
        top, left, h, w = boxes.T
        assert (h >= 1).all() and (w >= 1).all() and (top + h <= height).all() and (left + w <= width).all()
    area = {name: b[:, 2] * b[:, 3] / (width * height) for name, b in (("ours", ours), ("naive", naive), ("tv", tv))}
    aspect = {name: np.log(b[:, 3] / b[:, 2]) for name, b in (("ours", ours), ("naive", naive))}
    # Area and aspect distributions agree with the definition (quantiles within sampling noise).
    qs = np.linspace(0.05, 0.95, 19)
    assert np.abs(np.quantile(area["ours"], qs) - np.quantile(area["naive"], qs)).max() < 0.02
    assert np.abs(np.quantile(aspect["ours"], qs) - np.quantile(aspect["naive"], qs)).max() < 0.02
    # Clamping: a box drawn taller than the image takes its full height (500x375: sqrt(area / aspect) reaches 500),
    # so full-height crops are common; torchvision redraws those boxes instead.
    full = {name: float(np.mean(b[:, 2] == height)) for name, b in (("ours", ours), ("naive", naive), ("tv", tv))}
    assert abs(full["ours"] - full["naive"]) < 0.015 and full["ours"] > 0.1 > full["tv"]
    # The measurement (500x375, 40k draws): mean area 0.52 vs 0.43; crops above 80 % 12.6 % vs 5.6 %.
    assert area["ours"].mean() == pytest.approx(0.52, abs=0.01)
    assert area["tv"].mean() == pytest.approx(0.43, abs=0.01)
    assert np.mean(area["ours"] > 0.8) == pytest.approx(0.126, abs=0.01)
    assert np.mean(area["tv"] > 0.8) == pytest.approx(0.056, abs=0.01)


def test_the_decode_stage_crops_the_box_of_its_geometry() -> None:
    data = encode(noisy_rgb(120, 90, seed=4), "JPEG", quality=95)
    full = open_image(data).convert("RGB")
    for geometry in ("byol", "torchvision"):
        stage = RandomResizedCropDecode(32, scale=SCALE, crop=geometry)  # type: ignore[arg-type]
        torch.manual_seed(7)
        out = stage(open_image(data))
        torch.manual_seed(7)
        top, left, h, w = crop_box(*full.size, SCALE, RATIO, geometry)  # type: ignore[arg-type]
        expected = TF.resized_crop(full, top, left, h, w, [32, 32], InterpolationMode.BICUBIC, antialias=True)
        assert np.array_equal(np.asarray(out), np.asarray(expected))
    with pytest.raises(ValueError, match="crop must be one of"):
        RandomResizedCropDecode(32, crop="mmcv")  # type: ignore[arg-type]


def test_the_linear_probe_uses_the_geometry_its_config_names(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert ProbeDataConfig().crop_geometry == "byol"  # the original's, which the preset cites
    assert LinprobeConfig().data.draft is False

    class Built(Exception):  # stops the job once its training view is built
        pass

    def spy(*args: Any, **kwargs: Any) -> Any:
        raise Built(pretrain_transform(*args, **kwargs))

    monkeypatch.setattr(linprobe_module, "pretrain_transform", spy)
    for geometry in ("byol", "torchvision"):
        overrides = [f"out_dir={tmp_path / geometry}", "encoder.model_name=milan_test_tiny", "data.train=t",
                     "data.val=v", f"data.crop_geometry={geometry}", "runtime.device=cpu"]  # fmt: skip
        with pytest.raises(Built) as built:
            linprobe_module.linprobe(load_config(LinprobeConfig, overrides=overrides))
        stage = built.value.args[0].decode
        assert isinstance(stage, RandomResizedCropDecode) and stage.crop == geometry and not stage.draft


def test_draft_is_off_unless_asked_for_and_changes_large_jpegs() -> None:
    data = encode(noisy_rgb(800, 800, seed=5), "JPEG", quality=90)
    off, on = pretrain_transform(32), pretrain_transform(32, draft=True)
    assert not off.decode.draft and on.decode.draft  # type: ignore[attr-defined]
    torch.manual_seed(0)
    a = off(open_image(data))
    torch.manual_seed(0)
    b = on(open_image(data))
    assert a.shape == b.shape == (3, 32, 32) and not torch.equal(a, b)  # an 800 px JPEG at 32 px is drafted
