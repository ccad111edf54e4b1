"""``milan pretrain``: MILAN pretraining from a YAML preset plus ``key=value`` overrides.

``pretrain(cfg)`` is the whole job, importable and testable; ``run(args)`` is its command-line adapter. Launch on
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
    ImageDataset,
    SkipReport,
    build_dataset,
    build_loader,
    collate_images,
    describe_found,
    pretrain_transform,
)
from milan.data.device import DeviceAugment, EncodedImages, collate_encoded, decode_batch
from milan.data.sampling import EpochSampler, seeded_loader
from milan.data.sources import is_shard_source
from milan.jobs.launch import add_run_arguments, run_job
from milan.jobs.plot import save_plot
from milan.models.compile import compile_milan
from milan.models.factory import model_flops
from milan.models.milan import MILAN
from milan.models.tower import describe_tower
from milan.train.checkpointing import is_sharded
from milan.train.config import ConfigError, PretrainConfig, TeacherDtype, check_pretrain, derive
from milan.train.loop import StepOutput, TrainState, zero_loss
from milan.train.optim import build_adamw, param_groups
from milan.train.run import RunContext, seed_everything, start_run
from milan.train.session import Session

COMMANDS = {"pretrain": "MILAN pretraining from a YAML config plus key=value overrides"}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}  # runtime.teacher_dtype


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
    """Runs MILAN pretraining (``resume``: see :func:`milan.train.run.start_run`).

    Returns:
        The run summary, on every process. A resumed run that is already finished returns at once, without touching
        its folder.

    Raises:
        RunInterrupted: SIGTERM or SIGINT stopped the run after a step; a resumable checkpoint was written.
    """
    check_pretrain(cfg)
    with start_run(cfg.out_dir, cfg.runtime, resume, schedule=cfg.schedule) as run:
        if run.finished is not None:
            f = run.finished
            return Summary(run.run_dir, f.checkpoint, f.state, None, time.perf_counter() - run.t_start, 0.0)
        device = run.device
        model = _build_model(cfg, device)
        loader, sampler, batches_per_epoch, images = _build_loader(cfg, model, device)
        d = derive(cfg, dist.world_size(), batches_per_epoch)
        # The model spec (milan.checkpoint.spec) every checkpoint carries; taken before any DDP/FSDP wrapping.
        spec = milan_spec(model, interpolation=cfg.data.interpolation, teacher_weights=cfg.model.teacher.checkpoint)
        student = _wrap_student(cfg, model, run.dtype)
        groups = param_groups(model.student, cfg.optim.weight_decay, cfg.optim.wd_exempt_tokens)
        optimizer = build_adamw(groups, cfg.optim, d.lr, device)
        # tar shards: the skip report expects the samples an epoch's whole batches hold, over all processes
        shards = cfg.data.num_samples is not None and isinstance(cfg.data.path, str) and is_shard_source(cfg.data.path)
        expected = d.steps_per_epoch * cfg.accum_steps * cfg.batch_size * d.world_size if shards else None
        report = SkipReport(max_skip_fraction=cfg.data.max_skip_fraction, expected=expected)
        augment = None
        if cfg.data.decode == "device":  # pretrain_transform's view, drawn on the device
            a, img_size = cfg.data, cfg.model.encoder.img_size
            augment = DeviceAugment(
                img_size, scale=a.scale, ratio=a.ratio, interpolation=a.interpolation, hflip=a.hflip
            )
        trained = student if is_sharded(student) else model.student  # what checkpoints hold
        flops = model_flops(cfg.model, model.teacher).total  # a teacher loaded from a file counts with its own shape
        with Session(cfg, d, run, model=trained, optimizer=optimizer, sync_module=student, flops_per_image=flops) as s:
            s.extra = {"spec": spec.to_dict(), **_settle_teacher(cfg, model, s.resumed, run)}
            if cfg.runtime.compile:  # after DDP/FSDP and the teacher's cast; compilation happens at the first step
                compile_milan(model, mode=cfg.runtime.compile_mode, teacher=cfg.runtime.compile_teacher)
            _log_start(s, run, cfg, model, optimizer, flops)
            steps = f"{d.steps_per_epoch} steps per epoch"
            s.log.info(
                describe_found(images, unit=steps) if images is not None
                else f"tar shards {cfg.data.path}: {cfg.data.num_samples} samples announced (data.num_samples); {steps}"
            )  # fmt: skip
            channels_last = cfg.runtime.channels_last
            with s.training():
                while s.epochs_left():
                    student.train()
                    batches = s.epoch_batches(loader, sampler)
                    while s.steps_left():
                        if s.train_step(milan_loss, batches, model, student, report, augment, channels_last) is None:
                            break  # a short stream (damaged shards): the epoch ends with what could be read
                        s.end_step()
                    if s.end_epoch(report):
                        s.save_epoch()
            s.save_last()
            return _finish(cfg, s, run.t_start)


def milan_loss(
    batch: Any,
    model: MILAN,
    student: nn.Module,
    report: SkipReport,
    augment: DeviceAugment | None = None,
    channels_last: bool = False,
) -> StepOutput:
    """The MILAN loss of one micro-batch: teacher targets, the mask draw, the student, the loss.

    ``batch``: ``(Batch, noise (B, L))`` from the seeded loader; with ``augment`` (``data.decode=device``)
    ``(EncodedBatch, noise)``, decoded and augmented on the device first (failed files join the batch's skipped ones,
    which go to ``report``); or a plain :class:`~milan.data.Batch` from tar shards (mask noise from the global RNG).
    ``student``: ``model.student`` or its DDP/FSDP wrapper (compilation lives inside ``model.student``).
    """
    device = model.encoder.cls_token.device
    data, noise = batch if isinstance(batch, tuple) else (batch, None)
    if augment is not None:
        data, keep = decode_batch(data, augment, device)
        noise = noise[keep]  # (B_ok, L)
    report.update(data)
    if data.empty:  # every image was unreadable: a zero loss keeps all processes in step
        return StepOutput(zero_loss(model.student, device), 0, len(data.skipped))
    images = data.images.to(device, non_blocking=True)  # (B, 3, H, W)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    if noise is None:  # shards: the global RNG
        noise = torch.rand(images.shape[0], model.encoder.num_patches, device=device)
    target, importance = model.targets(images)  # (B, 1 + L, D), (B, L)
    mask = model.draw_mask(importance, noise.to(device, non_blocking=True))
    return StepOutput(model.loss(student(images, mask), target, mask), images.shape[0], len(data.skipped))


# ----------------------------------------------------------------------------------------------------------------
# Set-up


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
    if cfg.runtime.strategy == "fsdp" and dist.is_enabled():
        blocks = [*model.encoder.blocks, *model.decoder.decoder_blocks]
        return dist.apply_fsdp(model.student, blocks, dtype if dtype != torch.float32 else None)
    return dist.wrap_ddp(model.student, next(model.student.parameters()).device)


def _settle_teacher(
    cfg: PretrainConfig, model: MILAN, resumed: dict[str, Any] | None, run: RunContext
) -> dict[str, Any]:
    """Makes the teacher's weights final, then casts it to its compute dtype; returns its checkpoint entries.

    A random teacher (no ``model.teacher.checkpoint``) is restored from the resumed checkpoint and saved with every
    checkpoint, always in fp32, so that a resumed smoke run is exact whatever ``runtime.teacher_dtype`` is; a real
    one is read from its file again. ``teacher_spec`` is its exact architecture, which
    :func:`milan.checkpoint.load_milan` rebuilds.
    """
    teacher = model.teacher
    if teacher is None:
        return {}
    random_teacher = not cfg.model.teacher.checkpoint
    if random_teacher and resumed is not None and "teacher" in resumed:
        teacher.load_state_dict(resumed["teacher"])
    entries: dict[str, Any] = {"teacher_spec": describe_tower(teacher.model).to_dict()}
    dtype = teacher_compute_dtype(cfg.runtime.teacher_dtype, run.device, run.dtype)
    cast = dtype != torch.float32
    if random_teacher:  # its fp32 weights (frozen: they do not change), copied before a cast
        weights = teacher.state_dict()
        entries["teacher"] = {k: v.detach().to("cpu", copy=True) for k, v in weights.items()} if cast else weights
    if cast:
        teacher.to_compute_dtype(dtype)
    return entries


def teacher_compute_dtype(choice: TeacherDtype, device: torch.device, dtype: torch.dtype) -> torch.dtype:
    """The dtype the teacher computes in (``runtime.teacher_dtype``); ``torch.float32`` means no cast.

    ``"auto"``: the run's compute ``dtype`` on CUDA when it is bf16 or fp16, else fp32 (on CPU: no change);
    ``"bf16"``/``"fp16"``: that dtype on any device (a bf16 teacher is about 3.8x faster on CPUs with AMX);
    ``"fp32"``: fp32 weights, run under the run's autocast (the references' behaviour).
    """
    if choice == "auto":
        return dtype if device.type == "cuda" and dtype in (torch.bfloat16, torch.float16) else torch.float32
    return DTYPES[choice]


def _build_loader(
    cfg: PretrainConfig, model: MILAN, device: torch.device
) -> tuple[Iterable[Any], EpochSampler | None, int, ImageDataset | None]:
    """The epoch loader, its sampler (map-style data), the micro-batches per epoch on each process, the image folder."""
    d = cfg.data
    view = pretrain_transform(
        cfg.model.encoder.img_size, scale=d.scale, ratio=d.ratio, interpolation=d.interpolation, hflip=d.hflip,
        draft=d.draft,
    )  # fmt: skip
    dataset: Dataset[Any] = build_dataset(
        d.path, view, key="data.path", max_pixels=d.max_image_pixels, shuffle_buffer=1000, seed=cfg.seed,
        num_samples=d.num_samples, allow_shell_pipes=d.allow_shell_pipes,
    )  # fmt: skip
    images = dataset if isinstance(dataset, ImageDataset) else None
    if d.decode == "device":
        dataset = EncodedImages(dataset)
    if isinstance(dataset, IterableDataset):
        if d.num_samples is None:
            raise ConfigError("data.num_samples is required for tar shards (the epoch length)")
        stream = build_loader(dataset, cfg.batch_size, drop_last=True, seed=cfg.seed, num_workers=d.num_workers)
        return stream, None, d.num_samples // (cfg.batch_size * dist.world_size()), None
    loader, sampler, batches = seeded_loader(
        dataset, batch_size=cfg.batch_size, seed=cfg.seed, noise_len=model.encoder.num_patches,
        num_workers=d.num_workers, device=device, key=f"data.path={d.path!r}",
        collate=collate_encoded if isinstance(dataset, EncodedImages) else collate_images,
    )  # fmt: skip
    return loader, sampler, batches, images


# ----------------------------------------------------------------------------------------------------------------
# What the run says


def _log_start(
    s: Session, run: RunContext, cfg: PretrainConfig, model: MILAN, optimizer: torch.optim.Optimizer, flops: float
) -> None:
    log, rt, teacher = s.log, cfg.runtime, model.teacher
    details = []
    if teacher is not None:
        weights = str(next(teacher.parameters()).dtype).removeprefix("torch.")
        under = str(run.dtype).removeprefix("torch.")
        autocast = teacher.compute_dtype is None and run.dtype != torch.float32  # no cast: under the run's autocast
        details.append(f"teacher {weights}" + (f" weights under {under} autocast" if autocast else ""))
    log.info(run.header("pretrain", details))
    if rt.precision in ("bf16", "fp16") and run.dtype == torch.float32:  # off CUDA (resolve_dtype)
        log.warning(
            f"runtime.precision={rt.precision} runs in fp32 on {run.device.type}: mixed precision is used on CUDA "
            "only; set runtime.precision=auto (or fp32) to silence this"
        )
    compiled = "off"
    if rt.compile:
        compiled = "student" + (" + teacher" if rt.compile_teacher and teacher is not None else "")
        compiled += f", mode {rt.compile_mode}" if rt.compile_mode is not None else ""
    fused = any(group.get("fused") for group in optimizer.param_groups)
    log.info(
        f"speed options: compile {compiled}; {'fused' if fused else 'unfused'} AdamW; "
        f"channels_last {rt.channels_last}; grad_checkpointing {rt.grad_checkpointing}"
    )
    n_student = sum(p.numel() for p in model.student.parameters() if p.requires_grad)
    n_teacher = sum(p.numel() for p in teacher.parameters()) if teacher is not None else 0
    log.info(
        f"model {cfg.model_name or 'custom'}: student {n_student / 1e6:.2f} M trainable params, teacher "
        f"{n_teacher / 1e6:.2f} M frozen; {flops / 1e9:.3g} GFLOP per training image"
    )
    if teacher is not None and not cfg.model.teacher.checkpoint:
        log.warning(
            "no model.teacher.checkpoint given: the teacher is RANDOMLY initialised, so its targets carry no "
            "meaning and this run is only a smoke test of the pipeline. Pass model.teacher.checkpoint=PATH "
            "(OpenAI CLIP ViT-B/16 weights) for real pretraining."
        )


def _finish(cfg: PretrainConfig, s: Session, t_start: float) -> Summary:
    state = s.state
    wall = time.perf_counter() - t_start
    images = state.images_seen - s.start_images  # this launch's (a resumed run trained the others before)
    last = s.log.last.get("loss")
    ckpt = s.checkpointer.last
    summary = Summary(
        s.run_dir, ckpt if ckpt.exists() else None, state, last if isinstance(last, float) else None, wall,
        images / max(wall, 1e-9),
    )  # fmt: skip
    if dist.is_main():
        plot = save_plot(s.run_dir / "metrics.jsonl", s.run_dir / "plot.png")[0] if cfg.log.plot else None
        loss_text = f"{summary.final_loss:.4f}" if summary.final_loss is not None else "n/a"
        since = f"; {state.images_seen} since the run began" if s.start_images else ""
        s.finish(
            {"step": state.step, "epoch": state.epoch, "images_seen": state.images_seen, "wall_time": wall,
             "final_loss": summary.final_loss, "data": s.run_report.as_dict()},
            f"done: {images} images in {wall:.1f} s ({summary.images_per_second:.1f} img/s incl. start-up{since}), "
            f"epoch {state.epoch}/{cfg.schedule.epochs}, step {state.step}, final loss {loss_text}; "
            f"{s.run_report.summary()}; checkpoint {summary.checkpoint}" + (f"; plot {plot}" if plot else ""),
        )  # fmt: skip
    return summary


def add_arguments(parser: argparse.ArgumentParser, command: str) -> None:
    add_run_arguments(parser, "configs/pretrain/demo_cpu.yaml", overrides_example="batch_size=64 optim.blr=3e-4")


def run(args: argparse.Namespace) -> int:
    return run_job(args, PretrainConfig, check_pretrain, pretrain)
