"""The run-level skeleton every training job shares: resume, epochs, evaluation, logging, checkpoints, summary.

Pretraining, linear probing and fine-tuning each build their model, optimizer, loader and step function inside
:func:`~milan.train.run.start_run`, then::

    trainer = Trainer(cfg, derived, run.run_dir, model=..., train_module=..., optimizer=..., step_fn=...,
                      loader=..., sampler=..., report=..., device=run.device, dtype=run.dtype,
                      resume_from=run.resume_from, evaluation=Evaluation(validate, every_epochs=5))
    trainer.log.info("job-specific start-up lines")
    with trainer:
        state = trainer.fit()               # the batch/lr/step plan, then epochs, evaluations, checkpoints
        trainer.finish({...}, "done: ...")  # the "summary" record (and results.json) and the closing line

Checkpoints hold ``model`` (unwrapped), optimizer, scaler, position, RNG states, the resolved config (with
``out_dir`` set to the run folder), the evaluation history (with an ``evaluation``) and whatever ``extra_state()``
returns; on resume, ``load_extra_state`` gets the loaded checkpoint (also kept as ``trainer.resumed``) to restore those
extras.

SIGTERM (a cluster's preemption) and SIGINT (Ctrl-C) during :meth:`Trainer.fit`: every process finishes the current
optimizer step (they agree on the step through the step's all-reduce), a resumable checkpoint of that exact position
is written, one line is printed and :class:`~milan.train.loop.RunInterrupted` is raised (the command line exits with
128 + the signal number: 143, 130); a second signal exits at once without saving. Data-loader workers ignore both
signals (their main process stops them).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any

import torch
import torch.nn as nn

from milan import distributed as dist
from milan.data import SkipReport
from milan.data.sampling import EpochSampler
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
    RunInterrupted,
    StepFn,
    StopRequest,
    TrainState,
    autocast_context,
    fit_epochs,
    grad_scaler,
    train_one_epoch,
)
from milan.train.schedule import CosineSchedule

Metrics = dict[str, Any]


def describe_metrics(metrics: Metrics) -> str:
    """``"name value  name value ..."``: an evaluation's numbers, without its ``epoch``, ``step`` and ``eval_time``."""
    numbers = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    return "  ".join(f"{k} {v:.4g}" for k, v in numbers.items() if k not in ("epoch", "step", "eval_time"))


@dataclass(frozen=True)
class Evaluation:
    """Periodic evaluation during training (e.g. validation accuracy).

    Attributes:
        run: Evaluates the current weights; called on every process (collectives allowed), returns the metrics
            (plain data: numbers, strings, lists, dicts).
        every_epochs: Evaluate at the end of every N-th epoch; the last step is always evaluated.
        describe: The text of one result in the log line ``eval epoch E (step S): ...``.
    """

    run: Callable[[], Metrics]
    every_epochs: int = 1
    describe: Callable[[Metrics], str] = describe_metrics

    def __post_init__(self) -> None:
        if self.every_epochs < 1:
            raise ValueError(f"every_epochs must be >= 1, got {self.every_epochs}")


class Trainer:
    """Epochs, evaluation, logging, checkpoints and resume around :func:`~milan.train.loop.train_one_epoch`.

    Args:
        cfg: The run config (its ``optim``/``schedule``/``checkpoint``/``log``/``runtime`` sections are used).
        derived: From :func:`~milan.train.config.derive`.
        run_dir: The run folder.
        model: The trained module, unwrapped (what checkpoints hold; for FSDP2 the sharded module).
        train_module: ``model`` or its DDP/FSDP/compiled wrapper (gradient sync is skipped on accumulation steps).
        optimizer: Its groups may carry ``lr_scale``.
        step_fn: ``batch -> StepOutput``.
        loader: Yields the current epoch's batches (re-iterated every epoch).
        sampler: The loader's :class:`EpochSampler` (``None`` for streams).
        report: The skip report the step function fills (reduced, logged and reset at each epoch end).
        device: Where training runs.
        dtype: Compute dtype (autocast, grad scaler).
        resume_from: Checkpoint to restore first (``trainer.resumed`` then holds it).
        flops_per_image: Training FLOPs per image, for MFU on GPUs.
        extra_state: More entries for every checkpoint.
        load_extra_state: Restores them from the checkpoint ``resume_from`` (called once, after the model,
            optimizer and evaluation history are restored).
        evaluation: Periodic evaluation: each result is an ``"eval"`` record in ``metrics.jsonl`` (with ``epoch``,
            ``step`` and ``eval_time``), a log line and an entry of :attr:`eval_history`, which checkpoints keep
            (``"eval_history"``), so a resumed run reports the same history.
        epoch_lines: Print an epoch line about 20 times per run (``False``: only epochs that skipped images).
    """

    def __init__(
        self,
        cfg: RunConfig,
        derived: Derived,
        run_dir: Path,
        *,
        model: nn.Module,
        train_module: nn.Module,
        optimizer: torch.optim.Optimizer,
        step_fn: StepFn,
        loader: Iterable[Any],
        sampler: EpochSampler | None,
        report: SkipReport,
        device: torch.device,
        dtype: torch.dtype,
        resume_from: Path | None = None,
        flops_per_image: float | None = None,
        extra_state: Callable[[], dict[str, Any]] | None = None,
        load_extra_state: Callable[[dict[str, Any]], None] | None = None,
        evaluation: Evaluation | None = None,
        epoch_lines: bool = True,
    ) -> None:
        self.cfg, self.derived, self.run_dir = cfg, derived, run_dir
        self.model, self.train_module, self.optimizer = model, train_module, optimizer
        self.step_fn, self.loader, self.sampler, self.report = step_fn, loader, sampler, report
        self.device, self.dtype = device, dtype
        self.extra_state = extra_state
        self.evaluation = evaluation
        self.eval_history: list[Metrics] = []  # every evaluation of the run, in order (resumed runs included)
        self.epoch_lines = epoch_lines
        self.schedule = CosineSchedule(derived.lr, derived.total_steps, derived.warmup_steps, cfg.schedule.min_lr)
        self.scaler = grad_scaler(device, dtype)
        self.state = TrainState()
        self.run_report = SkipReport()  # over the whole launch
        self.checkpointer = Checkpointer(
            run_dir, keep=cfg.checkpoint.keep, every_epochs=cfg.checkpoint.every_epochs, enabled=dist.is_main()
        )
        self.resumed: dict[str, Any] | None = None
        self.stop = StopRequest()  # set by SIGTERM/SIGINT during fit()
        protect_workers(loader)
        self._config = to_dict(dataclasses.replace(cfg, out_dir=str(run_dir)))  # where the run really is
        self._layout_note: str | None = None
        if resume_from is not None:
            self.resumed = load_training_checkpoint(resume_from)
            self.state = restore_checkpoint(self.resumed, model, optimizer, scaler=self.scaler)
            self._adapt_position(self.resumed)
            if evaluation is not None:
                self.eval_history = list(self.resumed.get("eval_history") or [])
            if load_extra_state is not None:
                load_extra_state(self.resumed)
        self.saved_step = self.state.step if resume_from is not None else -1
        self.saved_path: Path | None = resume_from  # the newest checkpoint of this run's current position
        self.start_images = self.state.images_seen  # images trained on before this launch
        self.log = RunLogger(
            run_dir, enabled=dist.is_main(), total_steps=derived.stop_step, start_step=self.state.step,
            steps_per_epoch=derived.steps_per_epoch, every_steps=cfg.log.every_steps, progress=cfg.log.progress,
            tensorboard=cfg.log.tensorboard, flops_per_image=flops_per_image, world_size=derived.world_size,
            device=device, peak_flops=peak_flops(device, getattr(cfg.runtime, "peak_tflops", None)),  # pretraining's
        )  # fmt: skip
        if dist.is_main():
            save_config(self._config, run_dir / "config.yaml")
        self._resume_from = resume_from

    def _adapt_position(self, ckpt: dict[str, Any]) -> None:
        """Carries the position inside the epoch over to another batch layout.

        Exact for a different micro-batch size with the same processes and effective batch; otherwise a note says
        that the rest of the current epoch does not see exactly the remaining samples.
        """
        cfg, d = self.cfg, self.derived
        old_bs = int(ckpt.get("config", {}).get("batch_size", cfg.batch_size))
        old_accum = int(ckpt.get("config", {}).get("accum_steps", cfg.accum_steps))
        old_world = int(ckpt.get("meta", {}).get("world_size", d.world_size))
        if (old_bs, old_accum, old_world) == (cfg.batch_size, cfg.accum_steps, d.world_size):
            return
        samples = self.state.batch_in_epoch * old_bs  # consumed by each process in this epoch
        exact = old_world == d.world_size and old_bs * old_accum == cfg.batch_size * cfg.accum_steps
        if exact and samples % (cfg.batch_size * cfg.accum_steps) == 0:
            self.state.batch_in_epoch = samples // cfg.batch_size
            return
        self.state.batch_in_epoch = min(samples // cfg.batch_size, d.steps_per_epoch * cfg.accum_steps)
        self.state.batch_in_epoch -= self.state.batch_in_epoch % cfg.accum_steps
        self._layout_note = (
            f"the checkpoint was written with batch_size {old_bs} x accum_steps {old_accum} x {old_world} processes, "
            f"this launch uses {cfg.batch_size} x {cfg.accum_steps} x {d.world_size}: training continues from step "
            f"{self.state.step}, but the rest of epoch {self.state.epoch} does not see exactly the remaining samples"
        )

    def _log_plan(self) -> None:
        cfg, d = self.cfg, self.derived
        how = "optim.lr" if cfg.optim.lr is not None else f"blr {cfg.optim.blr:g} x {d.effective_batch} / 256"
        self.log.info(
            f"batch {cfg.batch_size}/process x accum {cfg.accum_steps} x {d.world_size} process(es) = effective "
            f"{d.effective_batch}; peak lr {d.lr:.4g} ({how})"
        )
        self.log.info(
            f"{d.steps_per_epoch} steps/epoch x {cfg.schedule.epochs} epochs = {d.total_steps} steps "
            f"({d.warmup_steps} warm-up); this launch runs to step {d.stop_step}"
        )
        if self._resume_from is not None and self.resumed is not None:
            self.log.info(f"resumed from {self._resume_from}: epoch {self.state.epoch}, step {self.state.step}")
            if self._layout_note is not None:
                self.log.warning(self._layout_note)

    def save(self, epoch_end: int | None = None) -> None:
        """Checkpoints the current state (every process must call it; the main one writes).

        Raises:
            CheckpointWriteError: On every process, when the main one could not write (e.g. no space left).
        """
        failed: str | None = None
        if dist.is_main() or is_sharded(self.model):  # FSDP2 gathers the full state on every process
            extra = {"eval_history": list(self.eval_history)} if self.evaluation is not None else {}
            extra.update(self.extra_state() if self.extra_state is not None else {})
            ckpt = build_checkpoint(
                self.model, self.optimizer, self.state, self._config, scaler=self.scaler, extra=extra,
                world_size=self.derived.world_size,
            )  # fmt: skip
            try:
                self.checkpointer.save(ckpt, epoch_end=epoch_end)
            except CheckpointWriteError as e:
                if not dist.is_enabled():
                    raise
                failed = str(e)
        failed = dist.broadcast_object(failed)  # also the barrier: the file exists for every process after this
        if failed is not None:
            raise CheckpointWriteError(failed)
        self.saved_step = self.state.step
        self.saved_path = self.checkpointer.last

    def _checkpoint_note(self) -> str:
        """What is on disk, for a message after a failure."""
        if self.saved_path is None:
            return "no checkpoint has been written yet"
        return f"the last checkpoint, {self.saved_path} (step {self.saved_step}), is intact"

    def evaluate(self) -> Metrics:
        """Runs the evaluation now (every process must call it), records and logs it, and returns its metrics.

        Raises:
            RuntimeError: The trainer has no ``evaluation``.
        """
        if self.evaluation is None:
            raise RuntimeError("this Trainer was built without an evaluation")
        s = self.state
        t0 = time.perf_counter()
        metrics = {"epoch": s.epoch, "step": s.step, **self.evaluation.run(), "eval_time": time.perf_counter() - t0}
        self.eval_history.append(metrics)
        self.log.write({"event": "eval", **metrics})
        self.log.info(f"eval epoch {s.epoch} (step {s.step}): {self.evaluation.describe(metrics)}")
        return metrics

    def fit(
        self,
        *,
        on_epoch_end: Callable[[TrainState], None] | None = None,
        after_step: Callable[[TrainState], None] | None = None,
        before_epoch: Callable[[TrainState], None] | None = None,
    ) -> TrainState:
        """Trains from the current state to the end of the schedule (or ``schedule.max_steps``).

        Each (partial) epoch starts with ``train_module.train()`` (evaluations may leave it in eval mode). At each
        epoch end: the skip report is reduced over processes and recorded (``"epoch"`` record with the epoch's mean
        loss), the evaluation runs every ``evaluation.every_epochs`` epochs, then ``on_epoch_end``, then a
        checkpoint is saved every ``checkpoint.every_epochs`` epochs. ``checkpoint.every_steps`` adds mid-epoch
        saves. The end of the run is always evaluated (if it was not at an epoch end: ``schedule.max_steps``, or a
        resumed run that had finished without it) and saved. A :class:`~milan.train.loop.NonFiniteLossError`
        propagates without saving.

        Args:
            on_epoch_end: Called after each complete epoch (and its evaluation), before its checkpoint.
            after_step: Called after every optimizer step (e.g. an EMA update).
            before_epoch: Called before each (partial) epoch.

        Returns:
            The final state.
        """
        cfg, d = self.cfg, self.derived
        num_batches = d.steps_per_epoch * cfg.accum_steps
        self._log_plan()
        if self.state.step >= d.stop_step or self.state.epoch >= cfg.schedule.epochs:
            self.log.info(f"nothing to train: the run is already at step {self.state.step} (epoch {self.state.epoch})")

        def on_step(s: TrainState) -> None:
            if after_step is not None:
                after_step(s)
            if cfg.checkpoint.every_steps and s.step % cfg.checkpoint.every_steps == 0 and s.step < d.stop_step:
                self.save()

        def run_epoch(s: TrainState) -> TrainState:
            self.train_module.train()
            if before_epoch is not None:
                before_epoch(s)
            if self.sampler is not None:
                self.sampler.set_epoch(s.epoch, start=s.batch_in_epoch * cfg.batch_size)
            s = train_one_epoch(
                self.step_fn, _epoch_batches(self.loader, s), self.optimizer, self.schedule, s,
                num_batches=num_batches, ctx=autocast_context(self.device, self.dtype), scaler=self.scaler,
                accum_steps=cfg.accum_steps, clip_grad=cfg.optim.clip_grad,
                ddp_module=self.train_module if d.world_size > 1 else None, logger=self.log, on_step=on_step,
                stop_step=d.stop_step, stop=self.stop,
            )  # fmt: skip
            if self.sampler is None and s.batch_in_epoch < num_batches and s.step < d.stop_step:
                # A stream (tar shards) held fewer samples than announced, e.g. a damaged shard: the epoch ends
                # with what could be read (the skip report names the damaged shards and the samples not read).
                self.log.warning(
                    f"epoch {s.epoch + 1}/{cfg.schedule.epochs} ended after {s.batch_in_epoch} of {num_batches} "
                    "batches: the shards held fewer samples than data.num_samples announces; the epoch is closed "
                    "with what could be read"
                )
                self.optimizer.zero_grad(set_to_none=True)  # an incomplete accumulation is dropped
                s.batch_in_epoch = num_batches
            return s

        def epoch_end(s: TrainState) -> None:
            self.report.all_reduce(self.device if self.device.type == "cuda" else None)
            self.run_report.merge(self.report)
            loss = self.log.pop_epoch_loss()
            data = self.report.as_dict()
            self.log.write({"event": "epoch", "epoch": s.epoch, "step": s.step, "loss": loss, "data": data})
            periodic = self.epoch_lines and s.epoch % max(1, cfg.schedule.epochs // 20) == 0
            if periodic or self.report.skipped or s.epoch == cfg.schedule.epochs:
                text = f"{loss:.4f}" if loss is not None else "n/a"
                summary = self.report.summary()
                self.log.info(f"epoch {s.epoch}/{cfg.schedule.epochs} (step {s.step}): loss {text}; {summary}")
            self.report.check(f"epoch {s.epoch}")  # no usable image, or too many skipped: DataError, nothing saved
            self.report.reset()
            if self.evaluation is not None and (s.epoch % self.evaluation.every_epochs == 0 or s.step >= d.stop_step):
                self.evaluate()
            if on_epoch_end is not None:
                on_epoch_end(s)
            every = cfg.checkpoint.every_epochs
            if every and s.epoch % every == 0:
                self.save(epoch_end=s.epoch)

        try:
            with stop_on_signals(self.stop):
                self.state = fit_epochs(
                    run_epoch, self.state, epochs=cfg.schedule.epochs, batches_per_epoch=num_batches,
                    stop_step=d.stop_step, on_epoch_end=epoch_end, stop=self.stop,
                )  # fmt: skip
                if self.stop.agreed:
                    self._save_and_stop(num_batches)
        except NonFiniteLossError as e:
            raise NonFiniteLossError(e.step, e.value, self._checkpoint_note()) from None
        final_due = self.evaluation is not None and self.final_eval is None
        if final_due:  # stopped mid-epoch (schedule.max_steps), or a resumed run that had finished without it
            self.evaluate()
        if final_due or self.saved_step != self.state.step:
            self.save()  # the end of the run (possibly mid-epoch: schedule.max_steps) is always resumable
        return self.state

    def _save_and_stop(self, num_batches: int) -> None:
        """After a stop agreed at the end of a step: a checkpoint of this position, one line, ``RunInterrupted``."""
        s = self.state
        if self.saved_step != s.step:
            self.save()  # mid-epoch: the resume continues inside this epoch, exactly
        signum = self.stop.signum or self.stop.agreed  # a process that was not signalled follows the others
        name = signal.Signals(signum).name
        reason = f"{name} received" if self.stop.signum else f"{name} received by another process"
        message = (
            f"{reason}: stopped after step {s.step} (epoch {s.epoch}, batch {s.batch_in_epoch}/{num_batches}); "
            f"saved {self.saved_path}; continue with --resume auto"
        )
        self.log.info(message)
        raise RunInterrupted(message, signum)

    @property
    def final_eval(self) -> Metrics | None:
        """The evaluation of the current step, if there is one."""
        if self.eval_history and self.eval_history[-1]["step"] == self.state.step:
            return self.eval_history[-1]
        return None

    def finish(self, summary: Metrics, message: str, *, results: bool = False) -> None:
        """Ends the run's records: the ``"summary"`` record, ``results.json`` (optional, the same fields), a line.

        Args:
            summary: The run's final numbers.
            message: The closing log line.
            results: Also write ``summary`` to ``RUN_DIR/results.json`` (main process).
        """
        self.log.write({"event": "summary", **summary})
        if results and dist.is_main():
            (self.run_dir / "results.json").write_text(json.dumps(summary, indent=2) + "\n")
        self.log.info(message)

    def close(self) -> None:
        """Closes the progress bar and TensorBoard."""
        self.log.close()

    def __enter__(self) -> Trainer:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


@contextmanager
def stop_on_signals(stop: StopRequest) -> Iterator[None]:
    """SIGTERM and SIGINT set ``stop`` inside the block (a second signal exits the process at once).

    Signals that are ignored (e.g. SIGINT in a background job started by a shell) stay ignored; outside the main
    thread nothing is installed (Python only delivers signals there). The previous handlers come back afterwards.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: FrameType | None) -> None:
        if stop.requested:  # the second one: no more waiting
            name = signal.Signals(signum).name
            os.write(2, f"\nsecond {name}: exiting at once without saving\n".encode())
            os._exit(128 + signum)
        stop.request(signum)

    previous: dict[int, Any] = {}
    for sig in (signal.SIGTERM, signal.SIGINT):
        current = signal.getsignal(sig)
        if current is signal.SIG_IGN:
            continue
        previous[sig] = current if current is not None else signal.SIG_DFL
        signal.signal(sig, handler)
    try:
        yield
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)


def _ignore_stop_signals(init: Callable[[int], None] | None, worker_id: int) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if init is not None:
        init(worker_id)


def protect_workers(loader: Any) -> None:
    """Makes a DataLoader's worker processes ignore SIGTERM and SIGINT (their main process ends them).

    A cluster's SIGTERM or a terminal's Ctrl-C reaches every process of the group; a worker that died of it would
    make the DataLoader raise in the middle of the step that the main process wants to finish and save.
    """
    if not isinstance(loader, torch.utils.data.DataLoader) or loader.num_workers == 0:
        return
    init = loader.worker_init_fn
    if not (isinstance(init, functools.partial) and init.func is _ignore_stop_signals):  # not twice
        loader.worker_init_fn = functools.partial(_ignore_stop_signals, init)


def _epoch_batches(loader: Iterable[Any], state: TrainState) -> Iterable[Any]:
    """The loader for ``state``'s epoch; streams (no sampler) skip the batches consumed before a resume."""
    dataset = getattr(loader, "dataset", None)
    if isinstance(dataset, torch.utils.data.IterableDataset):
        if hasattr(dataset, "set_epoch"):
            dataset.set_epoch(state.epoch)
        it = iter(loader)
        for _ in range(state.batch_in_epoch):
            next(it, None)
        return it
    return loader
