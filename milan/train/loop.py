"""One optimizer step (:func:`train_step`), precision, and stopping on a signal.

:class:`~milan.train.session.Session` calls :func:`train_step` from a job's loop and adds the run around it (resume,
logs, checkpoints, evaluations).
"""

from __future__ import annotations

import functools
import math
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from types import FrameType
from typing import Any, Concatenate, Literal, NamedTuple, ParamSpec

import torch
import torch.nn as nn

from milan import distributed as dist
from milan.errors import UserError
from milan.train.schedule import Schedule

P = ParamSpec("P")
Precision = Literal["auto", "bf16", "fp16", "fp32"]
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)  # in the order a stop is named after


@dataclass
class TrainState:
    """Where a run is; saved in every checkpoint."""

    epoch: int = 0  # current epoch (0-based)
    step: int = 0  # optimizer steps taken (the schedule's clock)
    batch_in_epoch: int = 0  # micro-batches of the current epoch already consumed (the sampler's resume position)
    images_seen: int = 0  # images trained on, over all processes


class StepOutput(NamedTuple):
    """What a job's loss function returns for one micro-batch: the mean loss, samples used, samples skipped."""

    loss: torch.Tensor
    batch_size: int
    skipped: int = 0


class NonFiniteLossError(UserError, RuntimeError):
    """The loss became NaN or infinite; the run stops before the optimizer step, no checkpoint is written.

    Args:
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


@dataclass
class StopRequest:
    """A request to stop after the current optimizer step, set by :func:`stop_on_signals`.

    :func:`train_step` adds it to the step's all-reduce, so every process sees it at the same step (no extra
    collective) and marks it :attr:`agreed` there.
    """

    signum: int = 0  # the signal that asked this process to stop (0: none)
    # set once the processes stopped together: SIGTERM if any process got one, else SIGINT (0: not stopped); the
    # state is then that of a finished step
    agreed: int = 0

    def request(self, signum: int) -> None:
        """Asks to stop (the first request's signal is kept)."""
        self.signum = self.signum or signum


@dataclass
class Optimization:
    """What an optimizer step needs besides the batches."""

    optimizer: torch.optim.Optimizer  # its groups get the schedule's lr (times their lr_scale) before each step
    schedule: Schedule  # the lr of each optimizer step
    device: torch.device  # where the loss is reduced (and autocast runs)
    dtype: torch.dtype = torch.float32  # compute dtype: autocast on CUDA for bf16/fp16
    accum_steps: int = 1  # micro-batches per optimizer step
    clip_grad: float | None = None  # max global gradient norm (None: no clipping)
    scaler: torch.amp.GradScaler | None = None  # fp16
    sync_module: nn.Module | None = None  # the DDP/FSDP2 module: gradients are reduced on the last micro-step only
    stop: StopRequest = field(default_factory=StopRequest)  # shared with the signal handlers


def train_step(
    loss_fn: Callable[Concatenate[Any, P], StepOutput],
    batches: Iterator[Any],
    state: TrainState,
    opt: Optimization,
    *args: P.args,
    **kwargs: P.kwargs,
) -> dict[str, float] | None:
    """One optimizer step over the next ``opt.accum_steps`` micro-batches of ``batches``; updates ``state``.

    Each micro-batch's loss, ``loss_fn(batch, *args, **kwargs)``, is computed under autocast and backpropagated
    (gradient sync skipped but on the last one). Then one all-reduce sums the loss, the samples, the skipped
    samples and the stop requests of all processes; a non-finite loss stops before the update; the gradients are
    clipped and the optimizer steps with the lr of the schedule.

    Returns:
        ``{"loss", "lr", "images", "skipped", "data_time"[, "grad_norm"]}`` (over all processes), or ``None`` when
        ``batches`` ended before the step was complete (a short stream; its gradients are dropped).

    Raises:
        NonFiniteLossError: The process-averaged loss is NaN or infinite; the weights are not updated.
    """
    lr = opt.schedule.apply(opt.optimizer, state.step)
    loss_sum = torch.zeros((), dtype=torch.float64, device=opt.device)
    n = skipped = 0
    data_time = 0.0
    for micro in range(opt.accum_steps):
        t0 = time.perf_counter()
        batch = next(batches, None)
        data_time += time.perf_counter() - t0
        if batch is None:
            opt.optimizer.zero_grad(set_to_none=True)
            return None
        last = micro == opt.accum_steps - 1
        with nullcontext() if last or opt.sync_module is None else _no_grad_sync(opt.sync_module):
            with autocast_context(opt.device, opt.dtype):
                out = loss_fn(batch, *args, **kwargs)
            loss = out.loss / opt.accum_steps
            torch.autograd.backward(opt.scaler.scale(loss) if opt.scaler is not None else loss)
        loss_sum += out.loss.detach().double() * out.batch_size
        n, skipped = n + out.batch_size, skipped + out.skipped
        state.batch_in_epoch += 1
    asked = [float(opt.stop.signum == s) for s in STOP_SIGNALS]
    totals = torch.stack([loss_sum, *map(loss_sum.new_tensor, (n, skipped, *asked))])
    total_loss, total_n, total_skipped, *total_asked = dist.all_reduce_sum(totals).tolist()  # one sync per step
    loss_value = total_loss / max(total_n, 1.0)
    if not math.isfinite(loss_value):
        opt.optimizer.zero_grad(set_to_none=True)
        raise NonFiniteLossError(state.step, loss_value)
    metrics = {"loss": loss_value, "lr": lr, "images": total_n, "skipped": total_skipped, "data_time": data_time}
    if opt.clip_grad is not None:
        if opt.scaler is not None:
            opt.scaler.unscale_(opt.optimizer)
        params = [p for group in opt.optimizer.param_groups for p in group["params"]]
        metrics["grad_norm"] = float(nn.utils.clip_grad_norm_(params, opt.clip_grad))
    if opt.scaler is not None:
        opt.scaler.step(opt.optimizer)
        opt.scaler.update()
    else:
        opt.optimizer.step()
    opt.optimizer.zero_grad(set_to_none=True)
    state.step += 1
    state.images_seen += int(total_n)
    if any(total_asked):
        opt.stop.agreed = next(s for s, k in zip(STOP_SIGNALS, total_asked, strict=True) if k > 0)
    return metrics


def zero_loss(module: nn.Module, device: torch.device) -> torch.Tensor:
    """A zero loss connected to every trainable parameter of ``module``.

    For a micro-batch whose images were all unreadable: its backward gives zero gradients, so DDP processes stay
    in step and the accumulated gradients are unchanged.
    """
    terms = [p.sum() * 0.0 for p in module.parameters() if p.requires_grad]
    return torch.stack(terms).sum() if terms else torch.zeros((), device=device)


# ----------------------------------------------------------------------------------------------------------------
# Precision


def resolve_dtype(precision: Precision, device: torch.device) -> torch.dtype:
    """Compute dtype: ``auto`` is bf16 on CUDA and fp32 on CPU; reduced precision on CPU falls back to fp32."""
    if device.type != "cuda" or precision == "fp32":
        return torch.float32
    return torch.float16 if precision == "fp16" else torch.bfloat16


def autocast_context(device: torch.device, dtype: torch.dtype) -> AbstractContextManager[Any]:
    if device.type == "cuda" and dtype != torch.float32:
        return torch.autocast(device_type="cuda", dtype=dtype)
    return nullcontext()


def grad_scaler(device: torch.device, dtype: torch.dtype) -> torch.amp.GradScaler | None:
    """A dynamic loss scaler for fp16 (``None`` for bf16/fp32, which do not need one)."""
    return torch.amp.GradScaler(device.type) if dtype == torch.float16 else None


@contextmanager
def _no_grad_sync(module: nn.Module) -> Iterator[None]:
    """No gradient reduction in the passes inside (DDP ``no_sync``, FSDP2 ``set_requires_gradient_sync``)."""
    no_sync: Any = getattr(module, "no_sync", None)
    if no_sync is not None:
        with no_sync():
            yield
        return
    set_sync: Any = module.set_requires_gradient_sync  # the other wrapper: FSDP2's
    set_sync(False)
    try:
        yield
    finally:
        set_sync(True)


# ----------------------------------------------------------------------------------------------------------------
# Stopping on SIGTERM (a cluster's preemption) and SIGINT (Ctrl-C)


@contextmanager
def stop_on_signals(stop: StopRequest) -> Iterator[None]:
    """SIGTERM and SIGINT set ``stop`` inside the block; a second signal exits the process at once.

    Signals that are ignored (e.g. SIGINT in a background job started by a shell) stay ignored; outside the main
    thread nothing is installed (Python only delivers signals there). The previous handlers come back afterwards.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    handler = functools.partial(_on_stop_signal, stop)
    previous: dict[int, Any] = {}
    for sig in STOP_SIGNALS:
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


def _on_stop_signal(stop: StopRequest, signum: int, frame: FrameType | None) -> None:
    if stop.signum:  # the second one: no more waiting
        os.write(2, f"\nsecond {signal.Signals(signum).name}: exiting at once without saving\n".encode())
        os._exit(128 + signum)
    stop.request(signum)


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


def _ignore_stop_signals(init: Callable[[int], None] | None, worker_id: int) -> None:
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    if init is not None:
        init(worker_id)
