"""``milan linprobe``: linear probe of a frozen pretrained encoder (MAE / MILAN recipe, ``milan_reference.md`` §3).

Feature: the CLS token after the encoder's final LayerNorm. Head: ``BatchNorm1d(affine=False, eps=1e-6)`` then a
Linear (init ``trunc_normal(std=0.01)``). Optimizer: LARS (momentum 0.9, trust coefficient 0.001, weight decay 0),
``lr = blr x effective batch / 256`` (MILAN: 0.05 x 16384 / 256 = 3.2), 10 warm-up epochs then a cosine to 0 over
100 epochs, per iteration. Training view: RandomResizedCrop (bicubic) + flip; evaluation: Resize 256 + CenterCrop 224.

``optim.lr_grid=[0.5, 1, 2, ...]`` trains one head per lr factor in the same pass over the frozen encoder
(:class:`~milan.eval.lr_grid.LinearProbeGrid`) and reports the best on the validation split (DINOv2's protocol;
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
from milan.data import SkipReport
from milan.engine.cli import add_run_arguments, run_job
from milan.engine.config import derive, to_dict
from milan.engine.lars import LARS
from milan.engine.loop import autocast_context
from milan.engine.run import seed_everything, start_run
from milan.engine.sampling import seeded_loader
from milan.engine.trainer import Evaluation, Metrics, Trainer, protect_workers
from milan.eval.classify import evaluate_heads
from milan.eval.config import LinprobeConfig, check_linprobe
from milan.eval.data import describe_split, eval_loader, probe_pipeline
from milan.eval.jobs import (
    FitResult,
    classifier_step,
    describe_topk,
    labelled_splits,
    sync_batchnorm_stats,
    train_classifier,
)
from milan.eval.lr_grid import LinearProbeGrid, grid_cross_entropy
from milan.eval.pretrained import input_size, load_pretrained_encoder


def linprobe(cfg: LinprobeConfig, resume: str | None = None) -> FitResult:
    """Runs a linear probe.

    Args:
        cfg: The validated config.
        resume: ``"auto"``, a checkpoint path, or ``None`` (see :func:`milan.engine.run.resolve_run_dir`).

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
        train_set, val_set, num_classes = labelled_splits(data, probe_pipeline(data, size), size, cfg.num_classes)
        model = LinearProbeGrid(encoder, num_classes, cfg.optim.lr_grid).to(device)
        seed_everything(cfg.seed + dist.rank())
        loader, sampler, batches = seeded_loader(
            train_set, batch_size=cfg.batch_size, seed=cfg.seed, num_workers=data.num_workers, device=device,
            key="data.train",
        )  # fmt: skip
        d = derive(cfg, dist.world_size(), batches)
        train_module = dist.wrap_ddp(model, device)
        o = cfg.optim
        optimizer = LARS(
            model.param_groups(o.weight_decay), lr=d.lr, momentum=o.momentum, weight_decay=o.weight_decay,
            trust_coefficient=o.trust_coefficient, variant=o.lars_variant,
        )  # fmt: skip
        val = eval_loader(val_set, cfg.batch_size, data.num_workers, device)
        report = SkipReport()

        def forward(images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
            logits = train_module(images)  # (K, B, C)
            return grid_cross_entropy(logits, labels), int(labels.shape[0])

        def evaluate() -> Metrics:
            sync_batchnorm_stats(model)  # every process (and the checkpoint) evaluates the same statistics
            model.eval()
            heads = evaluate_heads(
                model, val, device, num_heads=len(model.lr_scales), ctx=lambda: autocast_context(device, dtype)
            )
            best = max(range(len(heads)), key=lambda i: heads[i]["top1"])
            table = [{"lr": d.lr * s, **h} for s, h in zip(model.lr_scales, heads, strict=True)]
            return {"top1": heads[best]["top1"], "top5": heads[best]["top5"], "best_lr": d.lr * model.lr_scales[best],
                    "best_head": best, "heads": table}  # fmt: skip

        def export(final: Metrics) -> Metrics:
            best = int(final["best_head"])
            path = run_dir / "classifier.pt"
            if dist.is_main():
                atomic_save(
                    {
                        "model": model.probe_state_dict(best),
                        "milan": {"num_heads": encoder.num_heads, "kind": "linear_probe"},
                        "config": to_dict(cfg),
                        "metrics": {"top1": final["top1"], "top5": final["top5"], "lr": final["best_lr"]},
                    },
                    path,
                )
            return {"classifier": str(path), "best_lr": final["best_lr"], "heads": final["heads"]}

        protect_workers(val)  # a SIGTERM during an evaluation leaves its workers alive: the run stops after a step
        trainer = Trainer(
            cfg, d, run_dir, model=model, train_module=train_module, optimizer=optimizer,
            step_fn=classifier_step(forward, model, device, report), loader=loader, sampler=sampler, report=report,
            device=device, dtype=dtype, resume_from=run.resume_from,
            evaluation=Evaluation(evaluate, every_epochs=cfg.eval_every, describe=describe_topk),
        )  # fmt: skip
        log = trainer.log
        log.info(run.header("linprobe"))
        log.info(f"encoder: {encoder_desc}; frozen, CLS token after the final norm, {size} px")
        log.info(f"train: {describe_split(train_set)}; val: {describe_split(val_set)}; {num_classes} classes")
        log.info(
            f"LARS ({o.lars_variant}, momentum {o.momentum}, trust {o.trust_coefficient}, wd {o.weight_decay}); "
            f"lr grid {[f'{d.lr * s:.4g}' for s in model.lr_scales]} ({len(model.lr_scales)} head(s), one pass"
            + ("; the logged loss is the sum of the heads' losses)" if len(model.lr_scales) > 1 else ")")
        )
        if cfg.encoder.pretrained is None:
            log.warning("the encoder is RANDOM: this measures a random-feature baseline, not pretraining")
        return train_classifier(trainer, "linprobe", export, run.t_start)


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
