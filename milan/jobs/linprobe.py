"""``milan linprobe``: linear probe of a frozen pretrained encoder (the MAE / MILAN recipe).

Sources: the original MILAN code (github.com/zejiangh/MILAN ``main_linprobe.py``, ``models_probe.py``,
``util/lars.py``) and mmpretrain 1.2.0's ``configs/milan/benchmarks/vit-base-p16_8xb2048-linear-coslr-100e_in1k.py``.

Feature: the CLS token after the encoder's final LayerNorm. Head: ``BatchNorm1d(affine=False, eps=1e-6)`` then a
Linear (init ``trunc_normal(std=0.01)``). Optimizer: LARS (momentum 0.9, trust coefficient 0.001, weight decay 0),
``lr = blr x effective batch / 256`` (MILAN: 0.05 x 16384 / 256 = 3.2), 10 warm-up epochs then a cosine to 0 over
100 epochs, per iteration. Training view: RandomResizedCrop (bicubic) + flip; evaluation: Resize 256 + CenterCrop 224.

``optim.lr_grid=[0.5, 1, 2, ...]`` trains one head per lr factor in the same pass over the frozen encoder
(:class:`~milan.models.lr_grid.LinearProbeGrid`) and reports the best on the validation split (DINOv2's protocol;
the selection uses the evaluation split, so report the grid as such). ``RUN/classifier.pt`` holds the chosen head as
a :class:`~milan.models.classifier.LinearProbe` (``milan evaluate --checkpoint RUN/classifier.pt``).

Launch on several GPUs with ``torchrun --nproc_per_node N -m milan linprobe ...``.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn as nn

from milan import distributed as dist
from milan.checkpoint.io import atomic_save
from milan.checkpoint.spec import HeadSpec, ModelSpec
from milan.data import Batch, SkipReport, describe_found, eval_loader, pretrain_transform, seeded_loader
from milan.jobs.classifier import (
    FitResult,
    classifier_spec,
    describe_topk,
    finish_run,
    input_size,
    labelled_splits,
    load_pretrained_encoder,
    topk_summary,
    validate,
)
from milan.jobs.launch import add_run_arguments, run_job
from milan.models.lr_grid import LinearProbeGrid, grid_cross_entropy, save_lr_grid_plot
from milan.train.config import LinprobeConfig, check_linprobe, derive, to_dict
from milan.train.lars import LARS
from milan.train.loop import StepOutput, protect_workers, zero_loss
from milan.train.optim import param_groups
from milan.train.run import seed_everything, start_run
from milan.train.session import Metrics, Session

COMMANDS = {"linprobe": "linear probe of a pretrained encoder (BN + linear head, LARS)"}


def linprobe(cfg: LinprobeConfig, resume: str | None = None) -> FitResult:
    """Runs a linear probe (``resume``: see :func:`milan.train.run.start_run`); every process returns the result."""
    check_linprobe(cfg)
    with start_run(cfg.out_dir, cfg.runtime, resume, schedule=cfg.schedule, done_file="results.json") as run:
        if run.finished is not None:
            return FitResult.of_finished(run.run_dir, run.finished)
        device, data = run.device, cfg.data
        seed_everything(cfg.seed)  # the same heads on every process
        encoder, encoder_desc = load_pretrained_encoder(cfg.encoder)
        size = input_size(data.img_size, encoder)
        view = pretrain_transform(
            size, scale=data.scale, interpolation=data.interpolation, hflip=data.hflip, draft=data.draft,
            crop=data.crop_geometry,
        )  # fmt: skip
        train_set, val_set, num_classes = labelled_splits(data, view, size, cfg.num_classes)
        model = LinearProbeGrid(encoder, num_classes, cfg.optim.lr_grid).to(device)
        seed_everything(cfg.seed + dist.rank())
        loader, sampler, batches_per_epoch = seeded_loader(
            train_set, batch_size=cfg.batch_size, seed=cfg.seed, num_workers=data.num_workers, device=device,
            key="data.train",
        )  # fmt: skip
        d = derive(cfg, dist.world_size(), batches_per_epoch)
        train_module = dist.wrap_ddp(model, device)
        val = eval_loader(val_set, cfg.batch_size, data.num_workers, device)
        protect_workers(val)  # a SIGTERM during an evaluation leaves its workers alive: the run stops after a step
        report = SkipReport(max_skip_fraction=data.max_skip_fraction)
        lrs = [d.lr * scale for scale in model.lr_scales]
        head = HeadSpec("linear_probe", num_classes, list(train_set.classes), "token")
        spec = classifier_spec(encoder, head, data)
        o = cfg.optim  # LARS over the heads: one group pair per head (decayed / not, by the one rule), its lr scale
        groups = [{**g, "lr_scale": scale} for fc, scale in zip(model.fcs, model.lr_scales, strict=True)
                  for g in param_groups(fc, o.weight_decay)]  # fmt: skip
        optimizer = LARS(
            groups, lr=d.lr, momentum=o.momentum, weight_decay=o.weight_decay, trust_coefficient=o.trust_coefficient,
            variant=o.lars_variant,
        )  # fmt: skip
        with Session(cfg, d, run, model=model, optimizer=optimizer, sync_module=train_module) as s:
            s.extra["spec"] = _head_spec(spec, lrs, s.eval_history, grid=True)  # the best head of the last evaluation
            s.log.info(run.header("linprobe"))
            s.log.info(f"encoder: {encoder_desc}; frozen, CLS token after the final norm, {size} px")
            s.log.info(f"train: {describe_found(train_set, unit=f'{d.steps_per_epoch} steps per epoch')}")
            s.log.info(f"val: {describe_found(val_set)}; {num_classes} classes")
            s.log.info(
                f"LARS ({o.lars_variant}, momentum {o.momentum}, trust {o.trust_coefficient}, wd {o.weight_decay}); "
                f"lr grid {[f'{lr:.4g}' for lr in lrs]} ({len(lrs)} head(s), one pass"
                + ("; the logged loss is the sum of the heads' losses)" if len(lrs) > 1 else ")")
            )
            if cfg.encoder.pretrained is None:
                s.log.warning("the encoder is RANDOM: this measures a random-feature baseline, not pretraining")
            with s.training():
                while s.epochs_left():
                    model.train()
                    batches = s.epoch_batches(loader, sampler)
                    while s.steps_left():
                        if s.train_step(_loss, batches, train_module, model, report) is None:
                            break  # the loader ran short: end_epoch says so
                        s.end_step()
                    if s.end_epoch(report):
                        if s.eval_due(cfg.eval_every):
                            _evaluate(s, model, val, lrs, cfg, spec)
                        s.save_epoch()
            if not s.evaluated():  # stopped inside an epoch, or resumed after the end without the evaluation
                _evaluate(s, model, val, lrs, cfg, spec)
            s.save_last()
            final = s.eval_history[-1]
            best = int(final["best_head"])
            path = run.run_dir / "classifier.pt"
            fields: Metrics = {"classifier": str(path), "best_lr": final["best_lr"], "best_head": best}
            if dist.is_main():
                metrics = {"top1": final["top1"], "top5": final["top5"], "lr": final["best_lr"]}
                legacy = {"num_heads": encoder.num_heads, "kind": "linear_probe"}  # what pre-spec readers read
                blob = {"model": model.probe_state_dict(best), "spec": _head_spec(spec, lrs, s.eval_history, False)}
                atomic_save({**blob, "milan": legacy, "config": to_dict(cfg), "metrics": metrics}, path)
                if cfg.log.plot:
                    fields["lr_grid_plot"] = str(save_lr_grid_plot(s.eval_history, run.run_dir / "lr_grid.png"))
            result = topk_summary(s.eval_history)
            text = f"{describe_grid(final)}; best epoch top-1 {result['max_top1']:.2f}"
            plot = fields.get("lr_grid_plot")
            return finish_run(s, "linprobe", result, {**fields, "heads": final["heads"]}, text, run.t_start, plot)


def _loss(
    batch: tuple[Batch, torch.Tensor], train_module: nn.Module, model: LinearProbeGrid, report: SkipReport
) -> StepOutput:
    """The sum of the heads' cross-entropies on one labelled batch (its mask noise is not used)."""
    data, _ = batch
    report.update(data)
    device = next(model.parameters()).device
    if len(data) < 2:  # BatchNorm cannot train on one image (the rest of the batch was unreadable)
        return StepOutput(zero_loss(model, device), 0, len(data.skipped))
    logits = train_module(data.images.to(device, non_blocking=True))  # (K, B, C)
    loss = grid_cross_entropy(logits, data.labels.to(device, non_blocking=True))
    return StepOutput(loss, len(data), len(data.skipped))


def _evaluate(
    s: Session, model: LinearProbeGrid, val: Iterable[Batch], lrs: list[float], cfg: LinprobeConfig, spec: ModelSpec
) -> None:
    """Every head's accuracy on data.val, recorded; the checkpoints' spec names the best head from now on."""
    t0 = time.perf_counter()
    # Each process's BatchNorm saw only its own batches: every process (and the checkpoint) evaluates their average
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None and m.running_var is not None:
            m.running_mean.copy_(dist.all_reduce_mean(m.running_mean))
            m.running_var.copy_(dist.all_reduce_mean(m.running_var))
    model.eval()
    heads, report = validate(model, val, cfg.data, s.opt.device, s.opt.dtype, num_heads=len(lrs))
    top1 = [h["top1"] for h in heads]
    best = top1.index(max(top1))
    metrics: Metrics = {
        "top1": heads[best]["top1"], "top5": heads[best]["top5"], "best_lr": lrs[best], "best_head": best,
        "heads": [{"lr": lr, **h} for lr, h in zip(lrs, heads, strict=True)], "val_skipped": report.skipped,
        "val_data": report.as_dict(),
    }  # fmt: skip
    s.record_eval(metrics, time.perf_counter() - t0, describe_grid(metrics))
    s.extra["spec"] = _head_spec(spec, lrs, s.eval_history, grid=True)


def _head_spec(spec: ModelSpec, lrs: list[float], history: list[Metrics], grid: bool) -> dict[str, Any]:
    """The spec of the last evaluation's best head: in the grid (training checkpoints) or alone (classifier.pt)."""
    assert spec.head is not None
    best = int(history[-1]["best_head"]) if history else None
    lr = lrs[best] if best is not None else None
    head = dataclasses.replace(spec.head, lr=lr, grid_index=best if grid else None)
    return dataclasses.replace(spec, head=head).to_dict()


def describe_grid(metrics: Metrics) -> str:
    """``"top-1 78.90  top-5 94.10 at lr 3.2 (winner of 5 heads)"``: the best head's numbers and its lr."""
    heads = metrics["heads"]
    return f"{describe_topk(metrics)} at lr {metrics['best_lr']:.4g}" + (
        f" (winner of {len(heads)} heads)" if len(heads) > 1 else ""
    )


def add_arguments(parser: argparse.ArgumentParser, command: str) -> None:
    add_run_arguments(parser, "configs/linprobe/cifar10_tiny_cpu.yaml")


def run(args: argparse.Namespace) -> int:
    return run_job(args, LinprobeConfig, check_linprobe, linprobe)
