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
from typing import Any

import torch

from milan import distributed as dist
from milan.checkpoint.io import atomic_save
from milan.checkpoint.spec import HeadSpec
from milan.data import SkipReport, describe_found, eval_loader, pretrain_transform, seeded_loader
from milan.jobs.classifier import (
    FitResult,
    checked_val_report,
    classifier_spec,
    classifier_step,
    describe_topk,
    labelled_splits,
    sync_batchnorm_stats,
    train_classifier,
)
from milan.jobs.encoder import input_size, load_pretrained_encoder
from milan.jobs.launch import add_run_arguments, run_job
from milan.models.lr_grid import LinearProbeGrid, grid_cross_entropy, save_lr_grid_plot
from milan.train.config import LinprobeConfig, check_linprobe, derive, to_dict
from milan.train.evaluation import evaluate_heads
from milan.train.lars import LARS
from milan.train.loop import autocast_context, zero_loss
from milan.train.optim import param_groups
from milan.train.run import seed_everything, start_run
from milan.train.trainer import Evaluation, Metrics, Trainer, protect_workers


def linprobe(cfg: LinprobeConfig, resume: str | None = None) -> FitResult:
    """Runs a linear probe.

    Args:
        cfg: The validated config.
        resume: ``"auto"``, a checkpoint path, or ``None`` (see :func:`milan.train.run.start_run`).

    Returns:
        The run's result (every process; only the main one writes files).
    """
    check_linprobe(cfg)
    with start_run(cfg.out_dir, cfg.runtime, resume, schedule=cfg.schedule, done_file="results.json") as run:
        if run.finished is not None:
            return FitResult.of_finished(run.run_dir, run.finished)
        device, dtype, run_dir, data = run.device, run.dtype, run.run_dir, cfg.data
        seed_everything(cfg.seed)  # the same heads on every process
        encoder, encoder_desc = load_pretrained_encoder(cfg.encoder)
        size = input_size(cfg.data.img_size, encoder)
        view = pretrain_transform(
            size, scale=data.scale, interpolation=data.interpolation, hflip=data.hflip, draft=data.draft,
            crop=data.crop_geometry,
        )  # fmt: skip
        train_set, val_set, num_classes = labelled_splits(data, view, size, cfg.num_classes)
        model = LinearProbeGrid(encoder, num_classes, cfg.optim.lr_grid).to(device)
        seed_everything(cfg.seed + dist.rank())
        loader, sampler, batches = seeded_loader(
            train_set, batch_size=cfg.batch_size, seed=cfg.seed, num_workers=data.num_workers, device=device,
            key="data.train",
        )  # fmt: skip
        d = derive(cfg, dist.world_size(), batches)
        train_module = dist.wrap_ddp(model, device)
        o = cfg.optim
        groups = [{**g, "lr_scale": s} for fc, s in zip(model.fcs, model.lr_scales, strict=True)
                  for g in param_groups(fc, o.weight_decay)]  # fmt: skip
        optimizer = LARS(
            groups, lr=d.lr, momentum=o.momentum, weight_decay=o.weight_decay,
            trust_coefficient=o.trust_coefficient, variant=o.lars_variant,
        )  # fmt: skip
        val = eval_loader(val_set, cfg.batch_size, data.num_workers, device)
        report = SkipReport(max_skip_fraction=data.max_skip_fraction)
        lrs = [d.lr * s for s in model.lr_scales]

        def spec(index: int | None, grid: bool) -> dict[str, Any]:
            """The model spec: of the grid's head ``index`` (training checkpoints) or of ``classifier.pt``."""
            lr = lrs[index] if index is not None else None
            head = HeadSpec("linear_probe", num_classes, list(train_set.classes), "token", lr, index if grid else None)
            return classifier_spec(encoder, head, data).to_dict()

        def extra_state() -> dict[str, Any]:  # training checkpoints name the best head of the last evaluation
            last = trainer.eval_history[-1] if trainer.eval_history else None
            return {"spec": spec(int(last["best_head"]) if last else None, grid=True)}

        def forward(images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
            if images.shape[0] < 2:  # BatchNorm cannot train on one image (the rest of the batch was unreadable)
                return zero_loss(model, device), 0
            logits = train_module(images)  # (K, B, C)
            return grid_cross_entropy(logits, labels), int(labels.shape[0])

        def evaluate() -> Metrics:
            sync_batchnorm_stats(model)  # every process (and the checkpoint) evaluates the same statistics
            model.eval()
            val_report = SkipReport(max_skip_fraction=data.max_skip_fraction)
            heads = evaluate_heads(
                model, val, device, num_heads=len(model.lr_scales), ctx=lambda: autocast_context(device, dtype),
                report=val_report,
            )  # fmt: skip
            checked_val_report(val_report, device)
            best = max(range(len(heads)), key=lambda i: heads[i]["top1"])
            table = [{"lr": lr, **h} for lr, h in zip(lrs, heads, strict=True)]
            return {"top1": heads[best]["top1"], "top5": heads[best]["top5"], "best_lr": lrs[best],
                    "best_head": best, "heads": table, "val_skipped": val_report.skipped,
                    "val_data": val_report.as_dict()}  # fmt: skip

        def export(final: Metrics) -> Metrics:
            best = int(final["best_head"])
            path = run_dir / "classifier.pt"
            if dist.is_main():
                atomic_save(
                    {
                        "model": model.probe_state_dict(best),
                        "spec": spec(best, grid=False),
                        "milan": {"num_heads": encoder.num_heads, "kind": "linear_probe"},  # pre-spec readers
                        "config": to_dict(cfg),
                        "metrics": {"top1": final["top1"], "top5": final["top5"], "lr": final["best_lr"]},
                    },
                    path,
                )
            fields: Metrics = {"classifier": str(path), "best_lr": final["best_lr"], "best_head": best}
            if dist.is_main() and cfg.log.plot:
                fields["lr_grid_plot"] = str(save_lr_grid_plot(trainer.eval_history, run_dir / "lr_grid.png"))
            return {**fields, "heads": final["heads"]}

        protect_workers(val)  # a SIGTERM during an evaluation leaves its workers alive: the run stops after a step
        trainer = Trainer(
            cfg, d, run_dir, model=model, train_module=train_module, optimizer=optimizer,
            step_fn=classifier_step(forward, model, device, report), loader=loader, sampler=sampler, report=report,
            device=device, dtype=dtype, resume_from=run.resume_from, extra_state=extra_state,
            evaluation=Evaluation(evaluate, every_epochs=cfg.eval_every, describe=describe_grid),
        )  # fmt: skip
        log = trainer.log
        log.info(run.header("linprobe"))
        log.info(f"encoder: {encoder_desc}; frozen, CLS token after the final norm, {size} px")
        log.info(f"train: {describe_found(train_set, unit=f'{d.steps_per_epoch} steps per epoch')}")
        log.info(f"val: {describe_found(val_set)}; {num_classes} classes")
        log.info(
            f"LARS ({o.lars_variant}, momentum {o.momentum}, trust {o.trust_coefficient}, wd {o.weight_decay}); "
            f"lr grid {[f'{d.lr * s:.4g}' for s in model.lr_scales]} ({len(model.lr_scales)} head(s), one pass"
            + ("; the logged loss is the sum of the heads' losses)" if len(model.lr_scales) > 1 else ")")
        )
        if cfg.encoder.pretrained is None:
            log.warning("the encoder is RANDOM: this measures a random-feature baseline, not pretraining")
        return train_classifier(trainer, "linprobe", export, run.t_start, describe=describe_grid)


def describe_grid(metrics: Metrics) -> str:
    """``"top-1 78.90  top-5 94.10 at lr 3.2 (winner of 5 heads)"``: the best head's numbers and its lr."""
    heads = metrics.get("heads") or []
    text = describe_topk(metrics)
    if "best_lr" not in metrics:
        return text
    return f"{text} at lr {metrics['best_lr']:.4g}" + (f" (winner of {len(heads)} heads)" if len(heads) > 1 else "")


# ----------------------------------------------------------------------------------------------------------------
# Command line


def add_arguments(parser: argparse.ArgumentParser, command: str) -> None:
    """Adds ``milan linprobe``'s arguments."""
    add_run_arguments(parser, "configs/linprobe/cifar10_tiny_cpu.yaml")


def run(args: argparse.Namespace) -> int:
    """Runs ``milan linprobe``; returns the exit status."""

    def job(cfg: LinprobeConfig, a: argparse.Namespace) -> Any:
        return linprobe(cfg, resume=a.resume)

    return run_job("linprobe", LinprobeConfig, check_linprobe, job, args)


__all__ = ["add_arguments", "input_size", "linprobe", "run"]
