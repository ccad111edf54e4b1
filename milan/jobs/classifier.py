"""What the jobs on a pretrained encoder share: the encoder, the labelled splits, validation, the end of a run.

``milan linprobe`` and ``milan finetune`` train a classifier on it, ``milan knn`` reads its features. Each job writes
its own loop (:class:`~milan.train.session.Session`); these helpers build what goes in and report what comes out.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import torch

from milan import distributed as dist
from milan.checkpoint.formats import read_checkpoint, resolve_spec
from milan.checkpoint.loaders import load_encoder
from milan.checkpoint.spec import HeadSpec, ModelSpec, Preprocessing, SpecKind, encoder_arch_of
from milan.data import Batch, ImageDataset, ImagePipeline, SkipReport, build_dataset, eval_transform
from milan.errors import CheckpointError, ConfigError
from milan.models.factory import build_encoder, list_models, model_config
from milan.models.vit import VisionTransformer
from milan.train.config import ClassifyDataConfig, EncoderSource
from milan.train.evaluation import evaluate_heads
from milan.train.loop import TrainState
from milan.train.run import FinishedRun
from milan.train.session import Metrics, Session


def load_pretrained_encoder(src: EncoderSource, *, drop_path_rate: float = 0.0) -> tuple[VisionTransformer, str]:
    """Builds the encoder named by ``src`` and loads its weights (strictly, stored position table included).

    The architecture comes from the checkpoint's model spec, else is inferred from its weights (heads from
    ``src.num_heads``, or assumed: the description then says so and names the key), so every format
    :func:`milan.checkpoint.read_checkpoint` knows works, classifier checkpoints (their encoder) included.

    Returns:
        ``(encoder, description)``; the description says where the weights came from.

    Raises:
        CheckpointError: Unreadable file, or one without a student encoder.
        ConfigError: Neither ``pretrained`` nor a known ``model_name``.
    """
    if src.pretrained is None:
        if src.model_name not in list_models():
            raise ConfigError(f"encoder.model_name: unknown variant {src.model_name!r}; choose one of {list_models()}")
        enc_cfg = dataclasses.replace(model_config(src.model_name).encoder, drop_path_rate=drop_path_rate)
        return build_encoder(enc_cfg), f"RANDOMLY initialised {src.model_name} encoder (no encoder.pretrained)"
    ck = read_checkpoint(src.pretrained, num_heads=src.num_heads)
    if ck.kind not in ("milan", "encoder", "linear_probe", "finetune"):
        raise CheckpointError(f"{src.pretrained}: a {ck.format} {ck.kind} checkpoint holds no student encoder")
    resolved = resolve_spec(ck, heads_flag="encoder.num_heads=N")
    resolved.adopt(ck)  # an assumed head count is reported in the description below
    encoder = load_encoder(ck, drop_path_rate=drop_path_rate)
    desc = (
        f"{src.pretrained} ({ck.kind.replace('_', ' ')} checkpoint, {ck.format} format): ViT {encoder.embed_dim}d x "
        f"{len(encoder.blocks)} blocks, {encoder.num_heads} heads, patch {encoder.patch_size}, "
        f"{input_size(None, encoder)} px"
    )
    assumed = resolved.assumed.get("encoder_heads")
    return encoder, desc + (f"; WARNING {assumed}" if assumed else "")


def input_size(requested: int | None, encoder: VisionTransformer) -> int:
    """The training/eval resolution: the encoder's (its fixed position table allows no other)."""
    size = int(encoder.patch_embed.img_size[0])
    if requested is not None and requested != size:
        raise ConfigError(f"data.img_size={requested} but the encoder takes {size} px images; leave it null")
    return size


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


def classifier_spec(encoder: VisionTransformer, head: HeadSpec, data: ClassifyDataConfig) -> ModelSpec:
    """The model spec of a classifier job's checkpoints: encoder, evaluation view, head with its class names."""
    arch = encoder_arch_of(encoder)
    pre = Preprocessing(arch.img_size, interpolation=data.interpolation, crop_pct=data.crop_pct)
    return ModelSpec(cast(SpecKind, head.kind), arch, pre, head=head)


def validate(
    forward: Callable[[torch.Tensor], torch.Tensor],
    val: Iterable[Batch],
    data: ClassifyDataConfig,
    device: torch.device,
    dtype: torch.dtype,
    num_heads: int = 1,
) -> tuple[list[dict[str, float]], SkipReport]:
    """Top-1/top-5 of each head on the validation split (summed over processes) and its skip report.

    Raises:
        DataError: data.val had no usable image, or skipped more than ``data.max_skip_fraction``.
    """
    report = SkipReport(max_skip_fraction=data.max_skip_fraction)
    heads = evaluate_heads(forward, val, device, dtype, num_heads=num_heads, report=report)
    report.all_reduce(device if device.type == "cuda" else None)
    report.check("data.val")
    return heads, report


def describe_topk(metrics: Metrics) -> str:
    """``"top-1 78.90  top-5 94.10"`` (and the unreadable validation images, if any)."""
    skipped = metrics.get("val_skipped")
    return f"top-1 {metrics['top1']:.2f}  top-5 {metrics['top5']:.2f}" + (
        f"; {skipped} unreadable val images skipped" if skipped else ""
    )


def topk_summary(history: list[Metrics]) -> Metrics:
    """The summary's accuracy fields: the last evaluation's top-1 and top-5, and the best top-1 of any epoch."""
    return {"top1": history[-1]["top1"], "top5": history[-1]["top5"], "max_top1": max(h["top1"] for h in history)}


@dataclass
class FitResult:
    """What a training job that ends with an evaluation returns."""

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
        return cls(run_dir, finished.state, history[-1] if history else summary, history, summary, finished.checkpoint)


def finish_run(
    s: Session, job: str, metrics: Metrics, fields: Metrics, text: str, t_start: float, plot: Path | None = None
) -> FitResult:
    """Ends a run whose last step was evaluated: the ``"summary"`` record, ``results.json``, the closing line.

    The summary holds ``job``, the result ``metrics`` (e.g. :func:`topk_summary`), the run's position and wall time
    (since ``t_start``, a ``time.perf_counter()``), then ``fields`` (the files the job wrote ...); the closing line
    reads ``done: JOB TEXT; after epoch ...`` and names ``plot``.
    """
    dist.barrier()  # the files the job wrote exist for every process once this returns
    state = s.state
    wall = time.perf_counter() - t_start
    summary: Metrics = {
        "job": job, **metrics, "epoch": state.epoch, "step": state.step, "images_seen": state.images_seen,
        "wall_time": wall, **fields,
    }  # fmt: skip
    s.finish(
        summary,
        f"done: {job} {text}; after epoch {state.epoch}, step {state.step}, in {wall:.1f} s; "
        f"{s.run_report.summary()}; results {s.run_dir / 'results.json'}" + (f"; plot {plot}" if plot else ""),
        results=True,
    )
    last = s.checkpointer.last
    return FitResult(
        s.run_dir, state, s.eval_history[-1], list(s.eval_history), summary, last if last.exists() else None
    )
