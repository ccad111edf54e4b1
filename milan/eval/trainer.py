"""What ``milan linprobe`` and ``milan finetune`` add to the engine's :class:`~milan.engine.trainer.Trainer`.

The engine's trainer runs the epochs, logging, checkpoints and resume. This module adds the classifier parts:
validation every ``eval_every`` epochs (``"eval"`` records in ``metrics.jsonl``), the evaluation history kept in the
checkpoints (a resumed run reports the same history), the export of the deliverable (``classifier.pt``), and the
final ``"summary"`` record, ``results.json`` and one-line summary.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from torch.utils.data import DataLoader

from milan import distributed as dist
from milan.data import Batch, SkipReport
from milan.engine.config import Derived, RunConfig
from milan.engine.loop import StepFn, StepOutput, TrainState, zero_loss
from milan.engine.sampling import EpochSampler
from milan.engine.trainer import Trainer

Metrics = dict[str, Any]


def classifier_step(
    forward: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, int]],
    module: nn.Module,
    device: torch.device,
    report: SkipReport,
) -> StepFn:
    """A step function for :func:`~milan.engine.loop.train_one_epoch` over ``(Batch, noise)`` batches.

    Args:
        forward: ``(images, labels) -> (mean loss, batch size used)`` on ``device``.
        module: The trained module (for the zero loss of an all-bad batch).
        device: Where to compute.
        report: Receives each batch's unreadable files.

    Returns:
        The step function.
    """

    def step(batch: tuple[Batch, torch.Tensor]) -> StepOutput:
        data = batch[0]
        report.update(data)
        if data.empty:  # keep every process in step (DDP) with a zero loss
            return StepOutput(zero_loss(module, device), 0, len(data.skipped))
        images = data.images.to(device, non_blocking=True)  # (B, 3, H, W)
        labels = data.labels.to(device, non_blocking=True)  # (B,)
        loss, n = forward(images, labels)
        return StepOutput(loss, n, len(data.skipped))

    return step


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


@dataclass
class FitResult:
    """What :func:`fit_classifier` returns."""

    run_dir: Path
    state: TrainState
    final: Metrics  # the last evaluation (at the final step)
    history: list[Metrics]  # every evaluation, in order
    summary: Metrics  # the summary record written to results.json
    checkpoint: Path | None


@dataclass
class ClassifierRun:
    """A classifier job, ready to train.

    Attributes:
        job: ``"linprobe"`` or ``"finetune"`` (log labels).
        cfg: The run config.
        derived: Batch/lr/step arithmetic.
        run_dir: Run folder.
        ckpt_path: Checkpoint to resume from.
        model: The trained module, unwrapped (what the checkpoints hold).
        train_module: ``model`` or its DDP wrapper.
        optimizer: Its groups may carry ``lr_scale``.
        step_fn: From :func:`classifier_step`.
        loader: Training loader of ``(Batch, noise)``.
        sampler: Its :class:`~milan.engine.sampling.EpochSampler`.
        report: The training loader's skip report (filled by the step function).
        device: Device.
        dtype: Compute dtype.
        evaluate: Runs the validation (on every process) and returns flat metrics with ``top1``/``top5``.
        eval_every: Evaluate every N epochs (and after the last step).
        export: Called once at the end with the final metrics; writes the deliverable (e.g. ``classifier.pt``) on
            the main process and returns summary fields.
        messages: Start-up lines for the log.
        extra_state: More checkpoint entries (e.g. EMA weights).
        load_extra: Restores them from the resumed checkpoint.
        after_step: Called after every optimizer step (e.g. the EMA update).
        before_eval: Called on every process before an evaluation (e.g. syncing BatchNorm statistics).
    """

    job: str
    cfg: RunConfig
    derived: Derived
    run_dir: Path
    ckpt_path: Path | None
    model: nn.Module
    train_module: nn.Module
    optimizer: torch.optim.Optimizer
    step_fn: StepFn
    loader: DataLoader[Any]
    sampler: EpochSampler
    report: SkipReport
    device: torch.device
    dtype: torch.dtype
    evaluate: Callable[[], Metrics]
    eval_every: int
    export: Callable[[Metrics], Metrics]
    messages: list[str] = field(default_factory=list)
    extra_state: Callable[[], dict[str, Any]] | None = None
    load_extra: Callable[[dict[str, Any]], None] | None = None
    after_step: Callable[[TrainState], None] | None = None
    before_eval: Callable[[], None] | None = None


def fit_classifier(r: ClassifierRun, t_start: float) -> FitResult:
    """Trains with the engine's :class:`~milan.engine.trainer.Trainer`, evaluates, exports and summarises."""
    history: list[Metrics] = []

    def extra_state() -> dict[str, Any]:
        return {"eval_history": list(history), **(r.extra_state() if r.extra_state is not None else {})}

    trainer = Trainer(
        r.cfg, r.derived, r.run_dir, model=r.model, train_module=r.train_module, optimizer=r.optimizer,
        step_fn=r.step_fn, loader=r.loader, sampler=r.sampler, report=r.report, device=r.device, dtype=r.dtype,
        resume_from=r.ckpt_path, extra_state=extra_state,
    )  # fmt: skip
    log = trainer.log
    if trainer.resumed is not None:
        history.extend(trainer.resumed.get("eval_history") or [])
        if r.load_extra is not None:
            r.load_extra(trainer.resumed)
    for line in r.messages:
        if line.startswith("WARNING: "):
            log.warning(line.removeprefix("WARNING: "))
        else:
            log.info(line)

    def evaluate(s: TrainState) -> Metrics:
        if r.before_eval is not None:
            r.before_eval()
        t0 = time.perf_counter()
        metrics = {"epoch": s.epoch, "step": s.step, **r.evaluate(), "eval_time": time.perf_counter() - t0}
        history.append(metrics)
        log.write({"event": "eval", **metrics})
        log.info(f"eval epoch {s.epoch} (step {s.step}): top-1 {metrics['top1']:.2f}  top-5 {metrics['top5']:.2f}")
        return metrics

    def on_epoch_end(s: TrainState) -> None:
        if s.epoch % r.eval_every == 0 or s.step >= r.derived.stop_step:
            evaluate(s)

    def before_epoch(s: TrainState) -> None:
        r.train_module.train()  # evaluation leaves it in eval mode

    try:
        state = trainer.fit(on_epoch_end=on_epoch_end, after_step=r.after_step, before_epoch=before_epoch)
        if history and history[-1]["step"] == state.step:
            final = history[-1]
        else:  # stopped mid-epoch (schedule.max_steps), or a resumed run that had already finished
            final = evaluate(state)
            trainer.save()  # so that the last checkpoint's history holds it
        fields = r.export(final)
        dist.barrier()  # the exported files exist for every process once this returns
        wall = time.perf_counter() - t_start
        summary: Metrics = {
            "job": r.job, "top1": final["top1"], "top5": final["top5"],
            "max_top1": max(h["top1"] for h in history), "epoch": state.epoch, "step": state.step,
            "images_seen": state.images_seen, "wall_time": wall, **fields,
        }  # fmt: skip
        log.write({"event": "summary", **summary})
        if dist.is_main():
            (r.run_dir / "results.json").write_text(json.dumps(summary, indent=2) + "\n")
        log.info(
            f"done: {r.job} top-1 {final['top1']:.2f}  top-5 {final['top5']:.2f} (best epoch top-1 "
            f"{summary['max_top1']:.2f}) after epoch {state.epoch}, step {state.step}, in {wall:.1f} s; "
            f"{trainer.run_report.summary()}; results {r.run_dir / 'results.json'}"
        )
    finally:
        trainer.close()
    last = trainer.checkpointer.last if trainer.checkpointer.last.exists() else None
    return FitResult(r.run_dir, state, final, list(history), summary, last)
