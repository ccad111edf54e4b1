"""``data.decode: device``: batched decoding, the on-device view, and a pretraining run through it (CPU here)."""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from timm.data.constants import IMAGENET_DEFAULT_MEAN as IMAGENET_MEAN
from timm.data.constants import IMAGENET_DEFAULT_STD as IMAGENET_STD
from torchvision.transforms import InterpolationMode, RandomResizedCrop
from torchvision.transforms.v2 import functional as F

from milan.data import build_dataset, pretrain_transform
from milan.data.decode import BadSample, decode_rgb
from milan.data.device import (
    DeviceAugment,
    EncodedImages,
    collate_encoded,
    decode_batch,
    decode_on_device,
    view_params,
)
from milan.errors import ConfigError
from milan.jobs.pretrain import pretrain
from milan.train.logging import read_metrics
from tests.data.conftest import BOMB_LIMIT, bad_images, encode, good_images, noisy_rgb, write_files
from tests.train.conftest import tiny_config, write_jpegs

CPU = torch.device("cpu")


def as_tensor(data: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.empty(0, dtype=torch.uint8)


def pil_chw(data: bytes) -> torch.Tensor:
    """The CPU path's decode of ``data`` as ``(3, H, W)`` uint8."""
    return torch.from_numpy(np.array(decode_rgb(data))).permute(2, 0, 1)


def normalise(views: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(IMAGENET_MEAN).view(-1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(-1, 3, 1, 1)
    return (views.float() / 255 - mean) / std


def test_batched_jpegs_equal_pillows_decode() -> None:
    blobs = [
        encode(noisy_rgb(w, h, seed=i), "JPEG", quality=95) for i, (w, h) in enumerate([(40, 30), (17, 33), (64, 64)])
    ]
    out = decode_on_device([as_tensor(b) for b in blobs], ["a.jpg", "b.jpg", "c.jpg"], CPU)
    for blob, image in zip(blobs, out, strict=True):
        assert isinstance(image, torch.Tensor) and image.dtype == torch.uint8
        ref = pil_chw(blob)
        assert image.shape == ref.shape
        assert (image.int() - ref.int()).abs().max().item() <= 1


def test_every_format_gets_the_cpu_paths_rgb() -> None:
    """PNG/WebP/BMP (and transparency, palettes, 16 bit, CMYK JPEG) give exactly the CPU path's pixels."""
    images = good_images()
    names = list(images)
    out = decode_on_device([as_tensor(images[n][0]) for n in names], names, CPU)
    for name, image in zip(names, out, strict=True):
        assert isinstance(image, torch.Tensor), (name, image)
        assert torch.equal(image, pil_chw(images[name][0])), name


def test_bad_files_are_skipped_with_their_reasons_and_the_rest_decode() -> None:
    good = encode(noisy_rgb(24, 20, seed=3), "JPEG", quality=95)
    png = encode(noisy_rgb(20, 24, seed=4), "PNG")
    bad = bad_images()
    names = ["good.jpg", *bad, "good.png"]
    blobs = [good, *(blob for blob, _ in bad.values()), png]
    out = decode_on_device([as_tensor(b) for b in blobs], names, CPU, max_pixels=BOMB_LIMIT)
    assert torch.equal(out[0], pil_chw(good)) and torch.equal(out[-1], pil_chw(png))  # type: ignore[arg-type]
    skipped = out[1:-1]
    assert all(isinstance(s, BadSample) for s in skipped)
    got = {s.path: s.reason for s in skipped if isinstance(s, BadSample)}
    assert got == {name: reason for name, (_, reason) in bad.items()}


def test_a_damaged_jpeg_does_not_spoil_its_batch_without_header_checks() -> None:
    jpgs = [encode(noisy_rgb(32, 32, seed=i), "JPEG", quality=95) for i in range(3)]
    truncated = jpgs[1][: len(jpgs[1]) // 2]
    out = decode_on_device(
        [as_tensor(jpgs[0]), as_tensor(truncated), as_tensor(jpgs[2]), as_tensor(b"")], list("abcd"), CPU
    )
    assert torch.equal(out[0], pil_chw(jpgs[0])) and torch.equal(out[2], pil_chw(jpgs[2]))  # type: ignore[arg-type]
    assert isinstance(out[1], BadSample) and out[1].reason == "truncated" and out[1].path == "b"
    assert isinstance(out[3], BadSample) and out[3].reason == "empty"


@pytest.mark.parametrize(
    ("height", "width", "scale", "ratio"),
    [(36, 40, (0.2, 1.0), (3 / 4, 4 / 3)), (500, 375, (0.08, 1.0), (3 / 4, 4 / 3)), (10, 200, (0.9, 1.0), (1.0, 1.0))],
)
def test_crop_box_draws_what_torchvision_draws(
    height: int, width: int, scale: tuple[float, float], ratio: tuple[float, float]
) -> None:
    """Same seed -> the same box as ``RandomResizedCrop.get_params`` with the global generator (the last case
    always ends in the central fallback)."""
    img = torch.zeros(3, height, width)
    boxes = set()
    for seed in range(40):
        torch.manual_seed(seed)
        expected = tuple(RandomResizedCrop.get_params(img, list(scale), list(ratio)))
        state = torch.get_rng_state()
        got, _ = view_params(height, width, scale, ratio, 0.5, seed)
        assert got == expected, seed
        assert torch.equal(torch.get_rng_state(), state)  # the caller's random state is untouched
        boxes.add(got)
    assert len(boxes) > (1 if scale[0] < 0.9 else 0)


@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear"])
def test_full_crop_is_a_plain_resize_and_hflip_flips(interpolation: str) -> None:
    image = pil_chw(encode(noisy_rgb(48, 48, seed=5), "PNG"))  # (3, 48, 48)
    mode = InterpolationMode(interpolation)
    resized = F.resize(image, [16, 16], interpolation=mode, antialias=True)  # (3, 16, 16) uint8
    keep = DeviceAugment(16, scale=(1.0, 1.0), ratio=(1.0, 1.0), interpolation=interpolation, hflip=0.0)
    flip = DeviceAugment(16, scale=(1.0, 1.0), ratio=(1.0, 1.0), interpolation=interpolation, hflip=1.0)
    out = keep([image, image], [1, 2])
    assert out.shape == (2, 3, 16, 16) and out.dtype == torch.float32
    assert torch.equal(out, normalise(torch.stack([resized, resized])))
    assert torch.equal(flip([image], [1]), normalise(resized.flip(-1)[None]))


def test_the_seed_decides_the_view() -> None:
    image = pil_chw(encode(noisy_rgb(64, 48, seed=6), "PNG"))
    augment = DeviceAugment(16)
    a, b, c = (augment([image], [seed]) for seed in (7, 7, 8))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_encoded_items_and_decode_batch(tmp_path: Path) -> None:
    write_jpegs(tmp_path / "d", 3, size=(40, 36))
    bad = bad_images()
    write_files(tmp_path / "d", {name: blob for name, (blob, _) in bad.items()})
    dataset = EncodedImages(build_dataset(tmp_path / "d", pretrain_transform(16), max_pixels=BOMB_LIMIT))
    assert len(dataset) == 3 + len(bad)
    torch.manual_seed(0)
    batch = collate_encoded([dataset[i] for i in range(len(dataset))])
    # The workers' header check already skips empty files, non-images, bombs and broken headers.
    assert Counter(s.reason for s in batch.skipped) == Counter(
        {"empty": 1, "not an image": 1, "too large": 1, "corrupt": 1}
    )
    assert len(batch) == 5 and batch.offsets[-1] == batch.data.numel()
    noise = torch.arange(len(batch))
    out, keep = decode_batch(batch, DeviceAugment(16), CPU)
    assert out.images.shape == (3, 3, 16, 16) and out.labels.tolist() == [-1, -1, -1]
    assert keep.tolist() == [not p.endswith(("corrupt.png", "truncated.jpg")) for p in batch.paths]
    assert noise[keep].numel() == 3
    assert Counter(s.reason for s in out.skipped) == Counter(reason for _, reason in bad.values())
    assert math.isfinite(out.images.sum().item())


def test_device_decode_refuses_tar_shards(tmp_path: Path) -> None:
    pytest.importorskip("webdataset")
    with pytest.raises(ConfigError, match=r"data\.decode"):
        EncodedImages(build_dataset(str(tmp_path / "train-000000.tar"), pretrain_transform(16)))


def test_pretrain_with_device_decoding(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A broken header is caught by the workers, a truncated JPEG by the device decoder: both are reported."""
    data = write_jpegs(tmp_path / "data", 6)
    jpg = encode(noisy_rgb(40, 36, seed=9), "JPEG", quality=95)
    write_files(data, {"truncated.jpg": jpg[: len(jpg) // 2], "broken.jpg": bad_images()["broken_header.jpg"][0]})
    cfg = tiny_config(tmp_path / "run", data, {"schedule.epochs": 1, "data.decode": "device", "batch_size": 2})
    summary = pretrain(cfg)
    assert summary.checkpoint is not None and summary.checkpoint.exists()
    assert summary.state.images_seen == 6
    (epoch,) = read_metrics(tmp_path / "run" / "metrics.jsonl", "epoch")
    assert epoch["data"]["seen"] == 8 and epoch["data"]["skipped"] == 2
    assert epoch["data"]["reasons"] == {"corrupt": 1, "truncated": 1}
    assert "skipped 2 of 8 images: 1 corrupt, 1 truncated" in capsys.readouterr().out


def test_views_do_not_depend_on_the_workers(tmp_path: Path) -> None:
    """Each sample's seed comes from SeededSamples' per-(seed, epoch, index) seeding, not from a worker's stream."""
    from milan.data.sampling import seeded_loader

    dataset = EncodedImages(build_dataset(write_jpegs(tmp_path / "d", 8), pretrain_transform(16)))

    def views(num_workers: int) -> list[torch.Tensor]:
        loader, sampler, _ = seeded_loader(
            dataset, batch_size=4, seed=3, noise_len=4, num_workers=num_workers, device=CPU, key="k",
            collate=collate_encoded,
        )  # fmt: skip
        sampler.set_epoch(1)
        return [decode_batch(batch, DeviceAugment(16), CPU)[0].images for batch, _ in loader]

    in_main, in_workers = views(0), views(2)
    assert len(in_main) == 2
    assert all(torch.equal(a, b) for a, b in zip(in_main, in_workers, strict=True))
    assert not torch.equal(in_main[0], in_main[1])
