"""``milan pretrain``: MILAN pretraining from a YAML preset plus ``key=value`` overrides.

``pretrain(cfg)`` is the whole job, importable and testable; ``run(args)`` is its command-line wrapper. Launch on
several GPUs or nodes with ``torchrun --nproc_per_node N -m milan pretrain ...``.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from torch.utils.data import Dataset, IterableDataset

from milan import distributed as dist
from milan.checkpoint.loaders import model_from_config
from milan.checkpoint.spec import milan_spec
from milan.data import (
    Batch,
    ImageDataset,
    SkipReport,
    build_dataset,
    build_loader,
    collate_images,
    describe_found,
    pretrain_transform,
)
from milan.data.device import DeviceAugment, EncodedBatch, EncodedImages, collate_encoded, decode_batch
from milan.data.sampling import EpochSampler, seeded_loader
from milan.data.sources import is_shard_source
from milan.jobs.launch import add_run_arguments, run_job
from milan.models.compile import compile_milan
from milan.models.factory import model_flops
from milan.models.milan import MILAN
from milan.models.tower import describe_tower
from milan.train.checkpointing import is_sharded
from milan.train.config import ConfigError, PretrainConfig, TeacherDtype, check_pretrain, derive
from milan.train.loop import StepFn, StepOutput, TrainState, data_step
from milan.train.optim import build_adamw, param_groups
from milan.train.run import RunContext, seed_everything, start_run
from milan.train.trainer import Trainer


@dataclasses.dataclass(frozen=True)
class Summary:
    """What a finished (or stopped) run reports."""

    run_dir: Path
    checkpoint: Path | None
    state: TrainState
    final_loss: float | None
    wall_time: float
    images_per_second: float  # images of this launch (not those before a resume) per second of its wall time


def pretrain(cfg: PretrainConfig, resume: str | None = None) -> Summary:
    """Runs MILAN pretraining.

    Args:
        cfg: The config.
        resume: ``"auto"`` (newest valid checkpoint in ``cfg.out_dir``, or a fresh start there), a checkpoint
            path, or ``None`` (a fresh run; an ``out_dir`` that already holds a run gets a ``-2``, ``-3`` ... suffix).

    Returns:
        The run summary (on every process; only the main one writes files). A resumed run that is already finished
        returns at once, without touching its folder.

    Raises:
        RunInterrupted: SIGTERM or SIGINT stopped the run after a step; a resumable checkpoint was written.
    """
    check_pretrain(cfg)
    with start_run(cfg.out_dir, cfg.runtime, resume, schedule=cfg.schedule) as run:
        if run.finished is not None:
            f = run.finished
            return Summary(run.run_dir, f.checkpoint, f.state, None, time.perf_counter() - run.t_start, 0.0)
        device, dtype = run.device, run.dtype
        model = _build_model(cfg, device)
        flops = model_flops(cfg.model, model.teacher)  # a teacher loaded from a file counts with its own shape
        loader, sampler, batches_per_epoch = _build_loader(cfg, model, device)
        derived = derive(cfg, dist.world_size(), batches_per_epoch)
        found = _describe_data(cfg, loader, derived.steps_per_epoch)
        # The model spec (milan.checkpoint.spec) every checkpoint carries; taken before any DDP/FSDP wrapping.
        spec = milan_spec(model, interpolation=cfg.data.interpolation, teacher_weights=cfg.model.teacher.checkpoint)
        student = _wrap_student(cfg, model, dtype)
        groups = param_groups(model.student, cfg.optim.weight_decay, cfg.optim.wd_exempt_tokens)
        optimizer = build_adamw(groups, cfg.optim, derived.lr, device)
        report = SkipReport(max_skip_fraction=cfg.data.max_skip_fraction, expected=_expected_samples(cfg, derived))
        teacher = model.teacher
        random_teacher = teacher is not None and not cfg.model.teacher.checkpoint
        teacher_dtype = teacher_compute_dtype(cfg.runtime.teacher_dtype, device, dtype)
        fp32_teacher: dict[str, torch.Tensor] = {}  # a random teacher's fp32 weights, kept when it is cast below

        def teacher_state() -> dict[str, Any]:
            if teacher is None:
                return {"spec": spec.to_dict()}
            # teacher_spec: the exact architecture, which milan.checkpoint.load_milan rebuilds. A random teacher's
            # weights are saved too, always in fp32 (a resumed smoke run is then exact whatever runtime.teacher_dtype
            # is); real ones are read from their file again.
            state: dict[str, Any] = {"spec": spec.to_dict(), "teacher_spec": describe_tower(teacher.model).to_dict()}
            return {"teacher": fp32_teacher or teacher.state_dict(), **state} if random_teacher else state

        def load_teacher_state(ckpt: dict[str, Any]) -> None:
            if "teacher" in ckpt and teacher is not None:
                teacher.load_state_dict(ckpt["teacher"])  # still fp32 here: the cast comes after the restore

        step_fn = milan_step(model, student, device, report, channels_last=cfg.runtime.channels_last)
        if cfg.data.decode == "device":
            step_fn = decode_then(step_fn, _device_augment(cfg), device)
        trainer = Trainer(
            cfg, derived, run.run_dir, model=student if is_sharded(student) else model.student,
            train_module=student, optimizer=optimizer, step_fn=step_fn, loader=loader, sampler=sampler, report=report,
            device=device, dtype=dtype, resume_from=run.resume_from, flops_per_image=flops.total,
            extra_state=teacher_state, load_extra_state=load_teacher_state,
        )  # fmt: skip
        # The teacher's weights are final now (built from its file, or restored from the run's checkpoint).
        if teacher is not None and teacher_dtype != torch.float32:
            if random_teacher:
                fp32_teacher.update({k: v.detach().to("cpu", copy=True) for k, v in teacher.state_dict().items()})
            teacher.to_compute_dtype(teacher_dtype)
        if cfg.runtime.compile:  # after DDP/FSDP wrapping and the teacher's cast; compilation happens at the first step
            compile_milan(model, mode=cfg.runtime.compile_mode, teacher=cfg.runtime.compile_teacher)
        _log_model(trainer, run, cfg, model, random_teacher, optimizer)
        trainer.log.info(found)
        with trainer:
            state = trainer.fit()
        return _finish(cfg, trainer, state, run.t_start)


# ----------------------------------------------------------------------------------------------------------------
# The MILAN step


def milan_step(
    model: MILAN, student: nn.Module, device: torch.device, report: SkipReport, *, channels_last: bool = False
) -> StepFn:
    """The pretraining step function for :func:`milan.train.loop.train_one_epoch`.

    Args:
        model: MILAN (teacher, masking, loss).
        student: The module to call for the student (``model.student`` or its DDP/FSDP wrapper; compilation is
            installed inside ``model.student`` by :func:`milan.models.compile.compile_milan`).
        device: Where to compute.
        report: Receives each batch's skipped files.
        channels_last: Channels-last images.

    Returns:
        ``batch -> StepOutput``; a batch is ``(Batch, noise (B, L))`` from :class:`SeededSamples` or a plain
        :class:`~milan.data.Batch` (shards: the mask noise from the global RNG).
    """

    def forward(data: Batch, noise: torch.Tensor | None) -> tuple[torch.Tensor, int]:
        images = data.images.to(device, non_blocking=True)  # (B, 3, H, W)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        if noise is None:  # shards: the global RNG
            noise = torch.rand(images.shape[0], model.encoder.num_patches, device=device)
        target, importance = model.targets(images)  # (B, 1 + L, D), (B, L)
        mask = model.draw_mask(importance, noise.to(device, non_blocking=True))
        return model.loss(student(images, mask), target, mask), images.shape[0]

    return data_step(forward, model.student, device, report)


def decode_then(step: StepFn, augment: DeviceAugment, device: torch.device) -> StepFn:
    """Wraps a step function for ``data.decode: device``: decodes and augments each batch on ``device`` first.

    Args:
        step: Takes ``(Batch, noise)`` pairs (:func:`milan_step`).
        augment: The view.
        device: Where to decode (CUDA: batched nvJPEG).

    Returns:
        ``(EncodedBatch, noise (B, L)) -> StepOutput``; files that fail to decode join the batch's skipped
        samples (and so the run's skip report), and their noise rows are dropped.
    """

    def fn(batch: tuple[EncodedBatch, torch.Tensor]) -> StepOutput:
        encoded, noise = batch
        data, keep = decode_batch(encoded, augment, device)
        return step((data, noise[keep]))  # noise: (B_ok, L)

    return fn


# ----------------------------------------------------------------------------------------------------------------
# Set-up helpers


def _device_augment(cfg: PretrainConfig) -> DeviceAugment:
    d = cfg.data
    return DeviceAugment(
        cfg.model.encoder.img_size, scale=d.scale, ratio=d.ratio, interpolation=d.interpolation, hflip=d.hflip
    )


def teacher_compute_dtype(choice: TeacherDtype, device: torch.device, dtype: torch.dtype) -> torch.dtype:
    """The dtype the teacher computes in (``runtime.teacher_dtype``); ``torch.float32`` means no cast.

    Args:
        choice: ``"auto"``: the run's compute dtype on CUDA when it is bf16 or fp16, else fp32 (on CPU: no change);
            ``"bf16"``/``"fp16"``: that dtype on any device (a bf16 teacher is about 3.8x faster on CPUs with AMX);
            ``"fp32"``: fp32 weights, run under the run's autocast (the references' behaviour).
        device: The run's device.
        dtype: The run's compute dtype (:func:`milan.train.loop.resolve_dtype`).

    Returns:
        The teacher's dtype.
    """
    if choice == "auto":
        return dtype if device.type == "cuda" and dtype in (torch.bfloat16, torch.float16) else torch.float32
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[choice]


def precision_note(precision: str, device: torch.device, dtype: torch.dtype) -> str | None:
    """One line when the run computes in another precision than ``runtime.precision`` asked for, else ``None``.

    Args:
        precision: ``runtime.precision``.
        device: The run's device.
        dtype: The compute dtype it resolved to (:func:`milan.train.loop.resolve_dtype`).
    """
    asked = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}.get(precision)
    if asked is None or asked == dtype:
        return None
    got = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}.get(dtype, str(dtype))
    return (
        f"runtime.precision={precision} runs in {got} on {device.type}: mixed precision is used on CUDA only; "
        f"set runtime.precision=auto (or {got}) to silence this"
    )


def _build_model(cfg: PretrainConfig, device: torch.device) -> MILAN:
    seed_everything(cfg.seed)  # the same initial weights on every process
    model = model_from_config(cfg.model).to(device)
    model.encoder.set_grad_checkpointing(cfg.runtime.grad_checkpointing)
    seed_everything(cfg.seed + dist.rank())  # then a different stream per process
    return model


def _wrap_student(cfg: PretrainConfig, model: MILAN, dtype: torch.dtype) -> nn.Module:
    """DDP (or FSDP2) around the student only; the teacher stays outside.

    ``runtime.compile`` is applied afterwards inside ``model.student`` (its ``forward`` only, see
    :mod:`milan.models.compile`): the wrapper calls the compiled forward, the state-dict keys do not change, DDP's
    gradient hooks stay on the parameters and dynamo splits the graph at DDP's buckets as when compiling the wrapper.
    """
    student: nn.Module = model.student
    device = next(student.parameters()).device
    if cfg.runtime.strategy == "fsdp" and dist.is_enabled():
        blocks = [*model.encoder.blocks, *model.decoder.decoder_blocks]
        student = dist.apply_fsdp(student, blocks, dtype if dtype != torch.float32 else None)
    else:
        student = dist.wrap_ddp(student, device)
    return student


def _build_loader(
    cfg: PretrainConfig, model: MILAN, device: torch.device
) -> tuple[Iterable[Any], EpochSampler | None, int]:
    """The epoch loader, its sampler (map-style data) and the micro-batches per epoch on each process."""
    d = cfg.data
    view = pretrain_transform(
        cfg.model.encoder.img_size, scale=d.scale, ratio=d.ratio, interpolation=d.interpolation, hflip=d.hflip,
        draft=d.draft,
    )  # fmt: skip
    dataset: Dataset[Any] = build_dataset(
        d.path, view, key="data.path", max_pixels=d.max_image_pixels, shuffle_buffer=1000, seed=cfg.seed,
        num_samples=d.num_samples, allow_shell_pipes=d.allow_shell_pipes,
    )  # fmt: skip
    if d.decode == "device":
        dataset = EncodedImages(dataset)
    if isinstance(dataset, IterableDataset):
        if d.num_samples is None:
            raise ConfigError("data.num_samples is required for tar shards (the epoch length)")
        stream = build_loader(dataset, cfg.batch_size, drop_last=True, seed=cfg.seed, num_workers=d.num_workers)
        return stream, None, d.num_samples // (cfg.batch_size * dist.world_size())
    return seeded_loader(
        dataset, batch_size=cfg.batch_size, seed=cfg.seed, noise_len=model.encoder.num_patches,
        num_workers=d.num_workers, device=device, key=f"data.path={d.path!r}",
        collate=collate_encoded if isinstance(dataset, EncodedImages) else collate_images,
    )  # fmt: skip


def _describe_data(cfg: PretrainConfig, loader: Iterable[Any], steps_per_epoch: int) -> str:
    """The start-of-run data line: ``found N images in PATH; E steps per epoch`` (streams: the announced count)."""
    steps = f"{steps_per_epoch} steps per epoch"
    dataset = getattr(loader, "dataset", None)
    dataset = getattr(dataset, "dataset", dataset)  # SeededSamples wraps the dataset
    dataset = getattr(dataset, "images", dataset)  # EncodedImages wraps it too
    if isinstance(dataset, ImageDataset):
        return describe_found(dataset, str(cfg.data.path), unit=steps)
    return f"tar shards {cfg.data.path}: {cfg.data.num_samples} samples announced (data.num_samples); {steps}"


def _expected_samples(cfg: PretrainConfig, derived: Any) -> int | None:
    """Streams: the samples an epoch's whole batches hold, over all processes (for the skip report)."""
    if cfg.data.num_samples is None or not isinstance(cfg.data.path, str) or not is_shard_source(cfg.data.path):
        return None
    return int(derived.steps_per_epoch * cfg.accum_steps * cfg.batch_size * derived.world_size)


def _log_model(
    trainer: Trainer,
    run: RunContext,
    cfg: PretrainConfig,
    model: MILAN,
    random_teacher: bool,
    optimizer: torch.optim.Optimizer,
) -> None:
    log, rt = trainer.log, cfg.runtime
    n_student = sum(p.numel() for p in model.student.parameters() if p.requires_grad)
    n_teacher = sum(p.numel() for p in model.teacher.parameters()) if model.teacher is not None else 0
    flops = model_flops(cfg.model, model.teacher)  # a teacher loaded from a file counts with its own shape
    teacher = model.teacher
    details = []
    if teacher is not None:
        weights = str(next(teacher.parameters()).dtype).removeprefix("torch.")
        under = str(run.dtype).removeprefix("torch.")
        autocast = teacher.compute_dtype is None and run.dtype != torch.float32  # no cast: under the run's autocast
        details.append(f"teacher {weights}" + (f" weights under {under} autocast" if autocast else ""))
    log.info(run.header("pretrain", details))
    note = precision_note(rt.precision, run.device, run.dtype)
    if note is not None:
        log.warning(note)
    compiled = "off"
    if rt.compile:
        compiled = "student" + (" + teacher" if rt.compile_teacher and teacher is not None else "")
        compiled += f", mode {rt.compile_mode}" if rt.compile_mode is not None else ""
    fused = any(group.get("fused") for group in optimizer.param_groups)
    log.info(
        f"speed options: compile {compiled}; {'fused' if fused else 'unfused'} AdamW; "
        f"channels_last {rt.channels_last}; grad_checkpointing {rt.grad_checkpointing}"
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
    images = state.images_seen - trainer.start_images  # this launch's (a resumed run trained the others before)
    last = trainer.log.last.get("loss") if trainer.log.last else None
    ckpt = trainer.checkpointer.last
    summary = Summary(
        run_dir=trainer.run_dir,
        checkpoint=ckpt if ckpt.exists() else None,
        state=state,
        final_loss=last if isinstance(last, float) else None,
        wall_time=wall,
        images_per_second=images / max(wall, 1e-9),
    )
    if dist.is_main():
        plot = None
        if cfg.log.plot:
            from milan.jobs.plot import save_plot

            plot = save_plot(trainer.run_dir / "metrics.jsonl", trainer.run_dir / "plot.png")
        report = trainer.run_report
        loss_text = f"{summary.final_loss:.4f}" if summary.final_loss is not None else "n/a"
        record = {"step": state.step, "epoch": state.epoch, "images_seen": state.images_seen, "wall_time": wall}
        trainer.finish(
            {**record, "final_loss": summary.final_loss, "data": report.as_dict()},
            f"done: {images} images in {wall:.1f} s ({summary.images_per_second:.1f} img/s incl. start-up"
            + (f"; {state.images_seen} since the run began" if trainer.start_images else "")
            + "), "
            f"epoch {state.epoch}/{cfg.schedule.epochs}, step {state.step}, final loss {loss_text}; "
            f"{report.summary()}; checkpoint {summary.checkpoint}" + (f"; plot {plot}" if plot else ""),
        )
    return summary


# ----------------------------------------------------------------------------------------------------------------
# Command line


def add_arguments(parser: argparse.ArgumentParser, command: str) -> None:
    """Adds ``milan pretrain``'s arguments."""
    add_run_arguments(parser, "configs/pretrain/demo_cpu.yaml", overrides_example="batch_size=64 optim.blr=3e-4")


def run(args: argparse.Namespace) -> int:
    """Runs ``milan pretrain``; returns the exit status."""

    def job(cfg: PretrainConfig, a: argparse.Namespace) -> Any:
        return pretrain(cfg, resume=a.resume)

    return run_job("pretrain", PretrainConfig, check_pretrain, job, args)
