"""``milan finetune``: end-to-end fine-tuning of a pretrained encoder (the MAE / MILAN recipe).

Sources: the original MILAN code (github.com/zejiangh/MILAN ``main_finetune.py``, ``FINETUNE.sh``,
``util/lr_decay.py``) and mmpretrain 1.2.0's ``configs/milan/benchmarks/vit-base-p16_8xb128-coslr-100e_in1k.py``.

Model: :class:`~milan.models.classifier.FinetuneClassifier`: the mean of the patch tokens (CLS excluded), a new
LayerNorm, a Linear head (init std 0.02); the pretrained final norm is dropped; drop path 0.1 (ViT-L 0.2).
Optimizer: AdamW (betas 0.9/0.999, wd 0.05) with layer-wise lr decay 0.65 (ViT-L 0.75):
:func:`~milan.train.optim.layer_decay_groups`; ``lr = 1e-4 x effective batch / 256`` (4e-4 at 1024),
5 warm-up epochs, cosine to 1e-6 over 100 epochs. Augmentation (timm): RandAugment ``rand-m9-mstd0.5-inc1``, random
erasing 0.25, Mixup 0.8 / CutMix 1.0 with label smoothing 0.1 (soft-target cross-entropy). Evaluation: Resize 256
bicubic + CenterCrop 224, top-1 / top-5. Optional EMA of the weights (``ema.enabled=true``, evaluated alongside).

``RUN/classifier.pt`` (and ``RUN/classifier_ema.pt``) are read by ``milan evaluate``.
"""

from __future__ import annotations

import argparse
from typing import Any

import torch
import torch.nn as nn

from milan import distributed as dist
from milan.checkpoint.io import atomic_save
from milan.checkpoint.spec import HeadSpec
from milan.data import SkipReport, describe_found, eval_loader, finetune_transform, seeded_loader
from milan.jobs.classifier import (
    FitResult,
    checked_val_report,
    classifier_spec,
    classifier_step,
    describe_topk,
    labelled_splits,
    train_classifier,
)
from milan.jobs.encoder import input_size, load_pretrained_encoder
from milan.jobs.launch import add_run_arguments, run_job
from milan.models.classifier import FinetuneClassifier
from milan.models.compile import compile_method
from milan.train.config import AugmentConfig, FinetuneConfig, check_finetune, derive, to_dict
from milan.train.evaluation import evaluate_heads
from milan.train.loop import TrainState, autocast_context, zero_loss
from milan.train.optim import build_adamw, layer_decay_groups
from milan.train.run import seed_everything, start_run
from milan.train.trainer import Evaluation, Metrics, Trainer, protect_workers


def mixup_and_criterion(aug: AugmentConfig, num_classes: int) -> tuple[Any, nn.Module]:
    """The Mixup/CutMix function of timm (or ``None``) and the matching loss, as ORIG ``main_finetune.py`` pairs them.

    Mixup/CutMix on: ``SoftTargetCrossEntropy`` on the mixed, smoothed targets; otherwise label-smoothing
    cross-entropy (or plain cross-entropy with ``label_smoothing=0``).
    """
    from timm.data.mixup import Mixup
    from timm.loss.cross_entropy import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

    if aug.mixup > 0 or aug.cutmix > 0:
        mixup = Mixup(  # type: ignore[no-untyped-call]
            mixup_alpha=aug.mixup, cutmix_alpha=aug.cutmix, prob=aug.mixup_prob, switch_prob=aug.switch_prob,
            mode=aug.mixup_mode, label_smoothing=aug.label_smoothing, num_classes=num_classes,
        )  # fmt: skip
        return mixup, SoftTargetCrossEntropy()  # type: ignore[no-untyped-call]
    if aug.label_smoothing > 0:
        return None, LabelSmoothingCrossEntropy(smoothing=aug.label_smoothing)  # type: ignore[no-untyped-call]
    return None, nn.CrossEntropyLoss()


def finetune(cfg: FinetuneConfig, resume: str | None = None) -> FitResult:
    """Runs fine-tuning.

    Args:
        cfg: The validated config.
        resume: ``"auto"``, a checkpoint path, or ``None`` (see :func:`milan.train.run.start_run`).

    Returns:
        The run's result (every process; only the main one writes files).
    """
    check_finetune(cfg)
    with start_run(cfg.out_dir, cfg.runtime, resume, schedule=cfg.schedule, done_file="results.json") as run:
        if run.finished is not None:
            return FitResult.of_finished(run.run_dir, run.finished)
        device, dtype, run_dir, data = run.device, run.dtype, run.run_dir, cfg.data
        seed_everything(cfg.seed)  # the same head on every process
        encoder, encoder_desc = load_pretrained_encoder(cfg.encoder, drop_path_rate=cfg.drop_path_rate)
        encoder.set_grad_checkpointing(cfg.runtime.grad_checkpointing)
        size = input_size(cfg.data.img_size, encoder)
        a = cfg.aug
        train_pipeline = finetune_transform(
            size, scale=data.scale, hflip=data.hflip, interpolation=data.interpolation, auto_augment=a.auto_augment,
            color_jitter=a.color_jitter, re_prob=a.re_prob, re_mode=a.re_mode, re_count=a.re_count,
        )  # fmt: skip
        train_set, val_set, num_classes = labelled_splits(data, train_pipeline, size, cfg.num_classes)
        model = FinetuneClassifier(encoder, num_classes, global_pool=cfg.global_pool).to(device)
        head = HeadSpec("finetune", num_classes, list(train_set.classes), cfg.global_pool)
        spec = classifier_spec(encoder, head, data).to_dict()  # every checkpoint's and classifier.pt's model spec
        seed_everything(cfg.seed + dist.rank())  # mixup draws differ per process
        loader, sampler, batches = seeded_loader(
            train_set, batch_size=cfg.batch_size, seed=cfg.seed, num_workers=data.num_workers, device=device,
            key="data.train",
        )  # fmt: skip
        d = derive(cfg, dist.world_size(), batches)
        groups = layer_decay_groups(model, cfg.optim.weight_decay, cfg.layer_decay, cfg.optim.wd_exempt_tokens)
        optimizer = build_adamw(groups, cfg.optim, d.lr, device)
        train_module = dist.wrap_ddp(model, device)
        mixup, criterion = mixup_and_criterion(cfg.aug, num_classes)
        ema = None
        if cfg.ema.enabled:
            from timm.utils.model_ema import ModelEmaV3

            ema = ModelEmaV3(model, decay=cfg.ema.decay, use_warmup=cfg.ema.warmup)
        if cfg.runtime.compile:  # the model's forward, inside DDP, after the EMA copy (which stays eager)
            compile_method(model, "forward", mode=cfg.runtime.compile_mode)
        val = eval_loader(val_set, cfg.batch_size, data.num_workers, device)
        report = SkipReport(max_skip_fraction=data.max_skip_fraction)

        def forward(images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
            targets: torch.Tensor = labels
            if mixup is not None:
                if images.shape[0] % 2:  # mixup pairs samples; an odd batch (unreadable files dropped) loses one
                    images, labels = images[:-1], labels[:-1]
                if images.shape[0] == 0:  # one usable image: nothing to pair it with
                    return zero_loss(model, device), 0
                images, targets = mixup(images, labels)  # targets: (B, C) soft
            logits = train_module(images)  # (B, C)
            loss: torch.Tensor = criterion(logits, targets)
            return loss, int(images.shape[0])

        def evaluate() -> Metrics:
            ctx = lambda: autocast_context(device, dtype)  # noqa: E731
            model.eval()
            val_report = SkipReport(max_skip_fraction=data.max_skip_fraction)
            main = evaluate_heads(model, val, device, ctx=ctx, report=val_report)[0]
            checked_val_report(val_report, device)
            metrics: Metrics = {"top1": main["top1"], "top5": main["top5"], "val_skipped": val_report.skipped,
                                "val_data": val_report.as_dict()}  # fmt: skip
            if ema is not None:
                averaged = evaluate_heads(ema.module, val, device, ctx=ctx)[0]
                metrics.update(ema_top1=averaged["top1"], ema_top5=averaged["top5"])
            return metrics

        def after_step(s: TrainState) -> None:
            if ema is not None:
                ema.update(model, step=s.step)

        def extra_state() -> dict[str, Any]:
            return {"spec": spec, **({"ema": ema.module.state_dict()} if ema is not None else {})}

        def load_extra_state(ckpt: dict[str, Any]) -> None:
            if ema is not None and "ema" in ckpt:
                ema.module.load_state_dict(ckpt["ema"])

        def export(final: Metrics) -> Metrics:
            out: Metrics = {"classifier": str(run_dir / "classifier.pt")}
            if dist.is_main():
                metrics = {"top1": final["top1"], "top5": final["top5"]}
                legacy = {"num_heads": encoder.num_heads, "global_pool": cfg.global_pool, "kind": "finetune"}
                blob = {"model": model.state_dict(), "spec": spec, "config": to_dict(cfg), "metrics": metrics}
                blob["milan"] = legacy  # what milan versions before the model spec read
                atomic_save(blob, run_dir / "classifier.pt")
                if ema is not None:
                    ema_metrics = {"top1": final["ema_top1"], "top5": final["ema_top5"]}
                    ema_blob = {**blob, "model": ema.module.state_dict(), "metrics": ema_metrics}
                    atomic_save(ema_blob, run_dir / "classifier_ema.pt")
            if ema is not None:
                out.update(classifier_ema=str(run_dir / "classifier_ema.pt"), ema_top1=final["ema_top1"],
                           ema_top5=final["ema_top5"])  # fmt: skip
            return out

        protect_workers(val)  # a SIGTERM during an evaluation leaves its workers alive: the run stops after a step
        trainer = Trainer(
            cfg, d, run_dir, model=model, train_module=train_module, optimizer=optimizer,
            step_fn=classifier_step(forward, model, device, report), loader=loader, sampler=sampler, report=report,
            device=device, dtype=dtype, resume_from=run.resume_from, extra_state=extra_state,
            load_extra_state=load_extra_state,
            evaluation=Evaluation(evaluate, every_epochs=cfg.eval_every, describe=describe_topk),
        )  # fmt: skip
        a, log = cfg.aug, trainer.log
        n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
        log.info(run.header("finetune"))
        log.info(
            f"encoder: {encoder_desc}; drop path {cfg.drop_path_rate}, {cfg.global_pool} pooling, {size} px; "
            f"{n_params / 1e6:.2f} M trainable params"
        )
        log.info(f"train: {describe_found(train_set, unit=f'{d.steps_per_epoch} steps per epoch')}")
        log.info(f"val: {describe_found(val_set)}; {num_classes} classes")
        log.info(
            f"AdamW (betas {tuple(cfg.optim.betas)}, wd {cfg.optim.weight_decay}), layer decay {cfg.layer_decay} over "
            f"{len(encoder.blocks) + 2} layer ids; aug {a.auto_augment or 'no RandAugment'}, erasing {a.re_prob}, "
            f"mixup {a.mixup} / cutmix {a.cutmix}, label smoothing {a.label_smoothing}; EMA "
            + (f"{cfg.ema.decay}" if ema is not None else "off")
        )
        if cfg.encoder.pretrained is None:
            log.warning("the encoder is RANDOM: this trains from scratch, not from a pretrained model")
        return train_classifier(trainer, "finetune", export, run.t_start, after_step=after_step)


# ----------------------------------------------------------------------------------------------------------------
# Command line


def add_arguments(parser: argparse.ArgumentParser, command: str) -> None:
    """Adds ``milan finetune``'s arguments."""
    add_run_arguments(parser, "configs/finetune/cifar10_tiny_cpu.yaml")


def run(args: argparse.Namespace) -> int:
    """Runs ``milan finetune``; returns the exit status."""

    def job(cfg: FinetuneConfig, a: argparse.Namespace) -> Any:
        return finetune(cfg, resume=a.resume)

    return run_job("finetune", FinetuneConfig, check_finetune, job, args)


__all__ = ["add_arguments", "finetune", "mixup_and_criterion", "run"]
