"""``milan plot RUN_DIR --out FILE.png``: loss, learning-rate and throughput curves of a run's ``metrics.jsonl``.

A run without training records (an evaluation-only run such as ``milan knn``) gets what its log holds instead:
the accuracy of each evaluation, or the top-1 / top-5 accuracy for each ``k`` of a k-NN run.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from PIL import Image

from milan.data import DataError, ImageDecodeError, scan_sources
from milan.data.decode import decode_rgb
from milan.data.sources import natural_key
from milan.errors import UserError
from milan.train.logging import read_metrics

COMMANDS = {"plot": "loss, lr and throughput curves of a run"}


CURVES = "loss, lr and throughput curves"  # what save_plot draws of a run with training records


def save_plot(
    metrics: str | os.PathLike[str], out: str | os.PathLike[str], title: str | None = None
) -> tuple[Path | None, str]:
    """Draws a run's ``metrics.jsonl`` (given it or its run folder) into ``out``.

    Training records: loss, lr and img/s against the optimizer step (and epoch), the :data:`CURVES`. An
    evaluation-only run: the accuracy of each evaluation against the epoch, or per ``k`` of a k-NN summary.

    Returns:
        ``(out, what was drawn)``, or ``(None, what the log holds)`` when there is nothing to draw.
    """
    path = Path(metrics) / "metrics.jsonl" if Path(metrics).is_dir() else Path(metrics)
    if not path.is_file():
        raise FileNotFoundError(f"no metrics log at {path}")
    plt = pyplot()
    records = read_metrics(path, event=None)
    train = [r for r in records if r.get("event") == "train" and isinstance(r.get("step"), int)]
    evals = [r for r in records if r.get("event") == "eval" and isinstance(r.get("top1"), (int, float))]
    by_k = next((r["by_k"] for r in reversed(records) if isinstance(r.get("by_k"), dict) and r["by_k"]), None)
    if train:
        steps = [r["step"] for r in train]
        fig, axes = plt.subplots(1, 3, figsize=(13, 3.6), constrained_layout=True)
        panels = (("loss", "loss (interval mean)", "tab:blue"), ("lr", "learning rate", "tab:orange"))
        for ax, (key, label, colour) in zip(axes, (*panels, ("img_per_s", "images / s", "tab:green")), strict=True):
            ys = [r.get(key) for r in train]
            xs = [s for s, y in zip(steps, ys, strict=True) if isinstance(y, (int, float))]
            marker = "." if len(xs) < 40 else None
            ax.plot(xs, [y for y in ys if isinstance(y, (int, float))], color=colour, marker=marker)
            ax.set_ylabel(label)
            ax.set_xlabel("optimizer step")
            ax.grid(alpha=0.3)
        last = train[-1]
        if "epoch" in last and last["step"]:
            per_step = float(last["epoch"]) / last["step"]
            top = axes[0].secondary_xaxis("top", functions=(lambda s: s * per_step, lambda e: e / max(per_step, 1e-12)))
            top.set_xlabel("epoch")
        if "mfu" in last:
            axes[2].set_ylabel(f"images / s (last MFU {100 * float(last['mfu']):.1f} %)")
        what = CURVES
    elif evals or by_k is not None:
        fig, ax = plt.subplots(figsize=(5.5, 3.6), constrained_layout=True)
        if evals:
            xs = [float(r.get("epoch", i + 1)) for i, r in enumerate(evals)]
            for key, colour in (("top1", "tab:blue"), ("top5", "tab:orange")):
                if all(isinstance(r.get(key), (int, float)) for r in evals):
                    ys = [float(r[key]) for r in evals]
                    ax.plot(xs, ys, marker="o", color=colour, label=key.replace("top", "top-"))
            ax.set_xlabel("epoch")
            what = f"accuracy of {len(evals)} evaluation(s) against the epoch"
        else:
            assert by_k is not None
            ks = sorted(by_k, key=natural_key)
            pos = range(len(ks))
            for offset, key, colour in ((-0.2, "top1", "tab:blue"), (0.2, "top5", "tab:orange")):
                ys = [float(by_k[k].get(key, 0.0)) for k in ks]
                ax.bar([p + offset for p in pos], ys, width=0.4, color=colour, label=key.replace("top", "top-"))
            ax.set_xticks(list(pos), [str(k) for k in ks])
            ax.set_xlabel("k (neighbours)")
            what = f"k-NN top-1 / top-5 for k = {', '.join(str(k) for k in ks)}"
        ax.set_ylabel("accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend()
    else:
        kinds = sorted({str(r.get("event", "train")) for r in records})
        held = f"records of kind {', '.join(kinds)}" if kinds else "no records"
        return None, f"{path} holds {held}: no training curves and no accuracies to draw"
    fig.suptitle(title if title is not None else path.parent.name)
    return save_figure(fig, out, dpi=110), what


def pyplot() -> Any:
    """Matplotlib's pyplot, drawing to files only (the Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def read_images(sources: Sequence[str], limit: int) -> tuple[list[Path], list[Image.Image], list[str]]:
    """The first ``limit`` images (RGB) of files, folders (searched recursively), file lists or ``builtin:samples``.

    Returns:
        Their files, the images and their row labels: file names, with the folder when names repeat (e.g. class
        folders).

    Raises:
        FileNotFoundError: A source is missing or holds no images.
        DataError: An image cannot be decoded (the message names the file).
    """
    paths = scan_sources(sources).paths[:limit]
    images = []
    for path in paths:
        try:
            images.append(decode_rgb(path.read_bytes()))
        except ImageDecodeError as e:
            raise DataError(f"{path}: cannot read the image ({e.reason}: {e.detail})") from None
    names = [p.name for p in paths]
    if len(set(names)) < len(names):
        names = [f"{p.parent.name}/{p.name}" for p in paths]
    return paths, images, names


def save_figure(fig: Any, out: str | os.PathLike[str], dpi: int) -> Path:
    """Writes ``fig`` to ``out`` (creating its folder) and closes it."""
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    pyplot().close(fig)
    return path


def add_arguments(parser: argparse.ArgumentParser, command: str) -> None:
    parser.add_argument("run_dir", metavar="RUN_DIR", help="a run folder (with metrics.jsonl) or the file itself")
    parser.add_argument("--out", "-o", metavar="FILE.png", help="output image (default: RUN_DIR/plot.png)")
    parser.add_argument("--title", help="figure title")


def run(args: argparse.Namespace) -> int:
    source = Path(args.run_dir)
    out = Path(args.out) if args.out else (source if source.is_dir() else source.parent) / "plot.png"
    written, what = save_plot(source, out, args.title)
    if written is None:
        raise UserError(what)
    if what != CURVES:  # an evaluation-only run (or a run that has not logged a step yet)
        print(f"{source} has no training records (an evaluation-only run); drew the {what} instead: {written}")
    else:
        print(written)
    return 0
