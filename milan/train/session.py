"""A training run's bookkeeping around the loop a job writes: position, resume, logs, checkpoints, evaluations.

A job builds its model, data and optimizer inside :func:`~milan.train.run.start_run`, then::

    with Session(cfg, derived, run, model=model, optimizer=optimizer, sync_module=ddp_model) as s:
        with s.training():                            # the plan lines; SIGTERM/SIGINT stop after a step
            while s.epochs_left():
                model.train()
                batches = s.epoch_batches(loader, sampler)
                while s.steps_left() and s.train_step(loss_fn, batches, model) is not None:
                    s.end_step()                      # the every_steps checkpoint; a signal: save, stop
                if s.end_epoch(report):               # the epoch record and skip report
                    s.save_epoch()
        s.save_last()
        s.finish({...}, "done: ...")                  # the "summary" record (and results.json), the last line

Checkpoints (:mod:`milan.train.checkpointing`) also hold the evaluation history and the job's :attr:`Session.extra`
entries; a resumed one is kept as :attr:`Session.resumed`, for the job to restore its own entries.

SIGTERM (a cluster's preemption) and SIGINT (Ctrl-C) inside :meth:`Session.training`: every process finishes the
current optimizer step (they agree on it through the step's all-reduce), a resumable checkpoint of that position is
written, one line is printed and :class:`~milan.errors.RunInterrupted` is raised (the command line exits with 128 +
the signal number: 143, 130); a second signal exits at once without saving.
"""

from __future__ import annotations

import dataclasses
import json
import signal
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any, Concatenate, ParamSpec

import torch
import torch.nn as nn

from milan import distributed as dist
from milan.data import SkipReport
from milan.data.sampling import EpochSampler
from milan.errors import RunInterrupted
from milan.flops import peak_flops
from milan.train.checkpointing import (
    Checkpointer,
    CheckpointWriteError,
    build_checkpoint,
    is_sharded,
    load_training_checkpoint,
    restore_checkpoint,
)
from milan.train.config import Derived, RunConfig, save_config, to_dict
from milan.train.logging import RunLogger
from milan.train.loop import (
    NonFiniteLossError,
    Optimization,
    StepOutput,
    TrainState,
    grad_scaler,
    protect_workers,
    stop_on_signals,
    train_step,
)
from milan.train.run import RunContext
from milan.train.schedule import CosineSchedule, Schedule

P = ParamSpec("P")
Metrics = dict[str, Any]


def describe_metrics(metrics: Metrics) -> str:
    """``"name value  name value ..."``: an evaluation's numbers, without its ``epoch``, ``step`` and ``eval_time``."""
    numbers = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    return "  ".join(f"{k} {v:.4g}" for k, v in numbers.items() if k not in ("epoch", "step", "eval_time"))


class Session:
    """The state of one training launch and what it writes; the job drives it (see the module docstring).

    ``model`` is the trained module unwrapped (what checkpoints hold; for FSDP2 the sharded module), ``sync_module``
    its DDP/FSDP2 wrapper (gradients are reduced only on the last micro-step of a step); ``flops_per_image`` gives GPU
    runs their MFU. ``schedule`` replaces the default lr schedule (warm-up + cosine to ``schedule.min_lr`` over
    ``derived``'s steps). A run measured in steps may end inside its last epoch (``derived.total_steps``).

    Attributes:
        state: The position (restored from ``run.resume_from``).
        resumed: The checkpoint resumed from (``None`` on a fresh start).
        extra: Entries the job adds to every checkpoint (its model spec, EMA weights ...), kept current by it.
        eval_history: Every evaluation of the run, resumed ones included (checkpoints keep it).
        run_report: The data pipeline's skip report over this launch.
        log: Progress bar, ``metrics.jsonl``, TensorBoard, ``log.txt``.
    """

    def __init__(
        self,
        cfg: RunConfig,
        derived: Derived,
        run: RunContext,
        *,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        sync_module: nn.Module | None = None,
        flops_per_image: float | None = None,
        schedule: Schedule | None = None,
    ) -> None:
        self.cfg, self.derived, self.run_dir, self.model = cfg, derived, run.run_dir, model
        self.num_batches = derived.steps_per_epoch * cfg.accum_steps  # micro-batches of a whole epoch
        d = derived
        schedule = schedule or CosineSchedule(d.lr, d.total_steps, d.warmup_steps, cfg.schedule.min_lr)
        self.opt = Optimization(
            optimizer, schedule, run.device, run.dtype, cfg.accum_steps, cfg.optim.clip_grad,
            grad_scaler(run.device, run.dtype), sync_module if d.world_size > 1 else None,
        )  # fmt: skip
        self.state = TrainState()
        self.extra: dict[str, Any] = {}
        self.eval_history: list[Metrics] = []
        self.run_report = SkipReport()
        self.checkpointer = Checkpointer(run.run_dir, keep=cfg.checkpoint.keep)
        self.config = to_dict(dataclasses.replace(cfg, out_dir=str(run.run_dir)))  # where the run really is
        self.resumed: dict[str, Any] | None = None
        self._layout_note: str | None = None
        if run.resume_from is not None:
            self.resumed = load_training_checkpoint(run.resume_from)
            self.state = restore_checkpoint(self.resumed, model, optimizer, scaler=self.opt.scaler)
            self._adapt_position(self.resumed)
            self.eval_history = list(self.resumed.get("eval_history") or [])
        self.resume_from = run.resume_from
        self.saved_path = run.resume_from  # the newest checkpoint of this run's position, its step, its evaluations
        self._saved = (self.state.step, len(self.eval_history)) if run.resume_from is not None else (-1, 0)
        self.start_images = self.state.images_seen  # trained on before this launch
        self._streaming = False
        self._t_last = time.perf_counter()
        self._epoch_losses: list[float] = []  # of this epoch's steps (this launch's)
        self.log = RunLogger(
            run.run_dir, enabled=dist.is_main(), total_steps=d.stop_step, start_step=self.state.step,
            steps_per_epoch=d.steps_per_epoch, every_steps=cfg.log.every_steps, progress=cfg.log.progress,
            tensorboard=cfg.log.tensorboard, flops_per_image=flops_per_image, world_size=d.world_size,
            device=run.device, peak_flops=peak_flops(run.device, getattr(cfg.runtime, "peak_tflops", None)),
        )  # fmt: skip
        if dist.is_main():
            save_config(self.config, run.run_dir / "config.yaml")

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: object) -> None:
        self.log.close()

    # -- the loop ------------------------------------------------------------------------------------------------

    @contextmanager
    def training(self) -> Iterator[None]:
        """Logs the batch/lr/step plan, then turns SIGTERM and SIGINT into a stop after the current step."""
        cfg, d, s = self.cfg, self.derived, self.state
        how = "optim.lr" if cfg.optim.lr is not None else f"blr {cfg.optim.blr:g} x {d.effective_batch} / 256"
        self.log.info(
            f"batch {cfg.batch_size}/process x accum {cfg.accum_steps} x {d.world_size} process(es) = effective "
            f"{d.effective_batch}; peak lr {d.lr:.4g} ({how})"
        )
        self.log.info(
            f"{d.steps_per_epoch} steps/epoch x {d.epochs} epochs"
            + (" (the last one partial)" if d.total_steps < d.steps_per_epoch * d.epochs else "")
            + f" = {d.total_steps} steps "
            f"({d.warmup_steps} warm-up); this launch runs to step {d.stop_step}"
        )
        if self.resume_from is not None:
            self.log.info(f"resumed from {self.resume_from}: epoch {s.epoch}, step {s.step}")
            if self._layout_note is not None:
                self.log.warning(self._layout_note)
        if not self.epochs_left():
            self.log.info(f"nothing to train: the run is already at step {s.step} (epoch {s.epoch})")
        with stop_on_signals(self.opt.stop):
            yield

    def epochs_left(self) -> bool:
        """Whether the schedule has epochs left (and ``schedule.max_steps`` is not reached)."""
        return self.state.epoch < self.derived.epochs and self.state.step < self.derived.stop_step

    def epoch_batches(self, loader: Iterable[Any], sampler: EpochSampler | None) -> Iterator[Any]:
        """The batches of the current epoch from the resume position on: the same order however often it resumes.

        A sampler starts at the resume position; a stream (tar shards, no sampler) is reshuffled for the epoch and
        skips the batches consumed before.
        """
        protect_workers(loader)
        self._streaming = sampler is None
        self._t_last = time.perf_counter()
        s = self.state
        if sampler is not None:
            sampler.set_epoch(s.epoch, start=s.batch_in_epoch * self.cfg.batch_size)
            return iter(loader)
        set_epoch = getattr(getattr(loader, "dataset", None), "set_epoch", None)
        if set_epoch is not None:
            set_epoch(s.epoch)
        it = iter(loader)
        for _ in range(s.batch_in_epoch):
            next(it, None)
        return it

    def steps_left(self) -> bool:
        """Whether the current epoch has optimizer steps left (and ``schedule.max_steps`` is not reached)."""
        return self.state.batch_in_epoch < self.num_batches and self.state.step < self.derived.stop_step

    def train_step(
        self,
        loss_fn: Callable[Concatenate[Any, P], StepOutput],
        batches: Iterator[Any],
        *args: P.args,
        **kwargs: P.kwargs,
    ) -> Metrics | None:
        """One optimizer step (:func:`~milan.train.loop.train_step`), logged; ``None`` when the batches ran out.

        Raises:
            NonFiniteLossError: Saying which checkpoint is intact.
        """
        try:
            metrics = train_step(loss_fn, batches, self.state, self.opt, *args, **kwargs)
        except NonFiniteLossError as e:
            if self.saved_path is None:
                note = "no checkpoint has been written yet"
            else:
                note = f"the last checkpoint, {self.saved_path} (step {self._saved[0]}), is intact"
            raise NonFiniteLossError(e.step, e.value, note) from None
        if metrics is not None:
            now = time.perf_counter()
            self.log.step(self.state, {**metrics, "step_time": now - self._t_last})
            self._t_last = now
            self._epoch_losses.append(metrics["loss"])
        return metrics

    def end_step(self) -> None:
        """After a step (and the job's own per-step work): the ``checkpoint.every_steps`` save; a stop.

        Raises:
            RunInterrupted: The processes agreed to stop at this step: a checkpoint of it was written.
        """
        every = self.cfg.checkpoint.every_steps
        if every and self.state.step % every == 0 and self.state.step < self.derived.stop_step:
            self.save()
        if not self.opt.stop.agreed:
            return
        s, stop = self.state, self.opt.stop
        if self._saved[0] != s.step:
            self.save()  # mid-epoch: the resume continues inside this epoch, exactly
        signum = stop.signum or stop.agreed  # a process that was not signalled follows the others
        name = signal.Signals(signum).name
        reason = f"{name} received" if stop.signum else f"{name} received by another process"
        message = (
            f"{reason}: stopped after step {s.step} (epoch {s.epoch}, batch {s.batch_in_epoch}/{self.num_batches}); "
            f"saved {self.saved_path}; continue with --resume auto"
        )
        self.log.info(message)
        raise RunInterrupted(message, signum)

    def end_epoch(self, report: SkipReport) -> bool:
        """Closes the current epoch if it is complete: its skip report (summed over processes), record and line.

        A stream that ran out early (damaged shards) closes its epoch with what could be read, with a warning.

        Returns:
            ``False`` when the run stopped inside the epoch (``schedule.max_steps``).

        Raises:
            DataError: The epoch had no usable image, or skipped more than ``data.max_skip_fraction``.
        """
        s, epochs = self.state, self.derived.epochs
        if s.batch_in_epoch < self.num_batches:
            if s.step >= self.derived.stop_step:
                return False
            if not self._streaming:
                raise RuntimeError(
                    f"epoch {s.epoch} ended after {s.batch_in_epoch} of {self.num_batches} batches: "
                    "the loader ran out of batches"
                )
            self.log.warning(
                f"epoch {s.epoch + 1}/{epochs} ended after {s.batch_in_epoch} of {self.num_batches} batches: the "
                "shards held fewer samples than data.num_samples announces; the epoch is closed with what could be read"
            )
        s.epoch, s.batch_in_epoch = s.epoch + 1, 0
        report.all_reduce(self.opt.device if self.opt.device.type == "cuda" else None)
        self.run_report.merge(report)
        losses, self._epoch_losses = self._epoch_losses, []
        loss = sum(losses) / len(losses) if losses else None
        self.log.write({"event": "epoch", "epoch": s.epoch, "step": s.step, "loss": loss, "data": report.as_dict()})
        if s.epoch % max(1, epochs // 20) == 0 or report.skipped or s.epoch == epochs:
            text = f"{loss:.4f}" if loss is not None else "n/a"
            self.log.info(f"epoch {s.epoch}/{epochs} (step {s.step}): loss {text}; {report.summary()}")
        report.check(f"epoch {s.epoch}")  # no usable image, or too many skipped: nothing is saved
        report.reset()
        return True

    def eval_due(self, every_epochs: int) -> bool:
        """At an epoch end: whether to evaluate (every ``every_epochs`` epochs, and at the end of the run)."""
        return self.state.epoch % every_epochs == 0 or self.state.step >= self.derived.stop_step

    def evaluated(self) -> bool:
        """Whether the current step has been evaluated (a run ends with an evaluation of its last step)."""
        return bool(self.eval_history) and self.eval_history[-1]["step"] == self.state.step

    def record_eval(self, metrics: Metrics, seconds: float, text: str | None = None) -> Metrics:
        """Records the job's evaluation (plain data) of the current step: ``eval_history``, an ``"eval"`` record.

        ``text`` describes the result in the line (default: :func:`describe_metrics`). Returns the record: ``epoch``,
        ``step``, the metrics, ``eval_time`` (``seconds``).
        """
        s = self.state
        record = {"epoch": s.epoch, "step": s.step, **metrics, "eval_time": seconds}
        self.eval_history.append(record)
        self.log.write({"event": "eval", **record})
        self.log.info(f"eval epoch {s.epoch} (step {s.step}): {text or describe_metrics(record)}")
        return record

    # -- checkpoints ---------------------------------------------------------------------------------------------

    def save(self, epoch_end: int | None = None) -> None:
        """Checkpoints the current state (every process must call it; the main one writes).

        Raises:
            CheckpointWriteError: On every process, when the main one could not write (e.g. no space left).
        """
        failed: str | None = None
        if dist.is_main() or is_sharded(self.model):  # FSDP2 gathers the full state on every process
            extra = {**self.extra, **({"eval_history": list(self.eval_history)} if self.eval_history else {})}
            ckpt = build_checkpoint(
                self.model, self.opt.optimizer, self.state, self.config, scaler=self.opt.scaler, extra=extra,
                world_size=self.derived.world_size,
            )  # fmt: skip
        if dist.is_main():
            try:
                self.checkpointer.save(ckpt, epoch_end=epoch_end)
            except CheckpointWriteError as e:
                if not dist.is_enabled():
                    raise
                failed = str(e)
        failed = dist.broadcast_object(failed)  # also the barrier: the file exists for every process after this
        if failed is not None:
            raise CheckpointWriteError(failed)
        self._saved = (self.state.step, len(self.eval_history))
        self.saved_path = self.checkpointer.last

    def save_epoch(self) -> None:
        """The epoch-end save, every ``checkpoint.every_epochs`` epochs (with a numbered copy)."""
        every = self.cfg.checkpoint.every_epochs
        if every and self.state.epoch % every == 0:
            self.save(epoch_end=self.state.epoch)

    def save_last(self) -> None:
        """Saves the end of the run (perhaps mid-epoch: ``schedule.max_steps``) unless the last save holds it."""
        if self._saved != (self.state.step, len(self.eval_history)):
            self.save()

    def finish(self, summary: Metrics, message: str, *, results: bool = False) -> None:
        """Ends the run's records: the ``"summary"`` record, ``results.json`` (optional, the same fields), a line."""
        self.log.write({"event": "summary", **summary})
        if results and dist.is_main():
            (self.run_dir / "results.json").write_text(json.dumps(summary, indent=2) + "\n")
        self.log.info(message)

    # -- internals -----------------------------------------------------------------------------------------------

    def _adapt_position(self, ckpt: dict[str, Any]) -> None:
        """Carries the position inside the epoch over to another batch layout.

        Exact for a different micro-batch size with the same processes and effective batch; otherwise a note says
        that the rest of the current epoch does not see exactly the remaining samples.
        """
        cfg, d, s = self.cfg, self.derived, self.state
        old_bs, old_accum = int(ckpt["config"]["batch_size"]), int(ckpt["config"]["accum_steps"])
        old_world = int(ckpt["meta"]["world_size"])
        if (old_bs, old_accum, old_world) == (cfg.batch_size, cfg.accum_steps, d.world_size):
            return
        samples = s.batch_in_epoch * old_bs  # consumed by each process in this epoch
        exact = old_world == d.world_size and old_bs * old_accum == cfg.batch_size * cfg.accum_steps
        if exact and samples % (cfg.batch_size * cfg.accum_steps) == 0:
            s.batch_in_epoch = samples // cfg.batch_size
            return
        s.batch_in_epoch = min(samples // cfg.batch_size, self.num_batches)
        s.batch_in_epoch -= s.batch_in_epoch % cfg.accum_steps
        self._layout_note = (
            f"the checkpoint was written with batch_size {old_bs} x accum_steps {old_accum} x {old_world} processes, "
            f"this launch uses {cfg.batch_size} x {cfg.accum_steps} x {d.world_size}: training continues from step "
            f"{s.step}, but the rest of epoch {s.epoch} does not see exactly the remaining samples"
        )
