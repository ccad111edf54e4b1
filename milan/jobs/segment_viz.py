"""Segmentation pictures: image, ground truth and prediction per row, and a legend of the classes that appear.

The ground truth and the prediction are drawn over the image; the prediction's label says its pixel accuracy on the
labelled pixels.

:func:`predict_labels` runs a model with an evaluation protocol, :func:`render_segmentation` draws the grid;
:func:`visualize_segmentation` (``milan visualize`` on a segmentation checkpoint) loads the model and the images and
calls both (the ground truth: :func:`milan.data.segmentation.find_label`).
"""

from __future__ import annotations

import colorsys
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from milan.checkpoint.segmenter import load_segmenter
from milan.data import DataError, ImageDecodeError
from milan.data.segmentation import EvalTransform, LabelSpec, find_label, read_label
from milan.jobs.plot import pyplot, read_images, save_figure
from milan.models.segmentation import SegmentationModel, slide_inference

CELL_INCHES = 2.6
DPI = 100
ALPHA = 0.55  # label colours over the image


def palette(num_classes: int) -> np.ndarray:
    """(K, 3) uint8 distinct colours: matplotlib's ``tab20`` order, then golden-ratio hues; the same for every run."""
    from matplotlib import colormaps

    tab = [colormaps["tab20"](i)[:3] for i in (*range(0, 20, 2), *range(1, 20, 2))]  # dark shades first
    extra = [
        colorsys.hsv_to_rgb((i * 0.618033988749895) % 1.0, 0.65 + 0.35 * (i % 2), 0.95 - 0.3 * ((i // 2) % 2))
        for i in range(max(0, num_classes - len(tab)))
    ]
    return (np.array([*tab, *extra][:num_classes]) * 255).round().astype(np.uint8).reshape(num_classes, 3)


def colorize(labels: np.ndarray, colours: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(H, W) classes (others: no class) -> ((H, W, 3) float colours, (H, W) bool mask of pixels with a class)."""
    k = colours.shape[0]
    valid = (labels >= 0) & (labels < k)
    rgb = np.zeros((*labels.shape, 3), dtype=np.float32)
    rgb[valid] = colours[labels[valid]] / 255.0
    return rgb, valid


@torch.no_grad()
def predict_labels(
    model: SegmentationModel, ev: dict[str, Any], image: Image.Image, device: torch.device
) -> np.ndarray:
    """The predicted (H, W) classes of an RGB image with an evaluation protocol.

    ``ev``: ``{"scale", "mode", "crop", "stride"}``, the ``eval`` record of a segmentation checkpoint.
    """
    x, _ = EvalTransform((int(ev["scale"][0]), int(ev["scale"][1])))(image, np.zeros((1, 1), dtype=np.int64))
    x = x[None].to(device)
    if ev["mode"] == "slide":
        logits = slide_inference(model.predict, x, model.num_classes, crop=int(ev["crop"]), stride=int(ev["stride"]))
    else:
        logits = model.predict(x)
    logits = F.interpolate(logits.float(), size=(image.height, image.width), mode="bilinear", align_corners=False)
    out: np.ndarray = logits.argmax(dim=1)[0].cpu().numpy()
    return out


def render_segmentation(
    images: Sequence[np.ndarray],
    truths: Sequence[np.ndarray | None],
    preds: Sequence[np.ndarray],
    out: str | os.PathLike[str],
    *,
    class_names: Sequence[str],
    names: Sequence[str] | None = None,
    title: str | None = None,
) -> Path:
    """Draws the grid of (H, W, 3) uint8 RGB images, (H, W) ground truths and predictions, and the legend, into a PNG.

    A ground truth is ``None`` (none found) or its classes in ``[0, K)`` (K ``class_names``; other values are ignored
    pixels); ``names`` label the rows.
    """
    plt = pyplot()
    from matplotlib.patches import Patch

    k = len(class_names)
    colours = palette(k)
    rows = len(images)
    present = sorted(set().union(*(np.unique(p).tolist() for p in preds), *(
        np.unique(t[(t >= 0) & (t < k)]).tolist() for t in truths if t is not None
    )))  # fmt: skip
    legend_rows = -(-len(present) // 4)
    fig = plt.figure(figsize=(3 * CELL_INCHES, rows * CELL_INCHES * 0.8 + 0.3 * legend_rows + 0.8), dpi=DPI)
    grid = fig.add_gridspec(rows + 1, 3, height_ratios=[*([1.0] * rows), 0.12 * max(legend_rows, 1) + 0.05])
    for i, (image, truth, pred) in enumerate(zip(images, truths, preds, strict=True)):
        base = image.astype(np.float32) / 255.0
        axes = [fig.add_subplot(grid[i, j]) for j in range(3)]
        axes[0].imshow(base)
        if names is not None:
            axes[0].set_ylabel(names[i], fontsize=8)
        if truth is not None:
            rgb, valid = colorize(truth, colours)
            axes[1].imshow(np.where(valid[..., None], (1 - ALPHA) * base + ALPHA * rgb, base))
            labelled = valid.sum()
            acc = 100.0 * float(((pred == truth) & valid).sum()) / labelled if labelled else float("nan")
            axes[2].set_xlabel(f"pixel accuracy {acc:.1f} %", fontsize=8)
        else:
            axes[1].imshow(base * 0.3)
            axes[1].text(0.5, 0.5, "no label map found", ha="center", va="center", color="white", fontsize=9,
                         transform=axes[1].transAxes)  # fmt: skip
        rgb, _ = colorize(pred, colours)
        axes[2].imshow((1 - ALPHA) * base + ALPHA * rgb)
        for ax, name in zip(axes, ("image", "ground truth", "prediction"), strict=True):
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(name, fontsize=9)
    legend_ax = fig.add_subplot(grid[rows, :])
    legend_ax.axis("off")
    handles = [Patch(color=colours[c] / 255.0, label=class_names[c]) for c in present]
    if handles:
        legend_ax.legend(handles=handles, loc="center", ncol=4, fontsize=8, frameon=False)
    fig.suptitle(title or "segmentation", fontsize=10)
    return save_figure(fig, out, DPI)


def visualize_segmentation(
    checkpoint: str | os.PathLike[str],
    sources: Sequence[str],
    out: str | os.PathLike[str],
    *,
    max_images: int = 8,
    device: str | torch.device = "cpu",
) -> Path:
    """Predicts the first ``max_images`` images of ``sources`` and draws them (with their label maps, if found).

    ``checkpoint``: ``RUN/segmenter.pt`` or a training checkpoint of a ``milan segment`` run.

    Raises:
        FileNotFoundError: No images.
        DataError: An image or label map cannot be decoded (the message names the file).
    """
    dev = torch.device(device)
    model, spec = load_segmenter(checkpoint)
    model.to(dev)
    lab, ev = spec["labels"], spec["eval"]
    labels = LabelSpec(int(lab["num_classes"]), int(lab["ignore_index"]), bool(lab["reduce_zero_label"]))
    paths, images, names = read_images(sources, max_images)
    truths, preds = [], []
    for path, image in zip(paths, images, strict=True):
        label_path = find_label(path)
        truth = None
        if label_path is not None:
            try:
                raw = read_label(label_path.read_bytes(), str(label_path), None)
            except ImageDecodeError as e:
                raise DataError(f"{label_path}: cannot read the label map ({e.reason}: {e.detail})") from None
            truth = labels.convert(raw) if raw.shape == (image.height, image.width) else None
        truths.append(truth)
        preds.append(predict_labels(model, ev, image, dev))
    how = f"sliding {ev['crop']} stride {ev['stride']}" if ev["mode"] == "slide" else "whole image"
    title = f"{Path(checkpoint).name}: resize {list(ev['scale'])}, {how}; {labels.num_classes} classes"
    return render_segmentation(
        [np.asarray(image) for image in images],
        truths,
        preds,
        out,
        class_names=lab["class_names"],
        names=names,
        title=title,
    )
