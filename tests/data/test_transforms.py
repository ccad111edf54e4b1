"""Pretraining / evaluation views: oracles against torchvision, normalisation, and the JPEG draft path."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter
from timm.data.constants import IMAGENET_DEFAULT_MEAN as IMAGENET_MEAN
from timm.data.constants import IMAGENET_DEFAULT_STD as IMAGENET_STD
from torchvision import transforms as T

import milan.data.transforms as transforms_module
from milan.data import decode_rgb, eval_transform, open_image, pretrain_transform
from milan.data.transforms import RandomResizedCropDecode

from .conftest import encode


def photo_like_jpeg(width: int = 480, height: int = 360, quality: int = 90) -> bytes:
    """Smooth structure plus blurred texture, like a downscaled photo (not white noise)."""
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    texture = Image.fromarray(noise).filter(ImageFilter.GaussianBlur(3))
    x, y = np.linspace(0, 6, width), np.linspace(0, 4, height)
    waves = 127 + 100 * np.sin(3 * x)[None, :, None] * np.cos(2 * y)[:, None, None]  # (H, W, 1)
    pixels = np.asarray(texture) // 2 + (waves.repeat(3, axis=2) // 2).astype(np.uint8)
    return encode(Image.fromarray(pixels.astype(np.uint8)), "JPEG", quality=quality)


def test_pretrain_view_shape_and_normalisation_of_a_solid_image() -> None:
    colour = (200, 100, 50)
    out = pretrain_transform(24)(Image.new("RGB", (70, 40), colour))
    assert out.shape == (3, 24, 24) and out.dtype == torch.float32 and type(out) is torch.Tensor
    expected = (torch.tensor(colour) / 255 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    torch.testing.assert_close(out, expected.view(3, 1, 1).expand(3, 24, 24), atol=1e-5, rtol=0)


def test_without_draft_the_crop_is_exactly_torchvisions_random_resized_crop() -> None:
    data = photo_like_jpeg(200, 150)
    reference = T.RandomResizedCrop(48, scale=(0.2, 1.0), interpolation=T.InterpolationMode.BICUBIC)
    for seed in range(5):
        torch.manual_seed(seed)
        ours = RandomResizedCropDecode(48, draft=False)(open_image(data))
        torch.manual_seed(seed)
        theirs = reference(decode_rgb(data))
        assert ours.size == (48, 48) and ours.mode == "RGB"
        assert np.array_equal(np.asarray(ours), np.asarray(theirs))


def test_full_pretrain_view_matches_the_torchvision_reference_pipeline() -> None:
    """RRC(0.2-1, bicubic) + flip + ToTensor + Normalize, the MILAN recipe, with the same random draws."""
    data = photo_like_jpeg(120, 90)
    reference = T.Compose(
        [
            T.RandomResizedCrop(32, scale=(0.2, 1.0), interpolation=T.InterpolationMode.BICUBIC),
            T.RandomHorizontalFlip(),
            T.ToTensor(),
            T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )
    ours = pretrain_transform(32, draft=False)
    for seed in range(4):
        torch.manual_seed(seed)
        a = ours(open_image(data))
        torch.manual_seed(seed)
        b = reference(decode_rgb(data))
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


def test_eval_view_is_resize_256_center_crop_224_bicubic() -> None:
    data = photo_like_jpeg(400, 300)
    reference = T.Compose(
        [
            T.Resize(256, interpolation=T.InterpolationMode.BICUBIC),
            T.CenterCrop(224),
            T.ToTensor(),
            T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )
    ours = eval_transform(224)(open_image(data))
    assert ours.shape == (3, 224, 224)
    torch.testing.assert_close(ours, reference(decode_rgb(data)), atol=1e-6, rtol=0)


def test_draft_never_decodes_the_crop_below_the_output_size(monkeypatch: pytest.MonkeyPatch) -> None:
    data = photo_like_jpeg()
    real_draft_to = transforms_module.draft_to
    calls: list[tuple[tuple[int, int], tuple[int, int], int]] = []

    def recording_draft_to(img: Image.Image, min_width: int, min_height: int) -> int:
        before = img.size
        s = real_draft_to(img, min_width, min_height)
        calls.append((before, img.size, s))
        return s

    real_get_params = T.RandomResizedCrop.get_params  # the class milan.data.transforms draws crops with
    crops: list[tuple[int, int, int, int]] = []

    def recording_get_params(img: Image.Image, scale: list[float], ratio: list[float]) -> tuple[int, int, int, int]:
        params: tuple[int, int, int, int] = real_get_params(img, scale, ratio)
        crops.append(params)
        return params

    monkeypatch.setattr(transforms_module, "draft_to", recording_draft_to)
    monkeypatch.setattr(T.RandomResizedCrop, "get_params", staticmethod(recording_get_params))
    for out in (16, 32, 64, 224):
        for seed in range(25):
            torch.manual_seed(seed)
            result = RandomResizedCropDecode(out, draft=True)(open_image(data))
            assert result.size == (out, out)
    assert len(calls) == len(crops) == 100
    sizes = [16] * 25 + [32] * 25 + [64] * 25 + [224] * 25
    for (full, drafted, s), (_, _, h, w), out in zip(calls, crops, sizes, strict=True):
        assert s in (1, 2, 4, 8)
        assert drafted == (math.ceil(full[0] / s), math.ceil(full[1] / s))
        # Reduced only if the crop still has >= out pixels per side (a crop smaller than out is never reduced).
        assert s == 1 or (w / s >= out and h / s >= out), (full, s, h, w, out)
    used = [s for _, _, s in calls]
    assert max(used) >= 4  # the draft path is really exercised ...
    assert all(s == 1 for s, out in zip(used, sizes, strict=True) if out == 224)  # ... and declined when needed


@pytest.mark.parametrize("out", [32, 64])
def test_draft_output_is_close_to_the_full_decode(out: int) -> None:
    data = photo_like_jpeg()
    mean_abs, psnr = [], []
    for seed in range(20):
        torch.manual_seed(seed)
        drafted = np.asarray(RandomResizedCropDecode(out, draft=True)(open_image(data)), dtype=np.float64)
        torch.manual_seed(seed)
        full = np.asarray(RandomResizedCropDecode(out, draft=False)(open_image(data)), dtype=np.float64)
        err = drafted - full
        mean_abs.append(np.abs(err).mean())
        psnr.append(10 * np.log10(255**2 / max((err**2).mean(), 1e-12)))
    # Measured: mean |diff| < 1 grey level, PSNR > 48 dB. A misplaced crop box gives > 10 levels.
    assert max(mean_abs) < 2.5 and min(psnr) > 35, (max(mean_abs), min(psnr))


def test_draft_is_ignored_for_non_jpeg_and_eval_draft_keeps_the_short_side() -> None:
    png = encode(Image.new("RGB", (400, 300), (1, 2, 3)), "PNG")
    img = open_image(png)
    assert transforms_module.draft_to(img, 10, 10) == 1 and img.size == (400, 300)
    jpg = photo_like_jpeg(1000, 600)
    decode = transforms_module.ResizeDecode(64, draft=True)
    assert min(decode(open_image(jpg)).size) >= 64
    assert decode(open_image(jpg)).size == (125, 75)  # 1/8: 600 / 8 = 75 >= 64
    out = eval_transform(56, draft=True)(open_image(jpg))
    full = eval_transform(56, draft=False)(open_image(jpg))
    assert out.shape == full.shape == (3, 56, 56)
    assert (out - full).abs().mean() < 0.1  # normalised units


def test_invalid_arguments_are_rejected() -> None:
    with pytest.raises(ValueError, match="scale"):
        RandomResizedCropDecode(32, scale=(0.5, 0.2))
    with pytest.raises(ValueError, match="crop_pct"):
        eval_transform(32, crop_pct=1.5)
