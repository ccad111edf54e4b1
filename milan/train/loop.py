"""The training loop shared by pretraining, linear probing and fine-tuning.

A job supplies a *step function* ``batch -> StepOutput`` (forward pass and loss); :func:`train_one_epoch` does
the rest: learning rate from the schedule, autocast, gradient accumulation with DDP sync only on the last
micro-step, the non-finite-loss abort, clipping, the optimizer step, metrics reduced over processes, logging.
"""

from __future__ import annotations

import math
import signal
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple, Protocol

import torch
import torch.nn as nn

from milan import distributed as dist
from milan.data import Batch, SkipReport
from milan.train.schedule import CosineSchedule

Precision = Literal["auto", "bf16", "fp16", "fp32"]


@dataclass
class TrainState:
    """Where a run is; saved in every checkpoint.

    Attributes:
        epoch: Current epoch (0-based).
        step: Optimizer steps taken (the schedule's clock).
        batch_in_epoch: Micro-batches of the current epoch already consumed (the sampler's resume position).
        images_seen: Images trained on, over all processes.
    """

    epoch: int = 0
    step: int = 0
    batch_in_epoch: int = 0
    images_seen: int = 0


class StepOutput(NamedTuple):
    """What a step function returns for one micro-batch.

    Attributes:
        loss: Scalar mean loss over the micro-batch (the graph to backpropagate).
        batch_size: Samples in the micro-batch on this process.
        skipped: Samples dropped from it (unreadable files).
    """

    loss: torch.Tensor
    batch_size: int
    skipped: int = 0


StepFn = Callable[[Any], StepOutput]


class StepLogger(Protocol):
    """What the loop reports to (see :class:`milan.train.logging.RunLogger`)."""

    def step(self, state: TrainState, metrics: dict[str, float]) -> None: ...


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the run stops before the optimizer step, no checkpoint is written.

    Args:
        step: The optimizer step.
        value: The loss.
        checkpoint: What is on disk, said after the stop (e.g. ``"the last checkpoint, X (step 8), is intact"``);
            empty when the caller does not know.
    """

    def __init__(self, step: int, value: float, checkpoint: str = "") -> None:
        where = f" ({checkpoint})" if checkpoint else ""
        super().__init__(
            f"non-finite loss {value} at optimizer step {step}; stopping before the weights are updated{where}. "
            "Try a lower lr (optim.blr), more warm-up (schedule.warmup_epochs), "
            "gradient clipping (optim.clip_grad=3.0), or bf16 instead of fp16 (runtime.precision=bf16)."
        )
        self.step = step
        self.value = value


class StopRequest:
    """A request to stop after the current optimizer step (made by a signal handler, see the Trainer).

    :func:`train_one_epoch` adds the request to the step's all-reduce of metrics, so every process sees it at the
    same step (no extra collective): each finishes that optimizer step, marks the request :attr:`agreed` and returns.

    Attributes:
        signum: The signal that asked this process to stop (0: none).
        agreed: Set by the loop once the processes stopped together: SIGTERM if any process got one, else SIGINT
            (0: not stopped); the state is then that of a finished step.
    """

    STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)  # in the order a stop is named after

    def __init__(self) -> None:
        self.signum = 0
        self.agreed = 0

    def request(self, signum: int) -> None:
        """Asks to stop (the first request's signal is kept)."""
        self.signum = self.signum or signum

    @property
    def requested(self) -> bool:
        """Whether this process was asked to stop."""
        return self.signum != 0


class RunInterrupted(KeyboardInterrupt):
    """A run stopped by SIGTERM or SIGINT after its current step, with a resumable checkpoint written.

    Attributes:
        signum: The signal.
        exit_status: The conventional status of a process ended by that signal (128 + signum: 143, 130).
    """

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.signum = signum
        self.exit_status = 128 + signum


def resolve_dtype(precision: Precision, device: torch.device) -> torch.dtype:
    """Compute dtype: ``auto`` is bf16 on CUDA and fp32 on CPU; reduced precision on CPU falls back to fp32."""
    if device.type != "cuda" or precision == "fp32":
        return torch.float32
    return torch.float16 if precision == "fp16" else torch.bfloat16


def autocast_context(device: torch.device, dtype: torch.dtype) -> AbstractContextManager[Any]:
    """``torch.autocast`` for reduced precision on CUDA, ``nullcontext()`` otherwise."""
    if device.type == "cuda" and dtype != torch.float32:
        return torch.autocast(device_type="cuda", dtype=dtype)
    return nullcontext()


def grad_scaler(device: torch.device, dtype: torch.dtype) -> torch.amp.GradScaler | None:
    """A dynamic loss scaler for fp16 (``None`` for bf16/fp32, which do not need one)."""
    return torch.amp.GradScaler(device.type) if dtype == torch.float16 else None


@contextmanager
def skip_grad_sync(module: nn.Module) -> Iterator[None]:
    """No gradient reduction in the backward passes inside (DDP ``no_sync``, FSDP2 ``set_requires_gradient_sync``)."""
    no_sync: Any = getattr(module, "no_sync", None)
    set_sync: Any = getattr(module, "set_requires_gradient_sync", None)
    if no_sync is not None:
        with no_sync():
            yield
    elif set_sync is not None:
        set_sync(False)
        try:
            yield
        finally:
            set_sync(True)
    else:
        yield


def zero_loss(module: nn.Module, device: torch.device) -> torch.Tensor:
    """A zero loss connected to every trainable parameter of ``module``.

    For a micro-batch whose images were all unreadable: its backward gives zero gradients, so DDP processes stay
    in step and the accumulated gradients are unchanged.
    """
    terms = [p.sum() * 0.0 for p in module.parameters() if p.requires_grad]
    return torch.stack(terms).sum() if terms else torch.zeros((), device=device)


def data_step(
    forward: Callable[[Batch, torch.Tensor | None], tuple[torch.Tensor, int]],
    module: nn.Module,
    device: torch.device,
    report: SkipReport,
) -> StepFn:
    """A step function over the data pipeline's batches, for :func:`train_one_epoch`.

    A batch is a :class:`~milan.data.Batch`, or a ``(Batch, noise)`` pair from
    :class:`~milan.data.sampling.SeededSamples`. Its unreadable files go to ``report``; a batch that lost every
    image gets :func:`zero_loss` (so every process stays in step) without calling ``forward``.

    Args:
        forward: ``(batch, noise or None) -> (mean loss, samples used)``; moves what it needs to ``device``.
        module: The trained module (the zero loss is connected to its parameters).
        device: Where to compute.
        report: Receives each batch's unreadable files.

    Returns:
        ``batch -> StepOutput``.
    """

    def step(batch: tuple[Batch, torch.Tensor] | Batch) -> StepOutput:
        data, noise = batch if isinstance(batch, tuple) else (batch, None)
        report.update(data)
        if data.empty:  # every image was unreadable: a zero loss keeps all processes in step
            return StepOutput(zero_loss(module, device), 0, len(data.skipped))
        loss, n = forward(data, noise)
        return StepOutput(loss, n, len(data.skipped))

    return step


def train_one_epoch(
    step_fn: StepFn,
    loader: Iterable[Any],
    optimizer: torch.optim.Optimizer,
    schedule: CosineSchedule,
    state: TrainState,
    *,
    num_batches: int,
    ctx: AbstractContextManager[Any] | None = None,
    scaler: torch.amp.GradScaler | None = None,
    accum_steps: int = 1,
    clip_grad: float | None = None,
    ddp_module: nn.Module | None = None,
    logger: StepLogger | None = None,
    on_step: Callable[[TrainState], None] | None = None,
    stop_step: int | None = None,
    stop: StopRequest | None = None,
) -> TrainState:
    """Trains until ``state.batch_in_epoch == num_batches`` (or ``state.step == stop_step``, or a stop request).

    Args:
        step_fn: ``batch -> StepOutput``; runs the forward pass (called inside ``ctx``).
        loader: Batches of the current epoch, starting at ``state.batch_in_epoch``.
        optimizer: Its param groups get the schedule's lr (times ``lr_scale``) before each optimizer step.
        schedule: lr as a function of ``state.step``.
        state: Updated in place.
        num_batches: Micro-batches in the whole epoch (a multiple of ``accum_steps``).
        ctx: Autocast context (``nullcontext()`` on CPU); re-entered every micro-step.
        scaler: fp16 gradient scaler.
        accum_steps: Micro-batches per optimizer step.
        clip_grad: Max global gradient norm (``None``: no clipping).
        ddp_module: The DDP (or FSDP2) module, so gradients are only reduced on the last micro-step.
        logger: Receives per-step metrics.
        on_step: Called after every optimizer step (e.g. step checkpoints).
        stop_step: Stop early once ``state.step`` reaches it.
        stop: A stop request shared with signal handlers: when any process has one at the end of a step (it travels
            in the step's all-reduce), every process completes that step, sets ``stop.agreed`` and returns.

    Returns:
        ``state``.

    Raises:
        NonFiniteLossError: The (process-averaged) loss is NaN or infinite; the weights are not updated.
    """
    if state.batch_in_epoch >= num_batches:  # resumed at the very end of an epoch
        return state
    params = [p for group in optimizer.param_groups for p in group["params"]]
    loss_sum = torch.zeros((), dtype=torch.float64, device=params[0].device)  # over this optimizer step's micro-batches
    n = skipped = 0
    t_last = t_data = time.perf_counter()
    data_time = 0.0
    for batch in loader:
        data_time += time.perf_counter() - t_data
        lr = schedule.apply(optimizer, state.step)
        last_micro = state.batch_in_epoch % accum_steps == accum_steps - 1
        # DDP/FSDP reduce gradients in backward; skip it on all but the last micro-step (gradients accumulate).
        with nullcontext() if last_micro or ddp_module is None else skip_grad_sync(ddp_module):
            with ctx if ctx is not None else nullcontext():
                out = step_fn(batch)
            loss = out.loss / accum_steps
            if scaler is not None:
                loss = scaler.scale(loss)
            torch.autograd.backward(loss)
        loss_sum += out.loss.detach().double() * out.batch_size
        n, skipped = n + out.batch_size, skipped + out.skipped
        state.batch_in_epoch += 1
        if last_micro:
            asked = [float(stop is not None and stop.signum == s) for s in StopRequest.STOP_SIGNALS]
            totals = torch.stack(
                [loss_sum, loss_sum.new_tensor(n), loss_sum.new_tensor(skipped), *map(loss_sum.new_tensor, asked)]
            )
            total_loss, total_n, total_skipped, *total_asked = dist.all_reduce_sum(totals).tolist()  # one sync per step
            loss_sum.zero_()
            n = skipped = 0
            loss_value = total_loss / max(total_n, 1.0)
            if not math.isfinite(loss_value):
                optimizer.zero_grad(set_to_none=True)
                raise NonFiniteLossError(state.step, loss_value)
            metrics = {"loss": loss_value, "lr": lr, "images": total_n, "skipped": total_skipped}
            if clip_grad is not None:
                if scaler is not None:
                    scaler.unscale_(optimizer)
                metrics["grad_norm"] = float(nn.utils.clip_grad_norm_(params, clip_grad))
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            state.step += 1
            state.images_seen += int(total_n)
            now = time.perf_counter()
            if logger is not None:
                logger.step(state, {**metrics, "step_time": now - t_last, "data_time": data_time})
            t_last, data_time = now, 0.0
            if on_step is not None:
                on_step(state)
            if stop is not None and any(total_asked):
                stop.agreed = next(s for s, k in zip(StopRequest.STOP_SIGNALS, total_asked, strict=True) if k > 0)
                break
            if stop_step is not None and state.step >= stop_step:
                break
        if state.batch_in_epoch >= num_batches:
            break
        t_data = time.perf_counter()
    return state


def fit_epochs(
    run_epoch: Callable[[TrainState], TrainState],
    state: TrainState,
    *,
    epochs: int,
    batches_per_epoch: int,
    stop_step: int,
    on_epoch_end: Callable[[TrainState], None] | None = None,
    stop: StopRequest | None = None,
) -> TrainState:
    """Calls ``run_epoch`` from ``state`` until ``epochs`` are done (or ``state.step == stop_step``).

    ``run_epoch(state)`` trains one epoch from ``state.batch_in_epoch`` (usually a closure around
    :func:`train_one_epoch` that builds the epoch's loader). After each complete epoch, ``state.epoch`` is
    advanced, ``batch_in_epoch`` reset, and ``on_epoch_end(state)`` runs (reports, evaluation, checkpoints).

    Args:
        run_epoch: Trains (the rest of) one epoch.
        state: Where to start; updated in place.
        epochs: Total epochs of the run.
        batches_per_epoch: Micro-batches in a complete epoch.
        stop_step: Stop once this many optimizer steps are done (possibly mid-epoch).
        on_epoch_end: Called after each complete epoch.
        stop: Returns at once, after the step it was agreed at, when ``stop.agreed`` (see :func:`train_one_epoch`).

    Returns:
        ``state``.
    """
    while state.epoch < epochs and state.step < stop_step:
        state = run_epoch(state)
        if stop is not None and stop.agreed:
            return state
        if state.batch_in_epoch >= batches_per_epoch:
            state.epoch += 1
            state.batch_in_epoch = 0
            if on_epoch_end is not None:
                on_epoch_end(state)
        elif state.step < stop_step:
            raise RuntimeError(
                f"epoch {state.epoch} ended after {state.batch_in_epoch} of {batches_per_epoch} batches: "
                "the loader ran out of batches"
            )
    return state


__all__ = [
    "NonFiniteLossError",
    "RunInterrupted",
    "StepFn",
    "StepOutput",
    "StopRequest",
    "TrainState",
    "autocast_context",
    "data_step",
    "fit_epochs",
    "grad_scaler",
    "resolve_dtype",
    "skip_grad_sync",
    "train_one_epoch",
    "zero_loss",
]
