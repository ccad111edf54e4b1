"""Image pipelines: a *decode* stage (Pillow, may use JPEG draft mode) followed by a torchvision *transform*.

The MILAN pretraining view (ORIG and mmpretrain alike) is ``RandomResizedCrop(224, scale=(0.2, 1.0), bicubic)``
+ ``RandomHorizontalFlip`` + ``ToTensor`` + ImageNet ``Normalize``; evaluation is ``Resize(256, bicubic)`` +
``CenterCrop(224)`` + ``Normalize`` (crop_pct 0.875).

Crop geometry (:data:`CropGeometry`). Two rules draw the random resized crop's box from the same ``scale`` and
``ratio`` ranges:

* ``"torchvision"``: :meth:`torchvision.transforms.RandomResizedCrop.get_params`: up to ten draws of (area,
  log-aspect) until the box fits inside the image, then a centre crop of the whole image clamped to the ratio
  range. MILAN pretraining (ORIG ``main_pretrain.py``, MMSelfSup, mmpretrain) and mmpretrain's linear probe.
* ``"byol"``: the original MILAN linear probe's crop (ORIG ``util/crop.py``, MAE's TF/BYOL-style crop): **one**
  draw of area and log-aspect, width and height rounded and then each clamped to the image, the box placed
  uniformly; no retries, no centre-crop fallback (:func:`byol_crop_box`). Clamping makes large crops more common
  than with torchvision's retries (a 500x375 image: mean crop area 0.52 of the image instead of 0.43).

JPEG draft mode (``draft=True``; off by default: neither reference uses it). libjpeg can decode at 1/2, 1/4 or
1/8 scale almost for free (it skips the high-frequency DCT coefficients), which makes decoding large photos
several times faster. For a random resized crop the crop box is drawn first from the header size (with the same
random draws as without draft), then the largest draft scale ``s`` is chosen with ``crop_w / s >= out_w`` and
``crop_h / s >= out_h``: the crop is never decoded at fewer pixels than the output needs, so draft only removes
detail that the bicubic down-sampling would mostly have removed anyway; the pixels still differ slightly (libjpeg's
scaled IDCT is not a bicubic filter; ``benchmarks/data.py`` measures how much and how often). Without draft (or
when ``s == 1``) the result is exactly ``torchvision.transforms.functional.resized_crop`` of the fully decoded
image.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal, TypeAlias, cast

import torch
from PIL import Image
from torchvision.transforms import InterpolationMode, v2
from torchvision.transforms import RandomResizedCrop as _RandomResizedCrop
from torchvision.transforms import functional as TF

from milan.data.decode import load_rgb
from milan.models.teacher import IMAGENET_MEAN, IMAGENET_STD

Interpolation: TypeAlias = "str | InterpolationMode"
"""A torchvision interpolation mode or its name (``"bicubic"``, ``"bilinear"``, ...)."""

DEFAULT_CROP_PCT = 0.875  # eval: Resize(img_size / 0.875) then CenterCrop(img_size), i.e. 256 -> 224

CropGeometry: TypeAlias = Literal["torchvision", "byol"]
"""How a random resized crop's box is drawn (see the module docstring)."""

CROP_GEOMETRIES: tuple[CropGeometry, ...] = ("torchvision", "byol")


def _interpolation(mode: Interpolation) -> InterpolationMode:
    return mode if isinstance(mode, InterpolationMode) else InterpolationMode(mode.lower())


def _pair(size: int | Sequence[int]) -> tuple[int, int]:
    """``(height, width)`` from an int or a pair, torchvision's convention."""
    if isinstance(size, int):
        return size, size
    if len(size) != 2:
        raise ValueError(f"size must be an int or (height, width), got {size!r}")
    return int(size[0]), int(size[1])


def draft_to(img: Image.Image, min_width: int, min_height: int) -> int:
    """Asks libjpeg to decode at the largest power-of-two reduction that keeps at least the given full size.

    Pillow picks ``s`` in {1, 2, 4, 8} with ``width // min_width >= s`` and ``height // min_height >= s``, so
    the drafted image is at least ``min_width x min_height``. Only JPEG (and MPO) images are affected, and only
    before their pixels are loaded.

    Args:
        img: An opened, not yet loaded image.
        min_width: Smallest acceptable width of the whole drafted image.
        min_height: Smallest acceptable height of the whole drafted image.

    Returns:
        The reduction factor ``s``; image coordinates map to drafted ones as ``x / s``.
    """
    width, height = img.size
    if min_width >= width or min_height >= height or img.format not in ("JPEG", "MPO"):
        return 1
    result = img.draft(None, (max(1, min_width), max(1, min_height)))
    if result is None:  # not supported for this file (e.g. already loaded)
        return 1
    _, box = result
    return round(width / box[2])


def byol_crop_box(width: int, height: int, scale: Sequence[float], ratio: Sequence[float]) -> tuple[int, int, int, int]:
    """The original MILAN linear probe's crop box (ORIG ``util/crop.py``): one draw, clamped, no retries.

    The area fraction is uniform in ``scale`` and the aspect ratio (width / height) log-uniform in ``ratio``;
    ``w = round(sqrt(area * aspect))`` and ``h = round(sqrt(area / aspect))`` are each clamped to the image (so a
    clamped box is less elongated and smaller than drawn), then the box is placed uniformly. The random draws
    come from the global ``torch`` generator in the original's order and precision (area, log-aspect in float32,
    top, left), so the same seed gives the original's boxes. Unlike the original, a side that rounds to 0
    (images of a few pixels) becomes 1.

    Args:
        width: Image width.
        height: Image height.
        scale: ``(min, max)`` area fraction.
        ratio: ``(min, max)`` aspect ratio.

    Returns:
        ``(top, left, height, width)`` of the box, as :meth:`torchvision.transforms.RandomResizedCrop.get_params`.
    """
    area = width * height
    target_area = area * torch.empty(1).uniform_(scale[0], scale[1]).item()
    log_lo, log_hi = torch.log(torch.tensor([float(ratio[0]), float(ratio[1])])).tolist()  # float32, as the original
    aspect = torch.exp(torch.empty(1).uniform_(log_lo, log_hi)).item()
    w = min(max(1, round(math.sqrt(target_area * aspect))), width)
    h = min(max(1, round(math.sqrt(target_area / aspect))), height)
    top = int(torch.randint(0, height - h + 1, size=(1,)).item())
    left = int(torch.randint(0, width - w + 1, size=(1,)).item())
    return top, left, h, w


def crop_box(
    img: Image.Image, scale: Sequence[float], ratio: Sequence[float], geometry: CropGeometry = "torchvision"
) -> tuple[int, int, int, int]:
    """A random resized crop's ``(top, left, height, width)`` for ``img`` (only its size is used) by ``geometry``."""
    if geometry == "byol":
        width, height = img.size
        return byol_crop_box(width, height, scale, ratio)
    if geometry != "torchvision":
        raise ValueError(f"crop geometry must be one of {', '.join(CROP_GEOMETRIES)}, got {geometry!r}")
    top, left, height, width = _RandomResizedCrop.get_params(img, list(scale), list(ratio))
    return top, left, height, width


@dataclass(frozen=True)
class ImagePipeline:
    """Decode stage plus tensor transform; the datasets call ``transform(decode(opened_image))``.

    Attributes:
        transform: RGB Pillow image -> ``(3, H, W)`` float tensor (any torchvision transform).
        decode: Opened, not yet loaded image -> RGB image. It must decode through
            :func:`milan.data.decode.load_rgb` so that damaged pixel data is reported, not raised. The default
            decodes the whole image; :class:`RandomResizedCropDecode` and :class:`ResizeDecode` may use draft.
    """

    transform: Callable[[Image.Image], torch.Tensor]
    decode: Callable[[Image.Image], Image.Image] = load_rgb

    def __call__(self, img: Image.Image) -> torch.Tensor:
        """Decodes and transforms an opened image into a ``(3, H, W)`` tensor."""
        return self.transform(self.decode(img))


class RandomResizedCropDecode:
    """Decode stage of the training views: a random resized crop (either geometry), optionally through draft.

    Args:
        size: Output size, an int (square) or ``(height, width)``.
        scale: Range of the crop area as a fraction of the image area.
        ratio: Range of the crop aspect ratio (width / height).
        interpolation: Resampling of the crop to ``size``.
        draft: Decode JPEGs at a reduced scale when the crop allows it (see the module docstring).
        crop: How the box is drawn: ``"torchvision"`` or ``"byol"`` (see the module docstring).
    """

    def __init__(
        self,
        size: int | Sequence[int],
        *,
        scale: tuple[float, float] = (0.2, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        interpolation: Interpolation = "bicubic",
        draft: bool = False,
        crop: CropGeometry = "torchvision",
    ) -> None:
        if crop not in CROP_GEOMETRIES:
            raise ValueError(f"crop must be one of {', '.join(CROP_GEOMETRIES)}, got {crop!r}")
        if not 0 < scale[0] <= scale[1] <= 1:
            raise ValueError(f"scale must satisfy 0 < min <= max <= 1, got {scale}")
        if not 0 < ratio[0] <= ratio[1]:
            raise ValueError(f"ratio must satisfy 0 < min <= max, got {ratio}")
        self.size = _pair(size)
        self.scale = scale
        self.ratio = ratio
        self.interpolation = _interpolation(interpolation)
        self.draft = draft
        self.crop = crop

    def __call__(self, img: Image.Image) -> Image.Image:
        """Crops and resizes an opened image; returns an RGB image of ``size``."""
        # The same random draws, in the same order, as the geometry's reference (header size only).
        top, left, height, width = crop_box(img, self.scale, self.ratio, self.crop)
        out_h, out_w = self.size
        s = 1
        if self.draft:
            # Whole-image size for which the crop still covers out_w x out_h drafted pixels.
            full_w, full_h = img.size
            s = draft_to(img, math.ceil(full_w * out_w / width), math.ceil(full_h * out_h / height))
        rgb = load_rgb(img)
        if s == 1:
            out = TF.resized_crop(rgb, top, left, height, width, [out_h, out_w], self.interpolation, antialias=True)
            return cast(Image.Image, out)
        # Drafted pixel i covers original pixels [i*s, (i+1)*s): the crop box maps exactly by 1/s.
        box = (left / s, top / s, (left + width) / s, (top + height) / s)
        return rgb.resize((out_w, out_h), TF.pil_modes_mapping[self.interpolation], box=box)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(size={self.size}, scale={self.scale}, ratio={self.ratio}, "
            f"interpolation={self.interpolation.value}, draft={self.draft}, crop={self.crop})"
        )


class ResizeDecode:
    """Decode stage for evaluation: full decode, or a draft that keeps the shorter side >= ``resize_size``.

    Args:
        resize_size: The shorter side the following ``Resize`` will produce.
        draft: Allow a JPEG draft reduction (off by default for evaluation, which should be exact).
    """

    def __init__(self, resize_size: int, *, draft: bool = False) -> None:
        self.resize_size = resize_size
        self.draft = draft

    def __call__(self, img: Image.Image) -> Image.Image:
        """Decodes an opened image to RGB, at a reduced scale when allowed."""
        if self.draft:
            width, height = img.size
            short = min(width, height)
            draft_to(img, math.ceil(width * self.resize_size / short), math.ceil(height * self.resize_size / short))
        return load_rgb(img)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(resize_size={self.resize_size}, draft={self.draft})"


def to_normalized_tensor(
    mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD
) -> list[Callable[..., object]]:
    """The common tail: PIL -> float tensor in [0, 1] (``ToTensor``) -> ``Normalize(mean, std)`` -> plain tensor.

    Args:
        mean: Per-channel mean, RGB.
        std: Per-channel standard deviation, RGB.

    Returns:
        torchvision v2 transforms, to be placed at the end of a ``v2.Compose``.
    """
    return [
        v2.ToImage(),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(mean=list(mean), std=list(std)),
        v2.ToPureTensor(),
    ]


def pretrain_transform(
    img_size: int = 224,
    *,
    scale: tuple[float, float] = (0.2, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    interpolation: Interpolation = "bicubic",
    hflip: float = 0.5,
    draft: bool = False,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    crop: CropGeometry = "torchvision",
) -> ImagePipeline:
    """The MILAN/MAE pretraining view: RandomResizedCrop + RandomHorizontalFlip + ToTensor + Normalize.

    Also the linear probe's training view (with ``scale=(0.08, 1.0)`` and, for the original's, ``crop="byol"``).

    Args:
        img_size: Output side length.
        scale: RandomResizedCrop area range (MILAN: ``(0.2, 1.0)``; supervised/linear-probe recipes: 0.08).
        ratio: RandomResizedCrop aspect-ratio range.
        interpolation: Crop resampling (MILAN: bicubic).
        hflip: Probability of a horizontal flip.
        draft: Use JPEG draft decoding when the crop allows it (not in the references).
        mean: Normalisation mean (ImageNet, as the references; the teacher sees the same tensor).
        std: Normalisation std.
        crop: Crop box rule (:data:`CropGeometry`).

    Returns:
        A pipeline producing ``(3, img_size, img_size)`` float tensors.

    Examples:
        >>> from PIL import Image
        >>> pipe = pretrain_transform(32)
        >>> pipe(Image.new("RGB", (50, 40))).shape
        torch.Size([3, 32, 32])
    """
    decode = RandomResizedCropDecode(
        img_size, scale=scale, ratio=ratio, interpolation=interpolation, draft=draft, crop=crop
    )
    transform = v2.Compose([v2.RandomHorizontalFlip(hflip), *to_normalized_tensor(mean, std)])
    return ImagePipeline(transform=transform, decode=decode)


def eval_transform(
    img_size: int = 224,
    *,
    crop_pct: float = DEFAULT_CROP_PCT,
    interpolation: Interpolation = "bicubic",
    draft: bool = False,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> ImagePipeline:
    """The evaluation view: Resize(shorter side to ``int(img_size / crop_pct)``) + CenterCrop + Normalize.

    Args:
        img_size: Output side length (224 -> resize to 256).
        crop_pct: Fraction of the resized shorter side kept by the center crop.
        interpolation: Resize resampling (MILAN/MAE fine-tuning: bicubic).
        draft: Allow a JPEG draft reduction that keeps the shorter side >= the resize size.
        mean: Normalisation mean.
        std: Normalisation std.

    Returns:
        A pipeline producing ``(3, img_size, img_size)`` float tensors.
    """
    if not 0 < crop_pct <= 1:
        raise ValueError(f"crop_pct must be in (0, 1], got {crop_pct}")
    resize_size = int(img_size / crop_pct)
    transform = v2.Compose(
        [
            v2.Resize(resize_size, interpolation=_interpolation(interpolation), antialias=True),
            v2.CenterCrop(img_size),
            *to_normalized_tensor(mean, std),
        ]
    )
    return ImagePipeline(transform=transform, decode=ResizeDecode(resize_size, draft=draft))
