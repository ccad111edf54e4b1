"""CPU image views: a *decode* stage (Pillow, may use JPEG draft mode) followed by a torchvision *transform*.

The MILAN pretraining view (ORIG and mmpretrain alike) is ``RandomResizedCrop(224, scale=(0.2, 1.0), bicubic)`` +
``RandomHorizontalFlip`` + ``ToTensor`` + ImageNet ``Normalize``; evaluation is ``Resize(256, bicubic)`` +
``CenterCrop(224)`` + ``Normalize`` (crop_pct 0.875); the linear probe trains on the pretraining view with
``scale=(0.08, 1)``, fine-tuning on timm's RandAugment view (:func:`finetune_transform`).

Crop geometry (:data:`CropGeometry`), two rules drawing the box from the same ``scale`` and ``ratio`` ranges:

* ``"torchvision"``: ``RandomResizedCrop.get_params``: up to ten draws of (area, log-aspect) until the box fits,
  then a centre crop clamped to the ratio range. MILAN pretraining (ORIG, MMSelfSup, mmpretrain) and mmpretrain's
  linear probe.
* ``"byol"``: the original MILAN linear probe's crop (ORIG ``util/crop.py``, MAE's TF/BYOL-style crop): **one**
  draw, width and height rounded and each clamped to the image, the box placed uniformly (:func:`byol_crop_box`).
  Clamping makes large crops more common (a 500x375 image: mean crop area 0.52 of the image instead of 0.43).

JPEG draft mode (``draft=True``; off by default: neither reference uses it). libjpeg decodes at 1/2, 1/4 or 1/8 scale
almost for free, which makes decoding large photos several times faster. The crop box is drawn first from the header
size (the same random draws as without draft), then the largest scale ``s`` with ``crop_w / s >= out_w`` and
``crop_h / s >= out_h`` is chosen: the crop is never decoded at fewer pixels than the output needs, so draft only
removes detail the bicubic down-sampling would mostly remove anyway; the pixels still differ slightly (libjpeg's
scaled IDCT is not a bicubic filter; ``benchmarks/data.py`` measures it). Without draft (or ``s == 1``) the result is
exactly ``torchvision.transforms.functional.resized_crop`` of the fully decoded image.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, TypeAlias, cast

import torch
from PIL import Image, ImageOps
from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torchvision.transforms import InterpolationMode, v2
from torchvision.transforms import RandomResizedCrop as _RandomResizedCrop
from torchvision.transforms import functional as TF

from milan.data.decode import load_rgb

Interpolation: TypeAlias = "str | InterpolationMode"  # a torchvision mode or its name ("bicubic", "bilinear")

DEFAULT_CROP_PCT = 0.875  # eval: Resize(img_size / 0.875) then CenterCrop(img_size), i.e. 256 -> 224

CropGeometry: TypeAlias = Literal["torchvision", "byol"]
CROP_GEOMETRIES: tuple[CropGeometry, ...] = ("torchvision", "byol")


def _interpolation(mode: Interpolation) -> InterpolationMode:
    return mode if isinstance(mode, InterpolationMode) else InterpolationMode(mode.lower())


def draft_to(img: Image.Image, min_width: int, min_height: int) -> int:
    """Asks libjpeg to decode at the largest power-of-two reduction that keeps at least the given full size.

    Only JPEG (and MPO) images are affected, and only before their pixels are loaded.

    Returns:
        The reduction factor ``s`` in {1, 2, 4, 8}; image coordinates map to drafted ones as ``x / s``.
    """
    width, height = img.size
    if min_width >= width or min_height >= height or img.format not in ("JPEG", "MPO"):
        return 1
    result = img.draft(None, (max(1, min_width), max(1, min_height)))
    if result is None:  # not supported for this file (e.g. already loaded)
        return 1
    return round(width / result[1][2])


def byol_crop_box(width: int, height: int, scale: Sequence[float], ratio: Sequence[float]) -> tuple[int, int, int, int]:
    """The original MILAN linear probe's crop box (ORIG ``util/crop.py``): one draw, clamped, no retries.

    The area fraction is uniform in ``scale``, the aspect (width / height) log-uniform in ``ratio``; ``w`` and ``h``
    are rounded and each clamped to the image (a clamped box is less elongated and smaller than drawn), then the box
    is placed uniformly. The draws come from the global ``torch`` generator in the original's order and precision
    (area, log-aspect in float32, top, left): the same seed gives the original's boxes. Unlike the original, a side
    that rounds to 0 (images of a few pixels) becomes 1.

    Returns:
        ``(top, left, height, width)``, as ``RandomResizedCrop.get_params``.
    """
    target_area = width * height * torch.empty(1).uniform_(scale[0], scale[1]).item()
    log_lo, log_hi = torch.log(torch.tensor([float(ratio[0]), float(ratio[1])])).tolist()  # float32, as the original
    aspect = torch.exp(torch.empty(1).uniform_(log_lo, log_hi)).item()
    w = min(max(1, round(math.sqrt(target_area * aspect))), width)
    h = min(max(1, round(math.sqrt(target_area / aspect))), height)
    top = int(torch.randint(0, height - h + 1, size=(1,)).item())
    left = int(torch.randint(0, width - w + 1, size=(1,)).item())
    return top, left, h, w


def crop_box(
    width: int, height: int, scale: Sequence[float], ratio: Sequence[float], geometry: CropGeometry = "torchvision"
) -> tuple[int, int, int, int]:
    """A random resized crop's ``(top, left, height, width)`` in an image of this size: the CPU and device views'."""
    if geometry == "byol":
        return byol_crop_box(width, height, scale, ratio)
    if geometry != "torchvision":
        raise ValueError(f"crop geometry must be one of {', '.join(CROP_GEOMETRIES)}, got {geometry!r}")
    top, left, h, w = _RandomResizedCrop.get_params(torch.empty(0, height, width), list(scale), list(ratio))
    return top, left, h, w


@dataclass(frozen=True)
class ImagePipeline:
    """Decode stage plus tensor transform: ``transform(decode(opened_image))`` -> ``(3, H, W)`` float tensor.

    ``decode`` must decode through :func:`milan.data.decode.load_rgb`, so that damaged pixel data is reported, not
    raised; the default decodes the whole image, :class:`RandomResizedCropDecode` and :class:`ResizeDecode` may draft.
    """

    transform: Callable[[Image.Image], torch.Tensor]
    decode: Callable[[Image.Image], Image.Image] = load_rgb

    def __call__(self, img: Image.Image) -> torch.Tensor:
        return self.transform(self.decode(img))


@dataclass(frozen=True)
class RandomResizedCropDecode:
    """Decode stage of the training views: a random resized crop of either geometry, optionally through draft.

    Attributes:
        size: Output size, an int (square) or ``(height, width)``.
        scale: Range of the crop area as a fraction of the image area.
        ratio: Range of the crop aspect ratio (width / height).
        interpolation: Resampling of the crop to ``size``.
        draft: Decode JPEGs at a reduced scale when the crop allows it.
        crop: How the box is drawn (:data:`CropGeometry`).
    """

    size: int | Sequence[int]
    scale: tuple[float, float] = (0.2, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    interpolation: Interpolation = "bicubic"
    draft: bool = False
    crop: CropGeometry = "torchvision"

    def __post_init__(self) -> None:
        _interpolation(self.interpolation)  # an unknown mode fails here, not in a loader worker
        if self.crop not in CROP_GEOMETRIES:
            raise ValueError(f"crop must be one of {', '.join(CROP_GEOMETRIES)}, got {self.crop!r}")
        if not 0 < self.scale[0] <= self.scale[1] <= 1:
            raise ValueError(f"scale must satisfy 0 < min <= max <= 1, got {self.scale}")
        if not 0 < self.ratio[0] <= self.ratio[1]:
            raise ValueError(f"ratio must satisfy 0 < min <= max, got {self.ratio}")

    def __call__(self, img: Image.Image) -> Image.Image:
        # The same random draws, in the same order, as the geometry's reference (header size only).
        top, left, height, width = crop_box(*img.size, self.scale, self.ratio, self.crop)
        out_h, out_w = (self.size, self.size) if isinstance(self.size, int) else self.size
        mode = _interpolation(self.interpolation)
        s = 1
        if self.draft:  # the whole-image size for which the crop still covers out_w x out_h drafted pixels
            full_w, full_h = img.size
            s = draft_to(img, math.ceil(full_w * out_w / width), math.ceil(full_h * out_h / height))
        rgb = load_rgb(img)
        if s == 1:
            out = TF.resized_crop(rgb, top, left, height, width, [out_h, out_w], mode, antialias=True)
            return cast(Image.Image, out)
        # Drafted pixel i covers original pixels [i*s, (i+1)*s): the crop box maps exactly by 1/s.
        box = (left / s, top / s, (left + width) / s, (top + height) / s)
        return rgb.resize((out_w, out_h), TF.pil_modes_mapping[mode], box=box)


@dataclass(frozen=True)
class ResizeDecode:
    """Decode stage for evaluation: full decode, or (``draft``) a JPEG draft keeping the short side >= the resize."""

    resize_size: int
    draft: bool = False

    def __call__(self, img: Image.Image) -> Image.Image:
        if self.draft:
            width, height = img.size
            short = min(width, height)
            draft_to(img, math.ceil(width * self.resize_size / short), math.ceil(height * self.resize_size / short))
        return load_rgb(img)


def _to_tensor(mean: Sequence[float], std: Sequence[float]) -> list[Callable[..., object]]:
    """The common tail: PIL -> float tensor in [0, 1] -> ``Normalize(mean, std)`` -> plain tensor."""
    return [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std)), v2.ToPureTensor()]


def pretrain_transform(
    img_size: int = 224,
    *,
    scale: tuple[float, float] = (0.2, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    interpolation: Interpolation = "bicubic",
    hflip: float = 0.5,
    draft: bool = False,
    mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
    std: Sequence[float] = IMAGENET_DEFAULT_STD,
    crop: CropGeometry = "torchvision",
) -> ImagePipeline:
    """The MILAN/MAE pretraining view: RandomResizedCrop + RandomHorizontalFlip + ToTensor + Normalize.

    Also the linear probe's training view (``scale=(0.08, 1.0)`` and, for the original's, ``crop="byol"``).

    Examples:
        >>> from PIL import Image
        >>> pretrain_transform(32)(Image.new("RGB", (50, 40))).shape
        torch.Size([3, 32, 32])
    """
    decode = RandomResizedCropDecode(
        img_size, scale=scale, ratio=ratio, interpolation=interpolation, draft=draft, crop=crop
    )
    return ImagePipeline(v2.Compose([v2.RandomHorizontalFlip(hflip), *_to_tensor(mean, std)]), decode)


def eval_transform(
    img_size: int = 224,
    *,
    crop_pct: float = DEFAULT_CROP_PCT,
    interpolation: Interpolation = "bicubic",
    draft: bool = False,
    mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
    std: Sequence[float] = IMAGENET_DEFAULT_STD,
) -> ImagePipeline:
    """The evaluation view: Resize(shorter side to ``int(img_size / crop_pct)``) + CenterCrop + Normalize."""
    if not 0 < crop_pct <= 1:
        raise ValueError(f"crop_pct must be in (0, 1], got {crop_pct}")
    resize_size = int(img_size / crop_pct)
    resize = v2.Resize(resize_size, interpolation=_interpolation(interpolation), antialias=True)
    transform = v2.Compose([resize, v2.CenterCrop(img_size), *_to_tensor(mean, std)])
    return ImagePipeline(transform, ResizeDecode(resize_size, draft=draft))


def finetune_transform(
    img_size: int,
    *,
    scale: tuple[float, float] = (0.08, 1.0),
    hflip: float = 0.5,
    interpolation: str = "bicubic",
    auto_augment: str | None = "rand-m9-mstd0.5-inc1",
    color_jitter: float | None = None,
    re_prob: float = 0.25,
    re_mode: str = "pixel",
    re_count: int = 1,
) -> ImagePipeline:
    """The fine-tuning view: timm's ``create_transform(is_training=True)``, as ORIG ``util/datasets.py``.

    Bicubic RandomResizedCrop (``scale``), flip, RandAugment ``auto_augment`` (colour jitter off, as timm does when
    a policy is set), ImageNet normalisation, then RandomErasing (``re_prob``, per-pixel noise, ``re_count`` boxes).
    """
    from timm.data.auto_augment import AugmentOp
    from timm.data.transforms_factory import create_transform

    transform = create_transform(
        input_size=img_size, is_training=True, scale=scale, hflip=hflip, color_jitter=cast(Any, color_jitter),
        auto_augment=auto_augment, interpolation=interpolation, mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD,
        re_prob=re_prob, re_mode=re_mode, re_count=re_count,
    )  # fmt: skip
    for t in getattr(transform, "transforms", []):  # RandAugment/AutoAugment: Pillow-safe posterize
        for op in getattr(t, "ops", []):
            if isinstance(op, AugmentOp) and op.name.startswith("Posterize"):
                op.aug_fn = posterize
    return ImagePipeline(transform=transform)


def posterize(img: Image.Image, bits_to_keep: int, **_: Any) -> Image.Image:
    """Posterize that keeps Pillow < 11's black image for 0 bits instead of raising.

    timm's ``PosterizeIncreasing`` maps magnitude 10 to 0 bits, which ``rand-m9-mstd0.5`` reaches; recent Pillow's
    ``ImageOps.posterize`` raises ``ValueError`` for ``bits < 1`` (older Pillow returned the black image the reference
    runs saw).
    """
    if bits_to_keep >= 8:
        return img
    if bits_to_keep <= 0:
        return Image.new(img.mode, img.size)  # all zeros: mask ~(2**8 - 1) keeps no bit
    return ImageOps.posterize(img, bits_to_keep)
