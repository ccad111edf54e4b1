"""Distributed state in one small module; every helper is a no-op in a single process.

Launch with ``torchrun --nproc_per_node N ...`` (one node) or with ``--nnodes``/``--rdzv_*`` (many nodes):
:func:`init` reads ``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` from the environment, picks NCCL on CUDA and gloo on CPU,
and returns this process's device.
"""

from __future__ import annotations

import datetime
import os
import warnings
from typing import Any, Literal

import torch
import torch.distributed as dist
import torch.nn as nn

from milan.errors import UserError


def is_enabled() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """Global rank of this process (0 without a process group)."""
    return dist.get_rank() if is_enabled() else 0


def world_size() -> int:
    """Number of processes (1 without a process group)."""
    return dist.get_world_size() if is_enabled() else 1


def is_main() -> bool:
    """Whether this is rank 0, the process that writes files and prints."""
    return rank() == 0


def launched() -> bool:
    """Whether the environment describes a multi-process launch (torchrun sets ``WORLD_SIZE``)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


class DeviceUnavailableError(UserError, RuntimeError):
    """The configured device is not available (one line at the command line)."""


def resolve_device(kind: Literal["auto", "cpu", "cuda"] = "auto") -> torch.device:
    """The device this process trains on: ``cuda:LOCAL_RANK`` or ``cpu``.

    Raises:
        DeviceUnavailableError: ``kind="cuda"`` without a visible GPU.
    """
    if kind == "cuda" and not torch.cuda.is_available():
        raise DeviceUnavailableError(
            "runtime.device=cuda but no CUDA device is visible; use runtime.device=cpu (or auto)"
        )
    if kind == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())  # torchrun's


def init(device_kind: Literal["auto", "cpu", "cuda"] = "auto", timeout_s: float = 1800.0) -> torch.device:
    """Initialises the process group when launched by torchrun (NCCL on CUDA, gloo on CPU); idempotent.

    Returns this process's device; ``timeout_s`` is the collectives' timeout.
    """
    device = resolve_device(device_kind)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if launched() and not is_enabled():
        backend = "nccl" if device.type == "cuda" else "gloo"
        kwargs: dict[str, Any] = {"device_id": device} if device.type == "cuda" else {}
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s), **kwargs)
    return device


def destroy() -> None:
    """Tears the process group down (no-op without one)."""
    if is_enabled():
        dist.destroy_process_group()


def barrier() -> None:
    if is_enabled():
        dist.barrier()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """The sum of ``tensor`` over processes (a new tensor)."""
    out = tensor.detach().clone()
    if is_enabled():
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """The mean of float ``tensor`` over processes (a new tensor)."""
    return all_reduce_sum(tensor) / world_size()


def all_gather_rows(tensor: torch.Tensor) -> torch.Tensor:
    """Every process's ``(n_rank, ...)`` tensor concatenated in rank order, on every process; ``n_rank`` may differ.

    The trailing dimensions and the dtype must agree, except on processes without rows (any ``(0, ...)`` shape of
    the same number of dimensions, e.g. ``torch.zeros(0, 0)`` from an empty shard). The rows are on this process's
    device (CUDA for NCCL); without a process group ``tensor`` itself is returned.
    """
    if not is_enabled():
        return tensor
    shape = torch.tensor(tensor.shape, dtype=torch.long, device=tensor.device)
    shapes = [torch.empty_like(shape) for _ in range(world_size())]
    dist.all_gather(shapes, shape)  # one small collective for the row counts (and the row shape)
    sizes = [[int(v) for v in s.tolist()] for s in shapes]
    counts = [s[0] for s in sizes]
    row = next((tuple(s[1:]) for s in sizes if s[0] > 0), tuple(tensor.shape[1:]))
    if max(counts) == 0:
        return tensor.new_zeros((0, *row))
    padded = tensor.new_zeros((max(counts), *row))  # all_gather needs equal shapes: pad to the longest
    if tensor.shape[0]:
        padded[: tensor.shape[0]] = tensor
    parts = [torch.empty_like(padded) for _ in counts]
    dist.all_gather(parts, padded)
    return torch.cat([part[:n] for part, n in zip(parts, counts, strict=True)])


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """``obj`` from rank ``src`` on every process."""
    if not is_enabled():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def wrap_ddp(module: nn.Module, device: torch.device) -> nn.Module:
    """Wraps ``module`` in DDP when distributed (the identity otherwise).

    Wrap only the trainable part (``MILAN.student``); the frozen teacher stays outside DDP.
    """
    if not is_enabled():
        return module
    ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(module, device_ids=ids, broadcast_buffers=False)


def apply_fsdp(module: nn.Module, blocks: list[nn.Module], mixed_precision: torch.dtype | None = None) -> nn.Module:
    """Shards ``module`` (``MILAN.student``) in place with FSDP2: each of ``blocks`` is its own unit, then the root.

    ``mixed_precision`` is the parameters' compute dtype (e.g. ``torch.bfloat16``); gradients are reduced in fp32.
    A no-op without a process group.
    """
    if not is_enabled():
        return module
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    # The student returns Linear outputs, which are views; nothing modifies them in place, so FSDP2's warning about
    # in-place ops on returned views does not apply.
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
    mp = MixedPrecisionPolicy(param_dtype=mixed_precision, reduce_dtype=torch.float32)
    for block in blocks:
        fully_shard(block, mp_policy=mp)
    fully_shard(module, mp_policy=mp)
    return module


def unwrap(module: nn.Module) -> nn.Module:
    """The module inside a DDP (or ``torch.compile``) wrapper."""
    while True:
        if isinstance(module, nn.parallel.DistributedDataParallel):
            module = module.module
        elif hasattr(module, "_orig_mod") and isinstance(module._orig_mod, nn.Module):
            module = module._orig_mod
        else:
            return module


class CrossProcessBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics cover the batch of every process, on any device.

    torch's :class:`torch.nn.SyncBatchNorm` runs only on GPUs; here the sums of x and x^2 over all processes' batches
    come from one autograd-aware all-reduce, so gradients flow through the statistics as in SyncBN. In one process,
    or in eval mode, a plain BatchNorm2d.
    """

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> normalised with the statistics of all processes' batches."""
        if not (self.training and world_size() > 1):
            return super().forward(input)
        from torch.distributed.nn.functional import all_reduce

        c = input.shape[1]
        x = input.float()
        local = torch.cat([x.sum(dim=(0, 2, 3)), (x * x).sum(dim=(0, 2, 3)), x.new_full((1,), x.numel() / c)])
        total: torch.Tensor = all_reduce(local)  # type: ignore[no-untyped-call]  # (2C + 1,) summed over processes
        n = total[-1]
        mean = total[:c] / n
        var = (total[c : 2 * c] / n - mean * mean).clamp_min(0)  # biased, for normalising
        tracked = self.num_batches_tracked
        if self.running_mean is not None and self.running_var is not None and tracked is not None:
            with torch.no_grad():
                tracked.add_(1)
                m = self.momentum if self.momentum is not None else 1.0 / float(tracked)
                self.running_mean.lerp_(mean.detach(), m)
                self.running_var.lerp_(var.detach() * n / (n - 1).clamp_min(1), m)
        shape = (1, c, 1, 1)
        y = (x - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        out: torch.Tensor = y.to(input.dtype)
        return out


def synchronise_batchnorm(module: nn.Module, device: torch.device) -> nn.Module:
    """Makes ``module``'s BatchNorm statistics cover every process's batch, in place (no-op in one process).

    torch's SyncBatchNorm on GPUs, :class:`CrossProcessBatchNorm2d` elsewhere; the state-dict keys stay the same.
    """
    if world_size() == 1:
        return module
    if device.type == "cuda":
        converted: nn.Module = nn.SyncBatchNorm.convert_sync_batchnorm(module)  # type: ignore[no-untyped-call]
        return converted
    for name, child in module.named_children():
        if type(child) is nn.BatchNorm2d:
            sync = CrossProcessBatchNorm2d(child.num_features, child.eps, child.momentum, child.affine)
            sync.load_state_dict(child.state_dict())
            setattr(module, name, sync.to(next(child.buffers()).device))
        else:
            synchronise_batchnorm(child, device)
    return module
