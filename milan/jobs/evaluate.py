"""``milan evaluate``: top-1 / top-5 of a classifier (mIoU of a segmentation model) on a labelled validation folder.

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

A ``milan segment`` checkpoint (``RUN/segmenter.pt`` or one of its training checkpoints) is evaluated with the
protocol its spec stores (resize, sliding window or whole image) on image / label-map pairs (the ADE20K release
folder, or ``images/`` and ``labels/`` folders): mIoU, mAcc, aAcc and the IoU of every class.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from milan import distributed as dist
from milan.checkpoint import load_classifier, read_checkpoint, resolve_spec
from milan.checkpoint.segmenter import load_segmenter, segmentation_spec
from milan.data import SkipReport, build_dataset, describe_found, eval_loader, eval_transform
from milan.data.datasets import match_classes
from milan.data.segmentation import (
    EvalTransform,
    LabelSpec,
    SegmentationDataset,
    collate_segmentation,
    eval_folders,
    find_pairs,
)
from milan.errors import CheckpointError
from milan.jobs.classifier import describe_topk
from milan.jobs.launch import add_view_arguments, print_warnings, view_options
from milan.jobs.segment import describe_scores
from milan.models.classifier import FinetuneClassifier, LinearProbe
from milan.seg_metrics import segmentation_scores
from milan.train.evaluation import evaluate_heads, segmentation_areas
from milan.train.loop import resolve_dtype
from milan.train.run import process_group

COMMANDS = {"evaluate": "top-1/top-5 of a classifier (mIoU of a segmentation) checkpoint on a validation folder"}


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
    warn_ = warn or functools.partial(warnings.warn, stacklevel=2)  # pointing at the caller
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
        notes = [*resolved.assumed.values(), *data_notes]
        if dist.is_main():
            for note in notes:
                warn_(note)
            if say is not None:
                batches = -(-len(dataset) // (batch_size * dist.world_size()))
                say(describe_found(dataset, unit=f"{batches} batches of {batch_size} per process"))
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


def add_arguments(parser: argparse.ArgumentParser, command: str) -> None:
    parser.add_argument(
        "--checkpoint", required=True, metavar="CKPT", help="classifier (ours or mmpretrain) or segmentation checkpoint"
    )
    parser.add_argument(
        "--data", required=True, metavar="VAL_DIR",
        help="validation ImageFolder (or a .tar.gz); segmentation: ADEChallengeData2016/, or images/ + labels/ folders",
    )  # fmt: skip
    parser.add_argument("--per-class", type=int, metavar="N", help="archives only: the first N images per class")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--num-workers", type=int, default=None, help="DataLoader workers (default: min(8, CPU cores))")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--precision", choices=("auto", "bf16", "fp16", "fp32"), default="auto")
    parser.add_argument("--format", dest="fmt", default="auto", help="checkpoint format (default: detect)")
    parser.add_argument("--num-heads", type=int, help="encoder heads, if the file does not say (default: ViT table)")
    add_view_arguments(parser, "evaluation view (default: the checkpoint's; files without one: the references')")
    parser.add_argument("--out", metavar="FILE.json", help="also write the result as JSON")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    with process_group(args.device) as dev:  # here too, so that only the main process prints
        if segmentation_spec(args.checkpoint) is not None:  # milan segment's: with the protocol and labels it stores
            model, spec = load_segmenter(args.checkpoint)
            lab, ev = spec["labels"], spec["eval"]
            labels = LabelSpec(int(lab["num_classes"]), int(lab["ignore_index"]), bool(lab["reduce_zero_label"]))
            pairs = find_pairs(*eval_folders(args.data))  # the ADE20K release folder, or images/ + labels/ folders
            loader = eval_loader(
                SegmentationDataset(pairs, EvalTransform(tuple(ev["scale"])), labels), 1, args.num_workers, dev,
                collate=collate_segmentation,
            )  # fmt: skip
            dtype, report = resolve_dtype(args.precision, dev), SkipReport()
            areas, n = segmentation_areas(  # a label value no class has: LabelError
                model.to(dev), loader, dev, dtype, mode=ev["mode"], crop=int(ev["crop"]), stride=int(ev["stride"]),
                ignore_index=labels.ignore_index, report=report,
                progress=not args.no_progress and dist.is_main(),
            )  # fmt: skip
            report.all_reduce(dev if dev.type == "cuda" else None)
            report.check(f"--data {args.data}")  # no usable pair, or more than half skipped: DataError
            scores = segmentation_scores(areas, lab["class_names"])
            result = {
                **{k: scores[k] for k in ("mIoU", "mAcc", "aAcc", "IoU", "Acc")}, "count": n, "kind": "segmentation",
                "checkpoint": args.checkpoint, "data": args.data, "num_classes": labels.num_classes,
                "skipped": report.skipped, "seconds": time.perf_counter() - t0,
            }  # fmt: skip
            shown, size, unit = describe_scores(result), "", "pairs"
        else:
            result = evaluate_checkpoint(
                args.checkpoint, args.data, per_class=args.per_class, batch_size=args.batch_size,
                num_workers=args.num_workers, device=args.device, precision=args.precision, fmt=args.fmt,
                num_heads=args.num_heads, progress=not args.no_progress, say=print,
                warn=functools.partial(print_warnings, "evaluate"), **view_options(args),
            )  # fmt: skip
            shown, size, unit = describe_topk(result), f"{result['img_size']} px, ", "files"
        if dist.is_main():
            print(
                f"{result['kind'].replace('_', ' ')} {args.checkpoint}: {shown} on {result['count']} images of "
                f"{args.data} ({size}{result['seconds']:.1f} s)"
                + (f"; {result['skipped']} unreadable {unit} skipped" if result["skipped"] else "")
            )
            if args.out:
                Path(args.out).parent.mkdir(parents=True, exist_ok=True)
                Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return 0
