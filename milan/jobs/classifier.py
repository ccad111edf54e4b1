"""What ``milan linprobe`` and ``milan finetune`` share on top of the engine's :class:`~milan.train.trainer.Trainer`.

The engine runs the epochs, the periodic validation (:class:`~milan.train.trainer.Evaluation`), logging,
checkpoints and resume. This module adds the classifier parts: the step function over labelled batches, the
BatchNorm statistics sync before evaluation, the labelled splits, and the end of a run: the export of the
deliverable (``classifier.pt``), the ``"summary"`` record, ``results.json`` and the one-line summary.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import torch
import torch.nn as nn

from milan import distributed as dist
from milan.checkpoint.spec import HeadSpec, ModelSpec, Preprocessing, SpecKind, encoder_arch_of
from milan.data import Batch, ImageDataset, ImagePipeline, SkipReport, build_dataset, eval_transform
from milan.errors import ConfigError
from milan.models.vit import VisionTransformer
from milan.train.config import ClassifyDataConfig
from milan.train.loop import StepFn, TrainState, data_step
from milan.train.run import FinishedRun
from milan.train.trainer import Metrics, Trainer


def classifier_step(
    forward: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, int]],
    module: nn.Module,
    device: torch.device,
    report: SkipReport,
) -> StepFn:
    """A step function for :func:`~milan.train.loop.train_one_epoch` over labelled ``(Batch, noise)`` batches.

    Args:
        forward: ``(images, labels) -> (mean loss, batch size used)`` on ``device``.
        module: The trained module (for the zero loss of an all-bad batch).
        device: Where to compute.
        report: Receives each batch's unreadable files.

    Returns:
        The step function.
    """

    def step(data: Batch, noise: torch.Tensor | None) -> tuple[torch.Tensor, int]:
        images = data.images.to(device, non_blocking=True)  # (B, 3, H, W)
        labels = data.labels.to(device, non_blocking=True)  # (B,)
        return forward(images, labels)

    return data_step(step, module, device, report)


@torch.no_grad()
def sync_batchnorm_stats(module: nn.Module) -> None:
    """Averages BatchNorm running statistics over processes (no-op in a single process).

    Each process's BatchNorm sees only its own batches; averaging before evaluation and saving makes every process
    (and the checkpoint) use the same statistics.
    """
    if dist.world_size() == 1:
        return
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None and m.running_var is not None:
            m.running_mean.copy_(dist.all_reduce_mean(m.running_mean))
            m.running_var.copy_(dist.all_reduce_mean(m.running_var))


def labelled_splits(
    data: ClassifyDataConfig, train_pipeline: ImagePipeline, img_size: int, num_classes: int | None
) -> tuple[ImageDataset, ImageDataset, int]:
    """The training split (with the job's view) and the validation split (evaluation view, the same classes).

    Returns:
        ``(train, val, head width)``; the width is ``num_classes``, or the number of training class folders.
    """
    train = build_dataset(
        data.train, train_pipeline, key="data.train", labelled=True, per_class=data.train_per_class,
        max_pixels=data.max_image_pixels,
    )  # fmt: skip
    val = build_dataset(
        data.val, eval_transform(img_size, crop_pct=data.crop_pct, interpolation=data.interpolation), key="data.val",
        labelled=True, classes=train.classes, per_class=data.val_per_class, max_pixels=data.max_image_pixels,
    )  # fmt: skip
    if num_classes is not None and num_classes < len(train.classes):
        raise ConfigError(f"num_classes={num_classes} but the training set has {len(train.classes)} class folders")
    return train, val, len(train.classes) if num_classes is None else num_classes


def classifier_spec(
    encoder: VisionTransformer,
    head: HeadSpec,
    data: ClassifyDataConfig,
) -> ModelSpec:
    """The model spec of a classifier job's checkpoints (encoder, evaluation view, head with its class names).

    Args:
        encoder: The classifier's encoder (before any DDP wrapping).
        head: Its head (kind, width, class names in index order, pooling ...).
        data: The job's data section (evaluation crop fraction and resampling).

    Returns:
        The spec (see :mod:`milan.checkpoint.spec`).
    """
    arch = encoder_arch_of(encoder)
    pre = Preprocessing(arch.img_size, interpolation=data.interpolation, crop_pct=data.crop_pct)
    return ModelSpec(cast(SpecKind, head.kind), arch, pre, head=head)


def describe_topk(metrics: Metrics) -> str:
    """``"top-1 78.90  top-5 94.10"`` (and the unreadable validation images, if any)."""
    skipped = metrics.get("val_skipped")
    return f"top-1 {metrics['top1']:.2f}  top-5 {metrics['top5']:.2f}" + (
        f"; {skipped} unreadable val images skipped" if skipped else ""
    )


def checked_val_report(report: SkipReport, device: torch.device) -> None:
    """Sums a validation pass's skip report over processes and checks it.

    Raises:
        DataError: data.val had no usable image, or skipped more than ``data.max_skip_fraction``.
    """
    report.all_reduce(device if device.type == "cuda" else None)
    report.check("data.val")


@dataclass
class FitResult:
    """What a classifier job returns."""

    run_dir: Path
    state: TrainState
    final: Metrics  # the last evaluation (at the final step)
    history: list[Metrics]  # every evaluation, in order
    summary: Metrics  # the summary record written to results.json
    checkpoint: Path | None

    @classmethod
    def of_finished(cls, run_dir: Path, finished: FinishedRun) -> FitResult:
        """The result of a run resumed after it had finished: read back from its checkpoint and ``results.json``."""
        try:
            summary: Metrics = json.loads((run_dir / "results.json").read_text())
        except (OSError, ValueError):
            summary = {}
        history = finished.eval_history
        final: Metrics = history[-1] if history else {k: summary[k] for k in ("top1", "top5") if k in summary}
        return cls(run_dir, finished.state, final, history, summary, finished.checkpoint)


def train_classifier(
    trainer: Trainer,
    job: str,
    export: Callable[[Metrics], Metrics],
    t_start: float,
    *,
    after_step: Callable[[TrainState], None] | None = None,
    describe: Callable[[Metrics], str] = describe_topk,
) -> FitResult:
    """Trains (the trainer evaluates ``top1``/``top5``), exports the classifier and writes the summary.

    Args:
        trainer: The job's trainer, with an evaluation returning ``top1`` and ``top5``; closed at the end.
        job: ``"linprobe"`` or ``"finetune"`` (the summary's ``job``).
        export: Called once with the final metrics; writes the deliverable (e.g. ``classifier.pt``) on the main
            process and returns more summary fields.
        t_start: When the job started (``time.perf_counter()``).
        after_step: Called after every optimizer step (e.g. an EMA update).
        describe: The final result in the closing line (e.g. with the linear probe's winning lr).

    Returns:
        The result (on every process).
    """
    if trainer.evaluation is None:
        raise ValueError("train_classifier needs a Trainer with an evaluation (top1/top5)")
    with trainer:
        state = trainer.fit(after_step=after_step)
        final = trainer.eval_history[-1]  # fit() ends with an evaluation of the last step
        fields = export(final)
        dist.barrier()  # the exported files exist for every process once this returns
        wall = time.perf_counter() - t_start
        history = trainer.eval_history
        summary: Metrics = {
            "job": job, "top1": final["top1"], "top5": final["top5"], "max_top1": max(h["top1"] for h in history),
            "epoch": state.epoch, "step": state.step, "images_seen": state.images_seen, "wall_time": wall, **fields,
        }  # fmt: skip
        plot = f"; plot {fields['lr_grid_plot']}" if fields.get("lr_grid_plot") else ""
        trainer.finish(
            summary,
            f"done: {job} {describe(final)}; best epoch top-1 {summary['max_top1']:.2f}; after epoch {state.epoch}, "
            f"step {state.step}, in {wall:.1f} s; {trainer.run_report.summary()}; results "
            f"{trainer.run_dir / 'results.json'}{plot}",
            results=True,
        )
    last = trainer.checkpointer.last
    return FitResult(trainer.run_dir, state, final, list(history), summary, last if last.exists() else None)
