"""``milan pretrain``: MILAN pretraining from a YAML preset plus ``key=value`` overrides.

``pretrain(cfg)`` is the whole job, importable and testable; ``run(args)`` is its command-line wrapper. Launch on
several GPUs or nodes with ``torchrun --nproc_per_node N -m milan pretrain ...``.
"""

from __future__ import annotations

import argparse
import dataclasses
import random
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset, IterableDataset

from milan import distributed as dist
from milan.checkpoint.io import CheckpointError
from milan.data import Batch, SkipReport, build_loader, build_pretrain_dataset, collate_images
from milan.engine.checkpointing import Checkpointer, load_training_checkpoint
from milan.engine.config import ConfigError, PretrainConfig, check_pretrain, derive, load_config, to_yaml
from milan.engine.loop import NonFiniteLossError, StepFn, StepOutput, TrainState, zero_loss
from milan.engine.optim import build_adamw, param_groups
from milan.engine.sampling import EpochSampler, SeededSamples, keyed_collate
from milan.engine.trainer import Trainer, _is_sharded, setup_runtime
from milan.flops import pretrain_flops
from milan.models.factory import build_milan
from milan.models.milan import MILAN


@dataclasses.dataclass(frozen=True)
class Summary:
    """What a finished (or stopped) run reports."""

    run_dir: Path
    checkpoint: Path | None
    state: TrainState
    final_loss: float | None
    wall_time: float
    images_per_second: float


def pretrain(cfg: PretrainConfig, resume: str | None = None) -> Summary:
    """Runs MILAN pretraining.

    Args:
        cfg: The config.
        resume: ``"auto"`` (newest valid checkpoint in ``cfg.out_dir``, or a fresh start there), a checkpoint
            path, or ``None`` (a fresh run; an ``out_dir`` that already holds a run gets a ``-2``, ``-3`` ... suffix).

    Returns:
        The run summary (on every process; only the main one writes files).
    """
    t_start = time.perf_counter()
    check_pretrain(cfg)
    owns_process_group = not dist.is_enabled()
    device = dist.init(cfg.runtime.device)
    try:
        dtype = setup_runtime(cfg.runtime, device)
        run_dir, ckpt_path = _run_dir_and_checkpoint(cfg.out_dir, resume)
        model = _build_model(cfg, device)
        loader, sampler, batches_per_epoch = _build_loader(cfg, model, device)
        derived = derive(cfg, dist.world_size(), batches_per_epoch)
        student = _wrap_student(cfg, model, dtype)
        groups = param_groups(model.student, cfg.optim.weight_decay, cfg.optim.wd_exempt_tokens)
        optimizer = build_adamw(groups, cfg.optim, derived.lr, device)
        report = SkipReport()
        teacher = model.teacher
        random_teacher = teacher is not None and not cfg.model.teacher.checkpoint
        # A random teacher is saved with the student so that a resumed smoke run is exact.
        teacher_state = (lambda: {"teacher": teacher.state_dict()}) if random_teacher and teacher is not None else None
        step_fn = milan_step(model, student, device, report, channels_last=cfg.runtime.channels_last)
        trainer = Trainer(
            cfg, derived, run_dir, model=student if _is_sharded(student) else model.student, train_module=student,
            optimizer=optimizer, step_fn=step_fn, loader=loader, sampler=sampler, report=report, device=device,
            dtype=dtype, resume_from=ckpt_path, flops_per_image=pretrain_flops(cfg.model).total,
            extra_state=teacher_state,
        )  # fmt: skip
        if trainer.resumed is not None and "teacher" in trainer.resumed and model.teacher is not None:
            model.teacher.load_state_dict(trainer.resumed["teacher"])
        _log_model(trainer, cfg, model, device, dtype, random_teacher)
        try:
            state = trainer.fit()
        finally:
            trainer.close()
        return _finish(cfg, trainer, state, t_start)
    finally:
        if owns_process_group:
            dist.destroy()


# ----------------------------------------------------------------------------------------------------------------
# The MILAN step


def milan_step(
    model: MILAN, student: nn.Module, device: torch.device, report: SkipReport, *, channels_last: bool = False
) -> StepFn:
    """The pretraining step function for :func:`milan.engine.loop.train_one_epoch`.

    Args:
        model: MILAN (teacher, masking, loss).
        student: The module to call for the student (``model.student`` or its DDP/FSDP/compiled wrapper).
        device: Where to compute.
        report: Receives each batch's skipped files.
        channels_last: Channels-last images.

    Returns:
        ``batch -> StepOutput``; a batch is ``(Batch, noise (B, L))`` from :class:`SeededSamples` or a plain
        :class:`~milan.data.Batch` (shards: masks from the global RNG).
    """
    fallback = [student]  # torch.compile failures fall back to the eager module (checked on the first call)

    def step(batch: tuple[Batch, torch.Tensor] | Batch) -> StepOutput:
        data, noise = batch if isinstance(batch, tuple) else (batch, None)
        report.update(data)
        if data.empty:  # every image was unreadable: a zero loss keeps all processes in step
            return StepOutput(zero_loss(model.student, device), 0, len(data.skipped))
        images = data.images.to(device, non_blocking=True)  # (B, 3, H, W)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        noise = noise.to(device, non_blocking=True) if noise is not None else None  # (B, L)
        try:
            out = model(images, noise=noise, student=fallback[0])
        except Exception as e:
            if fallback[0] is student and hasattr(student, "_orig_mod") and not isinstance(e, torch.OutOfMemoryError):
                print(
                    f"WARNING: torch.compile failed ({type(e).__name__}: {e}); continuing in eager mode",
                    file=sys.stderr,
                )
                fallback[0] = cast(nn.Module, student._orig_mod)  # the module torch.compile wrapped
                out = model(images, noise=noise, student=fallback[0])
            else:
                raise
        return StepOutput(out.loss, images.shape[0], len(data.skipped))

    return step


# ----------------------------------------------------------------------------------------------------------------
# Set-up helpers


def seed_everything(seed: int) -> None:
    """Seeds Python, NumPy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _run_dir_and_checkpoint(out_dir: str, resume: str | None) -> tuple[Path, Path | None]:
    """Decided on the main process, shared with the others."""
    decision = _decide_run_dir(Path(out_dir), resume) if dist.is_main() else None
    run_dir, ckpt = dist.broadcast_object(decision)
    return Path(run_dir), (Path(ckpt) if ckpt is not None else None)


def _decide_run_dir(out_dir: Path, resume: str | None) -> tuple[str, str | None]:
    if resume is None:
        run_dir = out_dir
        n = 1
        while run_dir.exists() and any(run_dir.iterdir()):  # never overwrite a previous run
            n += 1
            run_dir = out_dir.with_name(f"{out_dir.name}-{n}")
        if run_dir != out_dir:
            print(f"{out_dir} already holds a run; writing this one to {run_dir} (--resume auto continues {out_dir})")
        return str(run_dir), None
    if resume == "auto":
        found = Checkpointer(out_dir).latest_valid()
        if found is None:
            print(f"--resume auto: no checkpoint in {out_dir / 'checkpoints'}; starting a new run there")
            return str(out_dir), None
        return str(out_dir), str(found[0])
    path = Path(resume)
    load_training_checkpoint(path)  # fail early with a clear message
    return str(out_dir), str(path)


def _build_model(cfg: PretrainConfig, device: torch.device) -> MILAN:
    seed_everything(cfg.seed)  # the same initial weights on every process
    model = build_milan(cfg.model).to(device)
    model.encoder.set_grad_checkpointing(cfg.runtime.grad_checkpointing)
    seed_everything(cfg.seed + dist.rank())  # then a different stream per process
    return model


def _wrap_student(cfg: PretrainConfig, model: MILAN, dtype: torch.dtype) -> nn.Module:
    """DDP (or FSDP2) around the student only; the teacher stays outside. Optionally ``torch.compile``."""
    student: nn.Module = model.student
    device = next(student.parameters()).device
    if cfg.runtime.strategy == "fsdp" and dist.is_enabled():
        blocks = [*model.encoder.blocks, *model.decoder.decoder_blocks]
        student = dist.apply_fsdp(student, blocks, dtype if dtype != torch.float32 else None)
    else:
        student = dist.wrap_ddp(student, device)
    if cfg.runtime.compile:
        student = torch.compile(student)  # type: ignore[assignment]
    return student


def _build_loader(
    cfg: PretrainConfig, model: MILAN, device: torch.device
) -> tuple[Iterable[Any], EpochSampler | None, int]:
    """The epoch loader, its sampler (map-style data) and the micro-batches per epoch on each process."""
    d = cfg.data
    try:
        dataset: Dataset[Any] = build_pretrain_dataset(
            d.path, cfg.model.encoder.img_size, scale=d.scale, ratio=d.ratio, interpolation=d.interpolation,
            hflip=d.hflip, max_pixels=d.max_image_pixels, seed=cfg.seed, num_samples=d.num_samples,
        )  # fmt: skip
    except (FileNotFoundError, NotADirectoryError, ValueError, ImportError) as e:
        raise ConfigError(f"data.path={d.path!r}: {e}") from e
    if isinstance(dataset, IterableDataset):
        if d.num_samples is None:
            raise ConfigError("data.num_samples is required for tar shards (the epoch length)")
        stream = build_loader(dataset, cfg.batch_size, drop_last=True, seed=cfg.seed, num_workers=d.num_workers)
        return stream, None, d.num_samples // (cfg.batch_size * dist.world_size())
    sampler = EpochSampler(len(dataset), seed=cfg.seed, rank=dist.rank(), world_size=dist.world_size())  # type: ignore[arg-type]
    if sampler.per_rank < cfg.batch_size:
        raise ConfigError(
            f"data.path={d.path!r} has {len(dataset)} images: fewer than batch_size={cfg.batch_size} per process "  # type: ignore[arg-type]
            f"({dist.world_size()} processes); lower batch_size"
        )
    seeded = SeededSamples(dataset, cfg.seed, noise_len=model.encoder.num_patches)
    loader: DataLoader[Any] = DataLoader(
        seeded,  # indexed by (epoch, index) keys
        batch_size=cfg.batch_size,
        sampler=sampler,
        drop_last=True,
        collate_fn=keyed_collate(collate_images),
        num_workers=d.num_workers,
        persistent_workers=d.num_workers > 0,
        pin_memory=device.type == "cuda",
    )
    return loader, sampler, sampler.per_rank // cfg.batch_size


def _log_model(
    trainer: Trainer, cfg: PretrainConfig, model: MILAN, device: torch.device, dtype: torch.dtype, random_teacher: bool
) -> None:
    log = trainer.log
    n_student = sum(p.numel() for p in model.student.parameters() if p.requires_grad)
    n_teacher = sum(p.numel() for p in model.teacher.parameters()) if model.teacher is not None else 0
    flops = pretrain_flops(cfg.model)
    log.info(
        f"milan pretrain -> {trainer.run_dir}  ({device}, {str(dtype).removeprefix('torch.')}, "
        f"{trainer.derived.world_size} process(es))"
    )
    log.info(
        f"model {cfg.model_name or 'custom'}: student {n_student / 1e6:.2f} M trainable params, teacher "
        f"{n_teacher / 1e6:.2f} M frozen; {flops.total / 1e9:.3g} GFLOP per training image"
    )
    if random_teacher:
        log.warning(
            "no model.teacher.checkpoint given: the teacher is RANDOMLY initialised, so its targets carry no "
            "meaning and this run is only a smoke test of the pipeline. Pass model.teacher.checkpoint=PATH "
            "(OpenAI CLIP ViT-B/16 weights) for real pretraining."
        )


def _finish(cfg: PretrainConfig, trainer: Trainer, state: TrainState, t_start: float) -> Summary:
    wall = time.perf_counter() - t_start
    last = trainer.log.last.get("loss") if trainer.log.last else None
    ckpt = trainer.checkpointer.last
    summary = Summary(
        run_dir=trainer.run_dir,
        checkpoint=ckpt if ckpt.exists() else None,
        state=state,
        final_loss=last if isinstance(last, float) else None,
        wall_time=wall,
        images_per_second=state.images_seen / max(wall, 1e-9),
    )
    if dist.is_main():
        plot = None
        if cfg.log.plot:
            from milan.viz.plot import save_plot

            plot = save_plot(trainer.run_dir / "metrics.jsonl", trainer.run_dir / "plot.png")
        report = trainer.run_report
        loss_text = f"{summary.final_loss:.4f}" if summary.final_loss is not None else "n/a"
        record = {"event": "summary", "step": state.step, "epoch": state.epoch, "images_seen": state.images_seen}
        trainer.log.write({**record, "wall_time": wall, "final_loss": summary.final_loss, "data": report.as_dict()})
        trainer.log.info(
            f"done: {state.images_seen} images in {wall:.1f} s ({summary.images_per_second:.1f} img/s incl. start-up), "
            f"epoch {state.epoch}/{cfg.schedule.epochs}, step {state.step}, final loss {loss_text}; "
            f"{report.summary()}; checkpoint {summary.checkpoint}" + (f"; plot {plot}" if plot else "")
        )
    return summary


# ----------------------------------------------------------------------------------------------------------------
# Command line


def add_arguments(parser: argparse.ArgumentParser, command: str) -> None:
    """Adds ``milan pretrain``'s arguments."""
    parser.add_argument("--config", "-c", metavar="FILE", help="YAML preset, e.g. configs/pretrain/demo_cpu.yaml")
    parser.add_argument(
        "overrides", nargs="*", metavar="KEY=VALUE", help="dotted config overrides, e.g. batch_size=64 optim.blr=3e-4"
    )
    parser.add_argument(
        "--resume",
        metavar="auto|FILE",
        help="'auto': continue from the newest valid checkpoint in out_dir (or start there); or a checkpoint file",
    )
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")


def run(args: argparse.Namespace) -> int:
    """Runs ``milan pretrain``; returns the exit status."""
    try:
        cfg = load_config(PretrainConfig, args.config, args.overrides)
        check_pretrain(cfg)
    except ConfigError as e:
        print(f"milan pretrain: config error: {e}", file=sys.stderr)
        return 2
    if args.print_config:
        print(to_yaml(cfg), end="")
        return 0
    try:
        pretrain(cfg, resume=args.resume)
    except (ConfigError, CheckpointError) as e:
        print(f"milan pretrain: {e}", file=sys.stderr)
        return 2
    except NonFiniteLossError as e:
        print(f"milan pretrain: {e}", file=sys.stderr)
        return 1
    return 0
