"""``milan evaluate``: top-1 / top-5 of a classifier checkpoint on a labelled validation folder.

Reads any classifier :func:`milan.checkpoint.load_classifier` understands, converting on the fly:

* ours: ``RUN/classifier.pt`` of ``milan linprobe`` / ``milan finetune`` (and a fine-tuning run's checkpoints);
* the official mmpretrain / MMSelfSup MILAN classifiers (``vit-base-p16_linear-8xb2048-coslr-100e_in1k_*.pth``,
  78.9 %, and ``vit-base-p16_ft-8xb128-coslr-100e_in1k-milan_*.pth``, 85.3 %; mmpretrain 1.2.0's
  ``configs/milan/metafile.yml`` lists them), in mmpretrain's ``ImageClassifier`` key layout;
* original MILAN / MAE fine-tuned and linear-probe checkpoints.

The view (size, resize and crop, resampling, mean and std) and the class names come from the checkpoint's model
spec (:mod:`milan.checkpoint.spec`); a linear-probe run's training checkpoint (a grid of heads) is read as the best
head of its last evaluation. The validation folder's classes are matched to the classifier's by name: a folder the
classifier does not know is an error, a missing one a warning (the others are evaluated). Files without a spec get
the references' evaluation view, Resize(``img_size / 0.875``, bicubic) + CenterCrop(``img_size``) + ImageNet
normalisation (MMSelfSup's linear probe resized bilinearly: ``--interpolation bilinear``), and the folder's sorted
class order (the standard ImageNet ``val/<wnid>/`` layout), with a warning for each assumption. Under ``torchrun``
each process evaluates a shard and the counts are summed.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from milan import distributed as dist
from milan.checkpoint import load_classifier, read_checkpoint, resolve_spec
from milan.data import SkipReport, build_dataset, describe_found, eval_loader, eval_transform
from milan.data.datasets import match_classes
from milan.errors import CheckpointError
from milan.models.classifier import FinetuneClassifier, LinearProbe
from milan.train.evaluation import evaluate_heads
from milan.train.loop import resolve_dtype
from milan.train.run import process_group

COMMANDS = {"evaluate": "top-1/top-5 of a classifier checkpoint on a validation folder"}


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
    crop_pct: float | None = None,
    interpolation: Literal["bicubic", "bilinear"] | None = None,
    mean: tuple[float, float, float] | None = None,
    std: tuple[float, float, float] | None = None,
    progress: bool = True,
    say: Callable[[str], None] | None = None,
    warn: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Loads a classifier and measures its top-1 / top-5 accuracy on ``data`` (a folder, or an archive).

    The view and the class names come from the checkpoint's model spec; files without one (official checkpoints)
    get the references' evaluation view and the folder's sorted class order, each assumption reported to ``warn``
    (default: :func:`warnings.warn`). ``num_heads``, ``crop_pct``, ``interpolation``, ``mean`` and ``std`` set what a
    file does not record; ``say`` receives the start-of-run line (``found N images (M classes) in DATA; B
    batches``) on the main process.

    Returns:
        ``{"top1", "top5", "count", "kind", "checkpoint", "data", "num_classes", "img_size", "preprocessing",
        "notes", "skipped", "seconds"}``.
    """
    t0 = time.perf_counter()
    warn_ = warn or _python_warning
    with process_group(device) as dev:
        ck = read_checkpoint(checkpoint, fmt, num_heads=num_heads)
        if ck.kind not in ("linear_probe", "finetune"):
            raise CheckpointError(f"{checkpoint}: a {ck.format} {ck.kind} checkpoint, not a classifier")
        resolved = resolve_spec(ck, crop_pct=crop_pct, interpolation=interpolation, mean=mean, std=std)
        resolved.adopt(ck)  # its notes are reported below, once
        model: LinearProbe | FinetuneClassifier = load_classifier(ck).to(dev).eval()
        kind, pre, head = ck.kind, resolved.spec.preprocessing, resolved.spec.head
        assert head is not None  # a classifier's resolved spec always has one
        pipeline = eval_transform(
            pre.img_size, crop_pct=pre.crop_pct, interpolation=pre.interpolation, mean=pre.mean, std=pre.std
        )
        dataset = build_dataset(data, pipeline, key="--data", labelled=True, per_class=per_class)
        data_notes = match_classes(dataset, head.class_names, head.num_classes)
        notes = [*resolved.notes, *data_notes]
        if dist.is_main():
            for note in notes:
                warn_(note)
            if say is not None:
                batches = -(-len(dataset) // (batch_size * dist.world_size()))
                say(describe_found(dataset, str(data), unit=f"{batches} batches of {batch_size} per process"))
        dtype = resolve_dtype(precision, dev)
        report = SkipReport()
        loader = eval_loader(dataset, batch_size, num_workers, dev)
        (metrics,) = evaluate_heads(
            model, loader, dev, dtype, report=report, progress=progress and dist.is_main(), desc="evaluate"
        )
        report.all_reduce(dev if dev.type == "cuda" else None)
        report.check(f"--data {data}")  # no usable image, or more than half skipped: DataError
    return {
        "top1": metrics["top1"], "top5": metrics["top5"], "count": int(metrics["count"]), "kind": kind,
        "checkpoint": str(checkpoint), "data": str(data), "num_classes": head.num_classes, "img_size": pre.img_size,
        "preprocessing": dataclasses.asdict(pre), "notes": notes, "skipped": report.skipped,
        "seconds": time.perf_counter() - t0,
    }  # fmt: skip


def _python_warning(text: str) -> None:
    warnings.warn(text, stacklevel=3)  # the caller of evaluate_checkpoint


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
    g = parser.add_argument_group("evaluation view (default: the checkpoint's; files without one: the references')")
    g.add_argument("--crop-pct", type=float, help="center-crop fraction (0.875: resize 256, crop 224)")
    g.add_argument("--interpolation", choices=("bicubic", "bilinear"), help="resize resampling (bicubic)")
    g.add_argument("--mean", type=float, nargs=3, metavar=("R", "G", "B"), help="normalisation mean (ImageNet's)")
    g.add_argument("--std", type=float, nargs=3, metavar=("R", "G", "B"), help="normalisation std (ImageNet's)")
    parser.add_argument("--out", metavar="FILE.json", help="also write the result as JSON")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _print_warning(note: str) -> None:
    print(f"milan evaluate: warning: {note}", file=sys.stderr)


def run(args: argparse.Namespace) -> int:
    """Runs ``milan evaluate``."""
    with process_group(args.device):  # here too, so that only the main process prints
        result = evaluate_checkpoint(
            args.checkpoint, args.data, per_class=args.per_class, batch_size=args.batch_size,
            num_workers=args.num_workers, device=args.device, precision=args.precision, fmt=args.fmt,
            num_heads=args.num_heads, crop_pct=args.crop_pct, interpolation=args.interpolation,
            mean=tuple(args.mean) if args.mean else None, std=tuple(args.std) if args.std else None,
            progress=not args.no_progress, say=print, warn=_print_warning,
        )  # fmt: skip
        if dist.is_main():
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
