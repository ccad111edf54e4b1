"""``milan visualize``: what a MILAN model sees, hides and predicts, one row per image.

Columns of the grid:

1. the input (after the evaluation transform at the model's image size);
2. the teacher's CLS-to-patch attention (the masking importance), min-max scaled per image, upsampled and
   overlaid on the input (the peak, as a multiple of uniform attention, is written underneath);
3. the sampled mask: visible patches as they are, masked patches greyed out;
4. the per-patch cosine similarity between the prediction and the target (visible patches outlined), with the
   mean over masked and over visible patches underneath;
5. and 6. the target and the predicted patch features mapped to RGB by one PCA basis (fitted on the
   L2-normalised target features of every image in the grid), so equal colours mean similar directions.

A pixel-target model (the MAE ablation, no teacher) shows its reconstruction instead of the PCA views: the
predicted patches (un-normalised with each target patch's own mean and variance, as MAE's ``norm_pix`` figure
does), and the same with the visible patches pasted back.

Library use: :func:`compute_views` runs the model, :func:`render` draws the grid. A ``milan segment`` checkpoint
gets image / ground truth / prediction rows instead (:func:`milan.jobs.segment_viz.visualize_segmentation`).
"""

from __future__ import annotations

import argparse
import functools
import os
import typing
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from milan.checkpoint.segmenter import segmentation_spec
from milan.data import eval_transform
from milan.errors import CheckpointError, CheckpointNotFoundError, ConfigError
from milan.jobs.launch import print_warnings
from milan.jobs.plot import pyplot, read_images, save_figure
from milan.jobs.segment_viz import visualize_segmentation
from milan.losses import normalize_patches
from milan.models.milan import MILAN, Masking, patchify

COMMANDS = {"visualize": "teacher attention, mask, prediction/target similarity, PCA views"}

CELL_INCHES = 2.2  # side of one panel
DPI = 100
COLUMNS = (
    "input",
    "teacher CLS attention",
    "visible / masked patches",
    "cos(prediction, target)",
    "target features (PCA)",
    "predicted features (PCA)",
)
PIXEL_COLUMNS = (*COLUMNS[:4], "predicted pixels", "reconstruction + visible")


@dataclass
class Views:
    """Everything one grid shows, for B images of L patches (CPU tensors, patches in spatial order)."""

    images: torch.Tensor  # (B, 3, H, W) display images in [0, 1]
    importance: torch.Tensor | None  # (B, L) the teacher's CLS attention; None for pixel targets (no teacher)
    mask: torch.Tensor  # (B, L) 1 = masked, 0 = visible
    cosine: torch.Tensor  # (B, L) cosine similarity of prediction and target
    target: torch.Tensor  # (B, L, D) teacher features, or per-patch normalised pixels
    pred: torch.Tensor  # (B, L, D)
    grid: tuple[int, int]  # patch rows, columns
    patch_size: int
    masking: str
    mask_ratio: float
    loss: float  # the model's loss on this batch with this mask

    @property
    def pixel_targets(self) -> bool:
        """The model predicts pixels (it has no teacher)."""
        return self.importance is None

    def caption(self) -> str:
        """The grid's default title: the mask drawn, the loss and what the PCA views were fitted on."""
        pca = "" if self.pixel_targets else "; PCA basis fitted on the targets"
        return f"{self.masking} masking, ratio {self.mask_ratio:g}; loss {self.loss:.4f}{pca}"

    def mean_cosine(self, index: int, masked: bool) -> float:
        """Mean cosine similarity of image ``index`` over its masked (or visible) patches."""
        keep = self.mask[index] == (1.0 if masked else 0.0)
        return float(self.cosine[index][keep].mean()) if bool(keep.any()) else float("nan")


def denormalize(images: torch.Tensor) -> torch.Tensor:
    """ImageNet-normalised (B, 3, H, W) -> display images in [0, 1]."""
    mean = images.new_tensor(IMAGENET_DEFAULT_MEAN).view(1, 3, 1, 1)
    std = images.new_tensor(IMAGENET_DEFAULT_STD).view(1, 3, 1, 1)
    return (images * std + mean).clamp(0.0, 1.0)


@torch.no_grad()
def compute_views(
    model: MILAN,
    images: torch.Tensor,
    *,
    generator: torch.Generator | None = None,
    mask_ratio: float | None = None,
    masking: Masking | None = None,
) -> Views:
    """Runs the model once on (B, 3, H, W) ImageNet-normalised images and collects what the grid shows.

    ``generator`` (on the images' device) draws the mask; ``mask_ratio`` and ``masking`` override the model's.

    Raises:
        ConfigError: Attention masking asked of a model without a teacher, or images of the wrong size.
    """
    encoder = model.encoder
    gh, gw = encoder.grid_size
    size = (gh * encoder.patch_size, gw * encoder.patch_size)
    if images.ndim != 4 or tuple(images.shape[-2:]) != size:
        raise ConfigError(f"images must be (B, 3, {size[0]}, {size[1]}) for this model, got {tuple(images.shape)}")
    masking = masking or model.masking
    if masking == "attention" and model.teacher is None:
        raise ConfigError("attention masking needs a teacher; this model predicts pixels: use masking='random'")
    saved = (model.mask_ratio, model.masking, model.training)
    mask_ratio = mask_ratio if mask_ratio is not None else model.mask_ratio
    model.mask_ratio, model.masking = mask_ratio, masking
    model.eval()
    try:
        noise = torch.rand(images.shape[0], encoder.num_patches, generator=generator, device=images.device)
        out = model(images, noise=noise)
    finally:
        model.mask_ratio, model.masking = saved[0], saved[1]
        model.train(saved[2])
    pred = out.pred[:, 1:].float()  # (B, L, D) spatial order, cls dropped
    target = out.target[:, 1:].float()  # (B, L, D)
    if out.importance is None:  # pixel targets: the loss's per-patch normalised ones
        target = normalize_patches(target)
    return Views(
        images=denormalize(images.float()).cpu(),
        importance=out.importance.float().cpu() if out.importance is not None else None,
        mask=out.mask.binary_mask().cpu(),
        cosine=F.cosine_similarity(pred, target, dim=-1).cpu(),  # (B, L)
        target=target.cpu(),
        pred=pred.cpu(),
        grid=(gh, gw),
        patch_size=encoder.patch_size,
        masking=masking,
        mask_ratio=mask_ratio,
        loss=float(out.loss),
    )


def pca_rgb(target: torch.Tensor, pred: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Maps (B, L, D) target and predicted features to (B, L, 3) colours in [0, 1] with one PCA basis of the targets.

    Each token is L2-normalised first (the MILAN loss compares directions only). The three leading
    principal directions of the targets (all images together) are the colour axes; each axis is scaled so that the
    targets' 1st-99th percentiles span [0, 1], and the same scaling is applied to the predictions.
    """
    if target.shape != pred.shape:
        raise ValueError(f"target {tuple(target.shape)} and prediction {tuple(pred.shape)} differ in shape")
    b, n, d = target.shape
    t = F.normalize(target.reshape(b * n, d).double(), dim=1)
    p = F.normalize(pred.reshape(b * n, d).double(), dim=1)
    mean = t.mean(dim=0, keepdim=True)
    _, _, vh = torch.linalg.svd(t - mean, full_matrices=False)  # rows of vh: principal directions
    k = min(3, vh.shape[0])
    basis = vh[:k].T  # (D, k)
    tp, pp = (t - mean) @ basis, (p - mean) @ basis  # (N, k)
    if k < 3:
        tp, pp = F.pad(tp, (0, 3 - k)), F.pad(pp, (0, 3 - k))
    lo, hi = torch.quantile(tp, 0.01, dim=0), torch.quantile(tp, 0.99, dim=0)
    scale = (hi - lo).clamp_min(1e-8)
    t_rgb = ((tp - lo) / scale).clamp(0, 1).float().reshape(b, n, 3)
    p_rgb = ((pp - lo) / scale).clamp(0, 1).float().reshape(b, n, 3)
    return t_rgb, p_rgb


def unpatchify(patches: torch.Tensor, grid: tuple[int, int], patch_size: int) -> torch.Tensor:
    """(B, L, p * p * 3) patches (pixels ordered (p, p, C), as :func:`milan.models.milan.patchify`) -> (B, 3, H, W)."""
    b = patches.shape[0]
    gh, gw = grid
    x = patches.reshape(b, gh, gw, patch_size, patch_size, 3)
    return x.permute(0, 5, 1, 3, 2, 4).reshape(b, 3, gh * patch_size, gw * patch_size)


def reconstruction(views: Views, normalized_images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixel-target models: (B, 3, H, W) predicted images in [0, 1], and the same with the visible patches pasted back.

    The prediction is per-patch normalised; it is mapped back with the mean and standard deviation of each patch of
    the (ImageNet-normalised) input (MAE's visualisation), then to display range.
    """
    patches = patchify(normalized_images.float(), views.patch_size)  # (B, L, P)
    mean = patches.mean(dim=-1, keepdim=True)
    std = (patches.var(dim=-1, keepdim=True) + 1.0e-6) ** 0.5
    pred = views.pred * std + mean  # (B, L, P) ImageNet-normalised pixels
    pasted = torch.where(views.mask.unsqueeze(-1) > 0, pred, patches)
    images = [denormalize(unpatchify(x, views.grid, views.patch_size)) for x in (pred, pasted)]
    return images[0], images[1]


def _patch_map(values: torch.Tensor, grid: tuple[int, int], size: tuple[int, int], mode: str) -> torch.Tensor:
    """(L,) or (L, C) per-patch values -> (H, W) or (H, W, C) image ('nearest' blocks or 'bilinear' smooth)."""
    gh, gw = grid
    x = values.reshape(gh, gw, -1).permute(2, 0, 1).unsqueeze(0).float()  # (1, C, gh, gw)
    up = F.interpolate(x, size=size, mode=mode, **({"align_corners": False} if mode == "bilinear" else {}))
    out = up[0].permute(1, 2, 0)
    return out[..., 0] if values.ndim == 1 else out


def figure_size(rows: int) -> tuple[int, int]:
    """Pixel size (width, height) of a grid with ``rows`` images."""
    return round((len(COLUMNS) * CELL_INCHES + 0.6) * DPI), round((rows * CELL_INCHES + 0.8) * DPI)


def render(
    views: Views,
    out: str | os.PathLike[str],
    *,
    names: Sequence[str] | None = None,
    title: str | None = None,
    normalized_images: torch.Tensor | None = None,
) -> Path:
    """Draws the grid (one row per image, labelled with ``names``) into a PNG of :func:`figure_size` pixels.

    ``normalized_images`` (the ImageNet-normalised inputs) are needed for a pixel-target model's reconstruction.
    """
    plt = pyplot()
    from matplotlib.patches import Rectangle

    b = views.images.shape[0]
    h, w = views.images.shape[-2:]
    p = views.patch_size
    gh, gw = views.grid
    columns = PIXEL_COLUMNS if views.pixel_targets else COLUMNS
    fig, axes = plt.subplots(
        b, len(columns), figsize=[n / DPI for n in figure_size(b)], dpi=DPI, squeeze=False, layout="constrained"
    )
    if views.pixel_targets:  # the last two columns, (B, H, W, 3) each
        if normalized_images is None:
            raise ValueError("render: pass normalized_images to draw a pixel-target model's reconstruction")
        last = [x.permute(0, 2, 3, 1) for x in reconstruction(views, normalized_images.cpu())]
    else:
        last = [
            torch.stack([_patch_map(c, views.grid, (h, w), "nearest") for c in x])
            for x in pca_rgb(views.target, views.pred)
        ]
    for i in range(b):
        img = views.images[i].permute(1, 2, 0).numpy()  # (H, W, 3)
        row = axes[i]
        row[0].imshow(img, interpolation="nearest")
        if names is not None:
            row[0].set_ylabel(names[i], fontsize=8)
        if views.importance is not None:
            imp = views.importance[i]
            lo, hi = imp.min(), imp.max()
            heat = _patch_map((imp - lo) / (hi - lo).clamp_min(1e-12), views.grid, (h, w), "bilinear").numpy()
            row[1].imshow(img, interpolation="nearest")
            row[1].imshow(heat, cmap="inferno", alpha=0.6, vmin=0.0, vmax=1.0, interpolation="bilinear")
            peak = float(hi / imp.sum().clamp_min(1e-12)) * imp.numel()  # 1.0 = uniform attention
            row[1].set_xlabel(f"min-max scaled; peak {peak:.1f}x uniform", fontsize=8)
        else:
            row[1].text(0.5, 0.5, "no teacher\n(pixel targets)", ha="center", va="center", fontsize=9)
        mask = _patch_map(views.mask[i], views.grid, (h, w), "nearest").unsqueeze(-1)  # (H, W, 1)
        greyed = views.images[i].permute(1, 2, 0) * (1 - 0.85 * mask) + 0.5 * 0.85 * mask
        row[2].imshow(greyed.numpy(), interpolation="nearest")
        row[2].set_xlabel(f"{views.masking} masking, {int(views.mask[i].sum())}/{gh * gw} masked", fontsize=8)
        cos = _patch_map(views.cosine[i], views.grid, (h, w), "nearest").numpy()
        im = row[3].imshow(cos, cmap="viridis", vmin=0.0, vmax=1.0, interpolation="nearest")
        for j in torch.nonzero(views.mask[i] == 0).flatten().tolist():  # outline the visible patches
            r, c = divmod(j, gw)
            row[3].add_patch(Rectangle((c * p - 0.5, r * p - 0.5), p, p, fill=False, edgecolor="white", lw=0.6))
        masked, visible = views.mean_cosine(i, True), views.mean_cosine(i, False)
        row[3].set_xlabel(f"masked {masked:.2f} / visible {visible:.2f}", fontsize=8)
        fig.colorbar(im, ax=row[3], fraction=0.046, pad=0.02, extend="min")
        for ax, x in zip(row[4:], last, strict=True):
            ax.imshow(x[i].numpy(), interpolation="nearest")
        for ax in row:
            ax.set_xticks([])
            ax.set_yticks([])
    for ax, name in zip(axes[0], columns, strict=True):
        ax.set_title(name, fontsize=9)
    fig.suptitle(title or views.caption(), fontsize=10)
    return save_figure(fig, out, DPI)


def load_images(
    sources: Sequence[str], img_size: int, crop_pct: float, limit: int, interpolation: str = "bicubic"
) -> tuple[torch.Tensor, list[str]]:
    """(B, 3, img_size, img_size) evaluation views of :func:`milan.jobs.plot.read_images`'s images, and their labels."""
    _, images, names = read_images(sources, limit)
    pipeline = eval_transform(img_size, crop_pct=crop_pct, interpolation=interpolation)
    return torch.stack([pipeline(image) for image in images]), names


def visualize(
    checkpoint: str | os.PathLike[str],
    images: Sequence[str],
    out: str | os.PathLike[str],
    *,
    teacher: str | None = None,
    seed: int = 0,
    mask_ratio: float | None = None,
    masking: Masking | None = None,
    crop_pct: float | None = None,
    max_images: int = 8,
    device: str | torch.device = "cpu",
    warn: Callable[[str], None] | None = None,
) -> Path:
    """Loads a pretraining checkpoint and draws the grid for some images.

    The architecture, the teacher (its image size and input normalisation included) and the view come from the
    checkpoint's model spec (:mod:`milan.checkpoint.spec`); values a foreign file lacks are assumed and reported.

    ``checkpoint``: ours, mmpretrain's or original MILAN's (:func:`milan.checkpoint.load_milan`). ``teacher``: its
    weights, when the checkpoint neither holds them nor names an existing file (e.g. the file moved), built as the
    spec describes it. ``seed`` draws the mask; ``mask_ratio``, ``masking`` and ``crop_pct`` override the
    checkpoint's; ``warn`` receives each assumption (default: :func:`warnings.warn`).

    Raises:
        CheckpointError: Unreadable checkpoint, or no teacher to be had (the message names ``--teacher``).
        ConfigError: ``masking="attention"`` for a model without a teacher.
    """
    from milan.checkpoint import load_milan, read_checkpoint, resolve_spec
    from milan.checkpoint.loaders import teacher_file

    ck = read_checkpoint(checkpoint)
    resolved = resolve_spec(ck, crop_pct=crop_pct)
    resolved.adopt(ck)  # reported here, once
    for note in resolved.assumed.values():
        (warn or functools.partial(warnings.warn, stacklevel=2))(note)  # pointing at the caller
    spec = resolved.spec
    if ck.kind != "milan" or spec.decoder is None:
        raise CheckpointError(f"{checkpoint}: a {ck.format} {ck.kind} checkpoint, not a pretraining model (no decoder)")
    pixels = spec.decoder.out_dim == spec.encoder.patch_size**2 * spec.encoder.in_chans
    recorded = teacher_file(ck)
    if teacher is None and ck.tower is None and not pixels and not (recorded and os.path.exists(recorded)):
        where = f"; the teacher file it was trained with, {recorded}, is not there" if recorded else ""
        raise CheckpointNotFoundError(
            f"{checkpoint} holds no teacher weights{where}: pass --teacher FILE (the teacher it was trained with; "
            "its architecture and image size are read from the checkpoint)"
        )
    dev = torch.device(device)
    model = load_milan(ck, teacher=teacher).to(dev).eval()
    pre = spec.preprocessing
    x, names = load_images(images, pre.img_size, pre.crop_pct, max_images, pre.interpolation)
    generator = torch.Generator(dev).manual_seed(seed)
    views = compute_views(model, x.to(dev), generator=generator, mask_ratio=mask_ratio, masking=masking)
    title = f"{Path(checkpoint).name} (mask seed {seed}): {views.caption()}"
    return render(views, out, names=names, title=title, normalized_images=x)


def add_arguments(parser: argparse.ArgumentParser, command: str) -> None:
    parser.add_argument("images", nargs="+", metavar="IMAGES", help="image files, folders, lists or builtin:samples")
    parser.add_argument(
        "--checkpoint", "-c", required=True, metavar="CKPT", help="a pretraining (or milan segment) checkpoint"
    )
    parser.add_argument("--out", "-o", required=True, metavar="FILE.png", help="output image")
    parser.add_argument(
        "--teacher", metavar="FILE", help="teacher weights, if the checkpoint holds none and its recorded file moved"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the mask draw (default 0)")
    parser.add_argument("--mask-ratio", type=float, help="override the checkpoint's mask ratio")
    parser.add_argument("--masking", choices=typing.get_args(Masking), help="override the checkpoint's masking rule")
    parser.add_argument("--crop-pct", type=float, help="eval center-crop fraction (default: the checkpoint's, 0.875)")
    parser.add_argument("--max-images", type=int, default=8, help="at most this many rows (default 8)")
    parser.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda, cuda:1 ...")


def run(args: argparse.Namespace) -> int:
    if args.max_images < 1:
        raise ConfigError(f"--max-images must be >= 1, got {args.max_images}")
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    if segmentation_spec(args.checkpoint) is not None:  # milan segment's: image / ground truth / prediction rows
        print(visualize_segmentation(args.checkpoint, args.images, args.out, max_images=args.max_images, device=device))
        return 0
    written = visualize(
        args.checkpoint, args.images, args.out, teacher=args.teacher, seed=args.seed, mask_ratio=args.mask_ratio,
        masking=args.masking, crop_pct=args.crop_pct, max_images=args.max_images, device=device,
        warn=functools.partial(print_warnings, "visualize"),
    )  # fmt: skip
    print(written)
    return 0
