"""``milan evaluate``: top-1 / top-5 of a classifier checkpoint on a labelled validation folder.

Reads any classifier :func:`milan.checkpoint.load_classifier` understands, converting on the fly:

* ours: ``RUN/classifier.pt`` of ``milan linprobe`` / ``milan finetune`` (and a fine-tuning run's checkpoints);
* the official mmpretrain / MMSelfSup MILAN classifiers (``vit-base-p16_linear-8xb2048-coslr-100e_in1k_*.pth``,
  78.9 %, and ``vit-base-p16_ft-8xb128-coslr-100e_in1k-milan_*.pth``, 85.3 %; mmpretrain 1.2.0's
  ``configs/milan/metafile.yml`` lists them), in mmpretrain's ``ImageClassifier`` key layout;
* original MILAN / MAE fine-tuned and linear-probe checkpoints.

The view is the references' evaluation transform: Resize(``img_size / 0.875``, bicubic) + CenterCrop(``img_size``)
+ ImageNet normalisation (MMSelfSup's linear probe resized bilinearly: ``--interpolation bilinear``). Class indices
are the sorted class-folder names, i.e. the standard ImageNet ``val/<wnid>/`` layout. Under ``torchrun`` each process
evaluates a shard and the counts are summed.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from milan import distributed as dist
from milan.checkpoint import load_classifier
from milan.checkpoint.io import CheckpointError, safe_load
from milan.data import DataError, ImageFolderDataset, SkipReport, describe_found, eval_transform
from milan.engine.config import ConfigError
from milan.engine.loop import autocast_context, resolve_dtype
from milan.eval.classify import evaluate_heads
from milan.eval.data import eval_loader, resolve_split
from milan.models.classifier import FinetuneClassifier, LinearProbe


def _explain(path: str, error: CheckpointError) -> CheckpointError:
    """A clearer message for a linear-probe *training* checkpoint (a grid of heads, not one classifier)."""
    try:
        blob = safe_load(path)
    except CheckpointError:
        return error
    model = blob.get("model") if isinstance(blob, dict) else None
    if isinstance(model, dict) and "fcs.0.weight" in model:
        run = Path(path).resolve().parent.parent
        return CheckpointError(
            f"{path} is a linear-probe training checkpoint (a grid of heads); evaluate the selected head, "
            f"{run / 'classifier.pt'}, which the run writes when it finishes"
        )
    return error


def evaluate_checkpoint(
    checkpoint: str,
    data: str,
    *,
    per_class: int | None = None,
    batch_size: int = 256,
    num_workers: int | None = None,
    device: Literal["auto", "cpu", "cuda"] = "auto",
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto",
    fmt: str = "auto",
    num_heads: int | None = None,
    crop_pct: float = 0.875,
    interpolation: Literal["bicubic", "bilinear"] = "bicubic",
    progress: bool = True,
    say: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Loads a classifier and measures its top-1 / top-5 accuracy.

    Args:
        checkpoint: Classifier checkpoint (see the module docstring).
        data: Validation ImageFolder tree, or a ``.tar.gz`` archive (with ``per_class``).
        per_class: Archives: images per class (``None``: all).
        batch_size: Images per batch (per process).
        num_workers: DataLoader workers (``None``: min(8, available cores)).
        device: ``auto``, ``cpu`` or ``cuda``.
        precision: Autocast precision on CUDA (``auto``: bf16).
        fmt: Checkpoint format (``auto`` detects it).
        num_heads: Encoder heads when the file does not record them (default: the standard ViT table).
        crop_pct: Center-crop fraction.
        interpolation: Resize resampling.
        progress: Show a progress bar (on a terminal).
        say: Receives the start-of-run line (``found N images (M classes) in DATA; B batches``) on the main process.

    Returns:
        ``{"top1", "top5", "count", "kind", "checkpoint", "data", "num_classes", "seconds"}``.
    """
    t0 = time.perf_counter()
    owns_process_group = not dist.is_enabled()  # a caller's process group is left alone
    dev = dist.init(device)
    try:
        try:
            model: LinearProbe | FinetuneClassifier = load_classifier(checkpoint, fmt=fmt, num_heads=num_heads)
        except CheckpointError as e:
            raise _explain(checkpoint, e) from e
        model = model.to(dev).eval()
        kind = "linear_probe" if isinstance(model, LinearProbe) else "finetune"
        head_weight = model.state_dict()["head.fc.weight" if kind == "linear_probe" else "head.weight"]
        num_classes = int(head_weight.shape[0])
        size = int(model.encoder.patch_embed.img_size[0])
        pipeline = eval_transform(size, crop_pct=crop_pct, interpolation=interpolation)
        root, keep = resolve_split(data, per_class, "--data")  # keep: a folder's per-class selection
        dataset = ImageFolderDataset(root, pipeline, per_class=keep)
        if say is not None and dist.is_main():
            batches = -(-len(dataset) // (batch_size * dist.world_size()))
            say(describe_found(dataset, str(data), unit=f"{batches} batches of {batch_size} per process"))
        if len(dataset.classes) > num_classes:
            raise ConfigError(
                f"{data} has {len(dataset.classes)} class folders but the classifier has {num_classes} outputs"
            )
        dtype = resolve_dtype(precision, dev)
        report = SkipReport()
        loader = eval_loader(dataset, batch_size, num_workers, dev)
        (metrics,) = evaluate_heads(
            model, loader, dev, ctx=lambda: autocast_context(dev, dtype), report=report,
            progress=progress and dist.is_main(), desc="evaluate",
        )  # fmt: skip
        report.all_reduce(dev if dev.type == "cuda" else None)
        report.check(f"--data {data}")  # no usable image, or more than half skipped: DataError
    finally:
        if owns_process_group:
            dist.destroy()
    return {
        "top1": metrics["top1"], "top5": metrics["top5"], "count": int(metrics["count"]), "kind": kind,
        "checkpoint": str(checkpoint), "data": str(data), "num_classes": num_classes, "img_size": size,
        "skipped": report.skipped, "seconds": time.perf_counter() - t0,
    }  # fmt: skip


# ----------------------------------------------------------------------------------------------------------------
# Command line


def add_arguments(parser: argparse.ArgumentParser, command: str) -> None:
    """Adds ``milan evaluate``'s arguments."""
    parser.add_argument(
        "--checkpoint", required=True, metavar="CKPT", help="classifier checkpoint (ours or mmpretrain)"
    )
    parser.add_argument("--data", required=True, metavar="VAL_DIR", help="validation ImageFolder (or a .tar.gz)")
    parser.add_argument("--per-class", type=int, metavar="N", help="archives only: the first N images per class")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--num-workers", type=int, default=None, help="DataLoader workers (default: min(8, CPU cores))")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--precision", choices=("auto", "bf16", "fp16", "fp32"), default="auto")
    parser.add_argument("--format", dest="fmt", default="auto", help="checkpoint format (default: detect)")
    parser.add_argument("--num-heads", type=int, help="encoder heads, if the file does not say (default: ViT table)")
    parser.add_argument("--crop-pct", type=float, default=0.875, help="center-crop fraction (0.875: 256 -> 224)")
    parser.add_argument("--interpolation", choices=("bicubic", "bilinear"), default="bicubic")
    parser.add_argument("--out", metavar="FILE.json", help="also write the result as JSON")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    """Runs ``milan evaluate``; returns the exit status."""
    owns_process_group = not dist.is_enabled()
    try:
        try:
            dist.init(args.device)  # here too, so that only the main process prints below
        except RuntimeError as e:  # e.g. --device cuda without a GPU
            print(f"milan evaluate: {e}", file=sys.stderr)
            return 2
        main = dist.is_main()
        try:
            result = evaluate_checkpoint(
                args.checkpoint, args.data, per_class=args.per_class, batch_size=args.batch_size,
                num_workers=args.num_workers, device=args.device, precision=args.precision, fmt=args.fmt,
                num_heads=args.num_heads, crop_pct=args.crop_pct, interpolation=args.interpolation,
                progress=not args.no_progress, say=print,
            )  # fmt: skip
        except (ConfigError, CheckpointError, FileNotFoundError, NotADirectoryError) as e:
            print(f"milan evaluate: {e}", file=sys.stderr)
            return 2
        except DataError as e:
            print(f"milan evaluate: {e}", file=sys.stderr)
            return 1
    finally:
        if owns_process_group:
            dist.destroy()
    if main:
        print(
            f"{result['kind'].replace('_', ' ')} {result['checkpoint']}: top-1 {result['top1']:.2f}  "
            f"top-5 {result['top5']:.2f} on {result['count']} images of {result['data']} "
            f"({result['img_size']} px, {result['seconds']:.1f} s)"
            + (f"; {result['skipped']} unreadable files skipped" if result["skipped"] else "")
        )
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return 0


__all__ = ["add_arguments", "evaluate_checkpoint", "run"]
