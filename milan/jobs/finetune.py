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
import time
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn as nn

from milan import distributed as dist
from milan.checkpoint.io import atomic_save
from milan.checkpoint.spec import HeadSpec
from milan.data import Batch, SkipReport, describe_found, eval_loader, finetune_transform, seeded_loader
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
from milan.models.classifier import FinetuneClassifier
from milan.models.compile import compile_method
from milan.train.config import AugmentConfig, FinetuneConfig, check_finetune, derive, to_dict
from milan.train.loop import StepOutput, protect_workers, zero_loss
from milan.train.optim import build_adamw, layer_decay_groups
from milan.train.run import seed_everything, start_run
from milan.train.session import Metrics, Session

COMMANDS = {"finetune": "end-to-end fine-tuning with layer-wise lr decay"}


def finetune(cfg: FinetuneConfig, resume: str | None = None) -> FitResult:
    """Runs fine-tuning (``resume``: see :func:`milan.train.run.start_run`); every process returns the result."""
    check_finetune(cfg)
    with start_run(cfg.out_dir, cfg.runtime, resume, schedule=cfg.schedule, done_file="results.json") as run:
        if run.finished is not None:
            return FitResult.of_finished(run.run_dir, run.finished)
        device, data, a = run.device, cfg.data, cfg.aug
        seed_everything(cfg.seed)  # the same head on every process
        encoder, encoder_desc = load_pretrained_encoder(cfg.encoder, drop_path_rate=cfg.drop_path_rate)
        encoder.set_grad_checkpointing(cfg.runtime.grad_checkpointing)
        size = input_size(data.img_size, encoder)
        train_pipeline = finetune_transform(
            size, scale=data.scale, hflip=data.hflip, interpolation=data.interpolation, auto_augment=a.auto_augment,
            color_jitter=a.color_jitter, re_prob=a.re_prob, re_mode=a.re_mode, re_count=a.re_count,
        )  # fmt: skip
        train_set, val_set, num_classes = labelled_splits(data, train_pipeline, size, cfg.num_classes)
        model = FinetuneClassifier(encoder, num_classes, global_pool=cfg.global_pool).to(device)
        head = HeadSpec("finetune", num_classes, list(train_set.classes), cfg.global_pool)
        spec = classifier_spec(encoder, head, data).to_dict()  # every checkpoint's and classifier.pt's model spec
        seed_everything(cfg.seed + dist.rank())  # mixup draws differ per process
        loader, sampler, batches_per_epoch = seeded_loader(
            train_set, batch_size=cfg.batch_size, seed=cfg.seed, num_workers=data.num_workers, device=device,
            key="data.train",
        )  # fmt: skip
        d = derive(cfg, dist.world_size(), batches_per_epoch)
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
        protect_workers(val)  # a SIGTERM during an evaluation leaves its workers alive: the run stops after a step
        report = SkipReport(max_skip_fraction=data.max_skip_fraction)
        with Session(cfg, d, run, model=model, optimizer=optimizer, sync_module=train_module) as s:
            s.extra["spec"] = spec
            if ema is not None:
                if s.resumed is not None and "ema" in s.resumed:
                    ema.module.load_state_dict(s.resumed["ema"])
                s.extra["ema"] = ema.module.state_dict()  # the EMA updates these tensors in place
            n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
            s.log.info(run.header("finetune"))
            s.log.info(
                f"encoder: {encoder_desc}; drop path {cfg.drop_path_rate}, {cfg.global_pool} pooling, {size} px; "
                f"{n_params / 1e6:.2f} M trainable params"
            )
            s.log.info(f"train: {describe_found(train_set, unit=f'{d.steps_per_epoch} steps per epoch')}")
            s.log.info(f"val: {describe_found(val_set)}; {num_classes} classes")
            s.log.info(
                f"AdamW (betas {tuple(cfg.optim.betas)}, wd {cfg.optim.weight_decay}), layer decay {cfg.layer_decay} "
                f"over {len(encoder.blocks) + 2} layer ids; aug {a.auto_augment or 'no RandAugment'}, erasing "
                f"{a.re_prob}, mixup {a.mixup} / cutmix {a.cutmix}, label smoothing {a.label_smoothing}; EMA "
                + (f"{cfg.ema.decay}" if cfg.ema.enabled else "off")
            )
            if cfg.encoder.pretrained is None:
                s.log.warning("the encoder is RANDOM: this trains from scratch, not from a pretrained model")
            with s.training():
                while s.epochs_left():
                    model.train()
                    batches = s.epoch_batches(loader, sampler)
                    while s.steps_left():
                        if s.train_step(_loss, batches, train_module, model, mixup, criterion, report) is None:
                            break  # the loader ran short: end_epoch says so
                        if ema is not None:
                            ema.update(model, step=s.state.step)
                        s.end_step()
                    if s.end_epoch(report):
                        if s.eval_due(cfg.eval_every):
                            _evaluate(s, model, ema, val, cfg)
                        s.save_epoch()
            if not s.evaluated():  # stopped inside an epoch, or resumed after the end without the evaluation
                _evaluate(s, model, ema, val, cfg)
            s.save_last()
            final = s.eval_history[-1]
            # classifier.pt, and classifier_ema.pt with the EMA weights and their accuracy (ema_top1, ema_top5)
            files = {"classifier": (model, "")} | ({"classifier_ema": (ema.module, "ema_")} if ema is not None else {})
            fields: Metrics = {name: str(run.run_dir / f"{name}.pt") for name in files}
            if ema is not None:
                fields |= {"ema_top1": final["ema_top1"], "ema_top5": final["ema_top5"]}
            legacy = {"num_heads": encoder.num_heads, "global_pool": cfg.global_pool, "kind": "finetune"}
            for name, (net, key) in files.items():
                metrics = {"top1": final[f"{key}top1"], "top5": final[f"{key}top5"]}
                blob = {"model": net.state_dict(), "spec": spec, "config": to_dict(cfg), "milan": legacy}
                if dist.is_main():
                    atomic_save({**blob, "metrics": metrics}, fields[name])
            result = topk_summary(s.eval_history)
            text = f"{describe_topk(final)}; best epoch top-1 {result['max_top1']:.2f}"
            return finish_run(s, "finetune", result, fields, text, run.t_start)


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


def _loss(
    batch: tuple[Batch, torch.Tensor],
    train_module: nn.Module,
    model: FinetuneClassifier,
    mixup: Any,
    criterion: nn.Module,
    report: SkipReport,
) -> StepOutput:
    """The classification loss of one labelled batch, mixed up in pairs (its mask noise is not used)."""
    data, _ = batch
    report.update(data)
    device = model.head.weight.device
    images, labels = data.images.to(device, non_blocking=True), data.labels.to(device, non_blocking=True)
    if mixup is not None and len(images) % 2:  # mixup pairs samples: an odd batch (unreadable files dropped) loses one
        images, labels = images[:-1], labels[:-1]
    if data.empty or len(images) == 0:  # nothing usable, or one image with nothing to pair it with
        return StepOutput(zero_loss(model, device), 0, len(data.skipped))
    targets = labels
    if mixup is not None:
        images, targets = mixup(images, labels)  # targets: (B, C) soft
    return StepOutput(criterion(train_module(images), targets), len(images), len(data.skipped))


def _evaluate(s: Session, model: FinetuneClassifier, ema: Any, val: Iterable[Batch], cfg: FinetuneConfig) -> None:
    """Top-1/top-5 on data.val (and of the EMA weights), recorded."""
    t0 = time.perf_counter()
    model.eval()
    (main,), report = validate(model, val, cfg.data, s.opt.device, s.opt.dtype)
    metrics: Metrics = {"top1": main["top1"], "top5": main["top5"], "val_skipped": report.skipped,
                        "val_data": report.as_dict()}  # fmt: skip
    if ema is not None:
        (averaged,), _ = validate(ema.module, val, cfg.data, s.opt.device, s.opt.dtype)
        metrics.update(ema_top1=averaged["top1"], ema_top5=averaged["top5"])
    s.record_eval(metrics, time.perf_counter() - t0, describe_topk(metrics))


def add_arguments(parser: argparse.ArgumentParser, command: str) -> None:
    add_run_arguments(parser, "configs/finetune/cifar10_tiny_cpu.yaml")


def run(args: argparse.Namespace) -> int:
    return run_job(args, FinetuneConfig, check_finetune, finetune)
