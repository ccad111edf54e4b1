"""``milan segment``: semantic segmentation with UperNet on a pretrained ViT (the paper's ADE20K protocol).

The recipe is mmsegmentation's MAE + UperNet ADE20K config (``mae-base_upernet_8xb2-amp-160k_ade20k-512x512.py``),
the protocol of the paper's 52.7 mIoU: model :class:`~milan.models.segmentation.SegmentationModel`; data
:mod:`milan.data.segmentation`; AdamW (lr 1e-4, betas 0.9/0.999, wd 0.05) with layer-wise lr decay 0.65 (the
exponents of ``milan finetune``, :func:`~milan.train.optim.layer_decay_groups`), drop path 0.1; a linear warm-up from
``1e-6 x lr`` over 1,500 iterations then poly decay (power 1) to 0 at 160k iterations
(:class:`~milan.train.schedule.PolySchedule`); total batch 16; BatchNorm statistics over all processes
(:func:`~milan.distributed.synchronise_batchnorm`); evaluation every 16k iterations and at the end (resize to (2048,
512) keeping the aspect, sliding 512 windows, single scale): mIoU, mAcc, aAcc and per-class IoU
(:mod:`milan.seg_metrics`). ``configs/segment/milan_vit_base_patch16_ade20k_512_160k.yaml`` gives every value with its
source.

The run spans ``ceil(schedule.iters / steps per epoch)`` epochs, the last one partial. Dropout and drop path draw
from a generator seeded per micro-batch (seed, epoch, position, rank), so a resumed run trains exactly as an
uninterrupted one. ``RUN/segmenter.pt`` (weights, the model spec of :mod:`milan.checkpoint.segmenter`, config, class
names, metrics) is read by ``milan evaluate`` and ``milan visualize``; ``results.json`` holds the summary.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Literal

import torch
import torch.nn as nn

from milan import distributed as dist
from milan.checkpoint.io import atomic_save
from milan.checkpoint.segmenter import segmenter_spec
from milan.data import Batch, SkipReport, eval_loader, seeded_loader
from milan.data.sampling import mix_seeds
from milan.data.segmentation import (
    EvalTransform,
    LabelSpec,
    SegmentationDataset,
    TrainTransform,
    check_labels,
    collate_segmentation,
    find_pairs,
)
from milan.errors import ConfigError
from milan.jobs.classifier import FitResult, finish_run, load_pretrained_encoder
from milan.jobs.launch import add_run_arguments, run_job
from milan.models.segmentation import SegmentationModel, segmentation_loss
from milan.seg_metrics import segmentation_scores
from milan.train.config import SegDataConfig, SegmentConfig, check_segment, derive, to_dict
from milan.train.evaluation import segmentation_areas
from milan.train.loop import StepOutput, protect_workers, zero_loss
from milan.train.optim import build_adamw, layer_decay_groups
from milan.train.run import seed_everything, start_run
from milan.train.schedule import PolySchedule
from milan.train.session import Metrics, Session

COMMANDS = {"segment": "semantic segmentation: UperNet on a pretrained encoder (mIoU)"}


def segment(cfg: SegmentConfig, resume: str | None = None) -> FitResult:
    """Trains and evaluates a segmentation model (``resume``: see :func:`milan.train.run.start_run`).

    Returns:
        The run's result, on every process; ``summary["segmenter"]`` is the model file.
    """
    check_segment(cfg)
    with start_run(cfg.out_dir, cfg.runtime, resume, schedule=cfg.schedule, done_file="results.json") as run:
        if run.finished is not None:
            return FitResult.of_finished(run.run_dir, run.finished)
        device, data, m, sch = run.device, cfg.data, cfg.model, cfg.schedule
        if cfg.batch_size * dist.world_size() < 2:
            raise ConfigError("batch_size: the heads' BatchNorm needs >= 2 images per step over all processes")
        labels = LabelSpec(data.num_classes, data.ignore_index, data.reduce_zero_label)
        train_tf = TrainTransform(
            data.crop_size, data.scale, data.ratio_range, data.cat_max_ratio, data.hflip, data.photometric,
            data.ignore_index,
        )  # fmt: skip
        train_set = SegmentationDataset(split_pairs(data, "train"), train_tf, labels, data.max_image_pixels)
        val_set = SegmentationDataset(split_pairs(data, "val"), EvalTransform(cfg.eval.scale), labels,
                                      data.max_image_pixels)  # fmt: skip
        seed_everything(cfg.seed)  # the same heads on every process
        encoder, encoder_desc = load_pretrained_encoder(cfg.encoder, drop_path_rate=cfg.drop_path_rate)
        encoder.set_grad_checkpointing(cfg.runtime.grad_checkpointing)
        try:
            model = SegmentationModel(
                encoder, data.num_classes, crop_size=data.crop_size, channels=m.channels, aux_channels=m.aux_channels,
                pool_scales=m.pool_scales, dropout=m.dropout, layer_scale=m.layer_scale,
            )  # fmt: skip
        except ValueError as e:
            raise ConfigError(f"data.crop_size: {e}") from e
        dist.synchronise_batchnorm(model.to(device), device)  # in place: the root is not a BatchNorm
        crop = cfg.eval.crop or data.crop_size
        names = list(data.class_names) if data.class_names is not None else [str(i) for i in range(data.num_classes)]
        spec = segmenter_spec(
            model, class_names=names, ignore_index=data.ignore_index, reduce_zero_label=data.reduce_zero_label,
            scale=cfg.eval.scale, mode=cfg.eval.mode, crop=crop, stride=cfg.eval.stride,
        )  # fmt: skip
        loader, sampler, batches_per_epoch = seeded_loader(
            train_set, batch_size=cfg.batch_size, seed=cfg.seed, num_workers=data.num_workers, device=device,
            key="data.train_images", collate=collate_segmentation,
        )  # fmt: skip
        d = derive(cfg, dist.world_size(), batches_per_epoch)
        schedule = PolySchedule(d.lr, d.total_steps, d.warmup_steps, sch.min_lr, sch.warmup_ratio, sch.power)
        groups = layer_decay_groups(model, cfg.optim.weight_decay, cfg.layer_decay, cfg.optim.wd_exempt_tokens)
        optimizer = build_adamw(groups, cfg.optim, d.lr, device)
        train_module = dist.wrap_ddp(model, device)
        val = eval_loader(val_set, 1, data.num_workers, device, collate=collate_segmentation)
        protect_workers(val)  # a SIGTERM during an evaluation leaves its workers alive: the run stops after a step
        report = SkipReport(max_skip_fraction=data.max_skip_fraction)
        every = cfg.eval.every_steps
        with Session(cfg, d, run, model=model, optimizer=optimizer, sync_module=train_module, schedule=schedule) as s:
            s.extra["spec"] = spec
            n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
            s.log.info(run.header("segment"))
            s.log.info(f"encoder: {encoder_desc}; drop path {cfg.drop_path_rate}")
            s.log.info(
                f"model: features after blocks {[b + 1 for b in model.blocks]} of {len(encoder.blocks)}, position "
                f"table resampled to {encoder.grid_size[0]}x{encoder.grid_size[1]}, UperNet "
                f"{model.decode_head.conv_seg.in_channels} channels, auxiliary FCN {m.aux_channels} (weight "
                f"{m.aux_weight}), dropout {m.dropout}, LayerScale {m.layer_scale}; {n_params / 1e6:.2f} M trainable "
                "params"
            )
            s.log.info(
                f"data: {len(train_set)} train / {len(val_set)} eval pairs; {labels.describe()}; crop "
                f"{data.crop_size}, resize {list(data.scale)} x {list(data.ratio_range)}, cat_max_ratio "
                f"{data.cat_max_ratio}, flip {data.hflip}, photometric {data.photometric}; eval resize "
                f"{list(cfg.eval.scale)}, {cfg.eval.mode}"
                + (f" {crop} stride {cfg.eval.stride}" if cfg.eval.mode == "slide" else "")
            )
            length = f"{d.total_steps} iterations (schedule.iters)" if sch.iters else f"{sch.epochs} epochs"
            s.log.info(
                f"AdamW (betas {tuple(cfg.optim.betas)}, wd {cfg.optim.weight_decay}), layer decay {cfg.layer_decay}; "
                f"{length} over {d.epochs} epoch(s): linear warm-up {d.warmup_steps} from {sch.warmup_ratio:g} x lr, "
                f"then poly (power {sch.power}) to {sch.min_lr:g}; evaluation "
                + (f"every {every} steps and at the end" if every else "at the end")
            )
            if cfg.encoder.pretrained is None:
                s.log.warning("the encoder is RANDOM: this trains from scratch, not from a pretrained model")
            if dist.world_size() > 1 and device.type != "cuda":
                s.log.info("BatchNorm statistics are all-reduced over the processes (SyncBN's role on GPUs)")
            with s.training():
                while s.epochs_left():
                    model.train()
                    batches = s.epoch_batches(loader, sampler)
                    while s.steps_left():
                        if s.train_step(_loss, batches, s, train_module, model, cfg, report) is None:
                            break  # the loader ran short: end_epoch says so
                        if every and s.state.step % every == 0 and s.state.step < d.stop_step:
                            _evaluate(s, model, val, cfg, names)  # before end_step: its checkpoint holds it
                            model.train()
                        s.end_step()
                    if s.end_epoch(report):
                        s.save_epoch()
            # a last, partial epoch (schedule.iters, schedule.max_steps) is not closed: its skips join the run's here
            report.all_reduce(device if device.type == "cuda" else None)
            s.run_report.merge(report)
            if not s.evaluated():  # the end of the run (or a resume after the end without its evaluation)
                _evaluate(s, model, val, cfg, names)
            s.save_last()
            final = s.eval_history[-1]
            segmenter = run.run_dir / "segmenter.pt"
            scores = {k: final[k] for k in ("mIoU", "mAcc", "aAcc", "IoU", "Acc")}
            if dist.is_main():
                blob = {"model": model.state_dict(), "spec": spec, "config": to_dict(cfg), "class_names": names,
                        "metrics": scores}  # fmt: skip
                atomic_save(blob, segmenter)
            summary: Metrics = {
                **scores, "max_mIoU": max(h["mIoU"] for h in s.eval_history), "eval_images": final["images"],
                "eval_skipped": final["val_data"],
            }  # fmt: skip
            text = f"{describe_scores(final)} on {final['images']} images"
            return finish_run(s, "segment", summary, {"segmenter": str(segmenter)}, text, run.t_start)


def split_pairs(data: SegDataConfig, split: Literal["train", "val"]) -> list[tuple[Path, Path]]:
    """The ``(image, label)`` pairs of a split, from the config's folders (relative ones under ``data.root``).

    Raises:
        ConfigError: A folder is missing or holds no images (the message names the key).
    """
    folders = []
    for kind in ("images", "labels"):
        key = f"{split}_{kind}"
        path = Path(getattr(data, key)).expanduser()
        if not path.is_absolute():
            path = Path(data.root or ".").expanduser() / path
        if not path.is_dir():
            raise ConfigError(f"data.{key}: {path} is not a folder (data.root={data.root})")
        folders.append(path)
    try:
        pairs = find_pairs(*folders)
    except FileNotFoundError as e:
        raise ConfigError(f"data.{split}_images: {e}") from e
    return pairs[: data.train_limit if split == "train" else data.val_limit]


def _loss(
    batch: tuple[Batch, torch.Tensor],
    s: Session,
    train_module: nn.Module,
    model: SegmentationModel,
    cfg: SegmentConfig,
    report: SkipReport,
) -> StepOutput:
    """The decode + auxiliary cross-entropy of one batch of crops (its mask noise is not used)."""
    data = check_labels(batch[0])  # a label value no class has stops the run, before an all-bad batch is skipped
    report.update(data)
    device = s.opt.device
    if data.empty:
        return StepOutput(zero_loss(model, device), 0, len(data.skipped))
    torch.manual_seed(mix_seeds(cfg.seed, s.state.epoch, s.state.batch_in_epoch, dist.rank()))  # dropout, drop path
    images = data.images.to(device, non_blocking=True)  # (B, 3, c, c)
    labels = data.labels.to(device, non_blocking=True)  # (B, c, c)
    logits, aux = train_module(images)
    m, ignore = cfg.model, cfg.data.ignore_index
    loss = segmentation_loss(logits, labels, ignore_index=ignore, aux_logits=aux, aux_weight=m.aux_weight)
    return StepOutput(loss, len(images), len(data.skipped))


def _evaluate(s: Session, model: SegmentationModel, val: Iterable[Batch], cfg: SegmentConfig, names: list[str]) -> None:
    """mIoU, mAcc, aAcc and the per-class IoU / accuracy on the evaluation pairs, recorded."""
    t0 = time.perf_counter()
    model.eval()
    device = s.opt.device
    report = SkipReport(max_skip_fraction=cfg.data.max_skip_fraction)
    e = cfg.eval
    areas, n = segmentation_areas(
        model, val, device, s.opt.dtype, mode=e.mode, crop=e.crop or cfg.data.crop_size, stride=e.stride,
        ignore_index=cfg.data.ignore_index, report=report,
        progress=cfg.log.progress and dist.is_main(),
    )  # fmt: skip
    report.all_reduce(device if device.type == "cuda" else None)
    report.check("data.val_images")  # no usable pair, or too many skipped
    scores = segmentation_scores(areas, names)
    metrics: Metrics = {
        "mIoU": scores["mIoU"], "mAcc": scores["mAcc"], "aAcc": scores["aAcc"], "images": n, "IoU": scores["IoU"],
        "Acc": scores["Acc"], "val_skipped": report.skipped, "val_data": report.as_dict(),
    }  # fmt: skip
    s.record_eval(metrics, time.perf_counter() - t0, describe_scores(metrics))


def describe_scores(metrics: Metrics) -> str:
    """``"mIoU 45.12  mAcc 56.01  aAcc 81.30"`` (and the unreadable evaluation pairs, if any)."""
    skipped = metrics.get("val_skipped")
    return f"mIoU {metrics['mIoU']:.2f}  mAcc {metrics['mAcc']:.2f}  aAcc {metrics['aAcc']:.2f}" + (
        f"; {skipped} unreadable eval pairs skipped" if skipped else ""
    )


def add_arguments(parser: argparse.ArgumentParser, command: str) -> None:
    add_run_arguments(
        parser, "configs/segment/camvid_tiny_cpu.yaml",
        overrides_example="data.root=DIR encoder.pretrained=runs/demo/checkpoints/last.pt",
    )  # fmt: skip


def run(args: argparse.Namespace) -> int:
    return run_job(args, SegmentConfig, check_segment, segment)
