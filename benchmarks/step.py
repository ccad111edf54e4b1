"""Times one full MILAN pretraining step, and optionally mmpretrain 1.2.0's MILAN on the same batch.

A step is what training does per batch: the teacher's forward pass, the semantic-aware mask draw, the student's
encoder and decoder forward pass, the loss, the backward pass and one AdamW update. Input is a fixed synthetic
batch (``torch.randn``), so this measures the model, not the data pipeline (see ``benchmarks/data.py`` for that).

    python benchmarks/step.py --model milan_vit_base_patch16 --batch-size 256 --device cuda --precision bf16 \\
        --reference --json benchmarks/results/gpu_h200_vitb16_bs256_bf16.json

What it does, in order:

1. builds our MILAN (and, with ``--reference``, mmpretrain's MILAN at the same dimensions through
   ``tests/parity/mm_reference.py``, whose weights are then copied into ours, so both start identical);
2. with ``--reference``: a sanity check that both losses agree on the same images and the same forced mask;
3. warm-up steps for each model (compilation happens here), with the peak memory of the last one recorded;
4. ``--rounds`` timed rounds; in each, ``--steps`` consecutive steps of one model then the other, alternating
   which goes first, so that slow drifts of a shared machine hit both alike; the medians give img/s and the
   median of the per-round ratios gives the speed-up;
5. a separate instrumented pass (``--breakdown-steps`` steps each) with a synchronisation point between stages,
   for the per-stage times, so that the main timing is not perturbed by them.

FLOPs per image are counted analytically by ``milan.flops.pretrain_flops`` (see benchmarks/README.md); MFU is
achieved FLOP/s over the chip's dense bf16 peak (``milan.flops.peak_flops``'s table, or ``--peak-tflops``).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: import `benchmarks.*` from the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.nn as nn

from benchmarks.environment import REPO, cpu_name, git_state, package_version
from milan.flops import peak_flops
from milan.masking import attention_masking
from milan.models import MILAN, build_milan, model_config
from milan.models.compile import compile_milan
from milan.models.factory import model_flops

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
OPTIMIZERS = ("fused", "foreach", "forloop", "stock")
ADAMW = {"lr": 1.5e-4, "betas": (0.9, 0.95), "weight_decay": 0.05}  # MILAN's recipe (lr before the batch scaling)

# ---------------------------------------------------------------------------------------------------------------
# Environment
# ---------------------------------------------------------------------------------------------------------------


def environment(device: torch.device) -> dict[str, Any]:
    """Hardware, versions, date and commit, for the JSON record."""
    hw: dict[str, Any] = {
        "cpu": cpu_name(),
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        hw.update(
            gpu=props.name,
            gpu_count=torch.cuda.device_count(),
            gpu_memory_gib=round(props.total_memory / 2**30, 1),
            gpu_capability=f"{props.major}.{props.minor}",
            cuda=torch.version.cuda,
            cudnn=torch.backends.cudnn.version(),
        )
    versions = {"python": platform.python_version()}
    for dist in ("torch", "torchvision", "timm", "mmpretrain", "mmengine", "mmcv-lite", "mmcv", "numpy"):
        versions[dist] = package_version(dist)
    return {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "git": git_state(),
        "hardware": hw,
        "versions": {k: v for k, v in versions.items() if v is not None},
    }


# ---------------------------------------------------------------------------------------------------------------
# Memory and time
# ---------------------------------------------------------------------------------------------------------------


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class PeakMemory:
    """Peak memory of a phase: CUDA ``max_memory_allocated``; on CPU the process's peak RSS (``VmHWM``, reset
    through ``/proc/self/clear_refs`` where allowed, else the lifetime ``ru_maxrss``)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.resettable = device.type == "cuda"

    def reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        try:
            Path("/proc/self/clear_refs").write_text("5")
            self.resettable = True
        except OSError:
            self.resettable = False

    def allocated(self) -> int:
        return torch.cuda.memory_allocated(self.device) if self.device.type == "cuda" else 0

    def peak(self) -> int:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device)
        with contextlib.suppress(OSError, ValueError):
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def kind(self) -> str:
        if self.device.type == "cuda":
            return "cuda max_memory_allocated, other model's resident memory subtracted"
        return "process peak RSS (includes Python, torch and every model built)" + (
            "" if self.resettable else ", lifetime peak"
        )


class Clock:
    """Synchronised time marks for the instrumented pass (wall time, and the process's CPU time)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.marks: dict[str, float] = {}
        self.cpu_marks: dict[str, float] = {}

    def __call__(self, name: str) -> None:
        synchronize(self.device)
        self.marks[name] = time.perf_counter()
        self.cpu_marks[name] = time.process_time()

    def alias(self, name: str, existing: str) -> None:
        self.marks[name], self.cpu_marks[name] = self.marks[existing], self.cpu_marks[existing]


# ---------------------------------------------------------------------------------------------------------------
# The two steps
# ---------------------------------------------------------------------------------------------------------------


def make_adamw(params: list[nn.Parameter], impl: str) -> torch.optim.Optimizer:
    """AdamW with MILAN's hyper-parameters. ``stock``: torch's own choice (for-loop on CPU, foreach on CUDA),
    which is what mmengine builds for mmpretrain; ``fused``: one fused kernel (our training loop's choice)."""
    if impl == "stock":
        return torch.optim.AdamW(params, **ADAMW)  # type: ignore[arg-type]
    flags = {"fused": {"fused": True}, "foreach": {"foreach": True}, "forloop": {"foreach": False}}[impl]
    return torch.optim.AdamW(params, **ADAMW, **flags)  # type: ignore[arg-type]


def _optimizer_impl(optimizer: torch.optim.Optimizer) -> str:
    group = optimizer.param_groups[0]
    if group.get("fused"):
        return "fused"
    if group.get("foreach"):
        return "foreach"
    if group.get("foreach") is None and all(p.is_cuda for p in group["params"]):
        return "foreach (torch default on CUDA)"
    return "for-loop"


@dataclass
class Runner:
    """One model's step, with its optimizer, its instrumented variant and its results."""

    name: str
    module: nn.Module
    optimizer: torch.optim.Optimizer
    forward: Callable[[], torch.Tensor]  # the loss, under autocast
    hooks: Callable[[Clock], list[Any]]  # installs the stage marks, returns the handles
    device: torch.device
    scaler: torch.amp.GradScaler | None = None
    mask_inside_student: bool = False  # mmpretrain draws the mask inside its backbone's forward
    times: list[float] = field(default_factory=list)
    cpu_times: list[float] = field(default_factory=list)  # process CPU seconds per step (CPU runs)
    stages: list[dict[str, float]] = field(default_factory=list)
    cpu_stages: list[dict[str, float]] = field(default_factory=list)
    peak_bytes: int = 0
    losses: list[float] = field(default_factory=list)

    def step(self, clock: Clock | None = None) -> torch.Tensor:
        loss = self.forward()
        if clock:
            clock("forward_end")
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
        else:
            loss.backward()
        if clock:
            clock("backward_end")
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if clock:
            clock("step_end")
        return loss.detach()

    def instrumented_step(self) -> None:
        """One step with a mark between stages; appends the stage times (wall and CPU) to ``stages``."""
        clock = Clock(self.device)
        handles = self.hooks(clock)
        try:
            clock("start")
            self.step(clock)
        finally:
            for h in handles:
                h.remove()
        if not self.mask_inside_student:  # ours: the mask is drawn between the teacher and the student
            clock.alias("mask_start", "teacher_end")
            clock.alias("mask_end", "student_start")
        self.stages.append(self._stages(clock.marks))
        self.cpu_stages.append(self._stages(clock.cpu_marks))

    def _stages(self, marks: dict[str, float]) -> dict[str, float]:
        def m(start: str, end: str) -> float:
            return marks[end] - marks[start]

        mask = m("mask_start", "mask_end")
        stages = {
            "teacher_forward": m("teacher_start", "teacher_end"),
            "mask_draw": mask,
            "student_forward": m("student_start", "student_end") - (mask if self.mask_inside_student else 0.0),
            "loss": m("student_end", "forward_end"),
            "backward": m("forward_end", "backward_end"),
            "optimizer": m("backward_end", "step_end"),
        }
        stages["other"] = m("start", "step_end") - sum(stages.values())
        return stages


def _mark_hooks(module: nn.Module, clock: Clock, start: str, end: str) -> list[Any]:
    return [
        module.register_forward_pre_hook(lambda *_: clock(start)),
        module.register_forward_hook(lambda *_: clock(end)),
    ]


def ours_runner(
    model: MILAN,
    images: Callable[[], torch.Tensor],
    precision: str,
    optimizer: torch.optim.Optimizer,
    device: torch.device,
    seed: int,
    name: str = "ours",
) -> Runner:
    dtype = PRECISIONS[precision]
    generator = torch.Generator(device).manual_seed(seed)
    assert model.teacher is not None

    def forward() -> torch.Tensor:
        x = images()
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            noise = torch.rand(x.shape[0], model.encoder.num_patches, generator=generator, device=device)
            return model(x, noise=noise).loss

    def hooks(clock: Clock) -> list[Any]:
        assert model.teacher is not None
        handles = _mark_hooks(model.teacher, clock, "teacher_start", "teacher_end")
        return handles + _mark_hooks(model.student, clock, "student_start", "student_end")

    scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None
    return Runner(name, model, optimizer, forward, hooks, device, scaler)


class JpegBatches:
    """Batches of the MILAN pretraining view from a JPEG folder (``milan.data``), endlessly, timing the waits."""

    def __init__(self, folder: Path, img_size: int, args: argparse.Namespace, device: torch.device) -> None:
        from milan.data import build_dataset, build_loader, collate_images, pretrain_transform
        from milan.data.device import DeviceAugment, EncodedImages, collate_encoded

        dataset: Any = build_dataset(folder, pretrain_transform(img_size))
        dataset = EncodedImages(dataset) if args.decode == "device" else dataset
        self.loader = build_loader(
            dataset, args.batch_size, num_workers=args.workers, drop_last=True, seed=args.seed,
            collate_fn=collate_encoded if args.decode == "device" else collate_images,
        )  # fmt: skip
        self.augment = DeviceAugment(img_size) if args.decode == "device" else None
        self.device = device
        self.channels_last = args.channels_last
        self.wait = 0.0
        self.images = 0
        self.folder = folder
        self._stream = self._endless()

    def _endless(self) -> Iterator[Any]:
        while True:
            yield from self.loader

    def _next(self) -> Any:
        batch = next(self._stream)
        if self.augment is None:
            return batch
        from milan.data.device import decode_batch

        return decode_batch(batch, self.augment, self.device)[0]

    def __call__(self) -> torch.Tensor:
        start = time.perf_counter()
        batch = self._next()
        while batch.empty:
            batch = self._next()
        self.wait += time.perf_counter() - start  # with --decode device: includes decoding and augmenting
        self.images += len(batch)
        x: torch.Tensor = batch.images.to(self.device, non_blocking=True)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x


def reference_runner(
    reference: nn.Module, images: torch.Tensor, precision: str, optimizer: str, device: torch.device
) -> Runner:
    dtype = PRECISIONS[precision]
    backbone: Any = reference.backbone

    def forward() -> torch.Tensor:
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss: torch.Tensor = reference.loss(images, None)["loss"]  # type: ignore[operator]
            return loss

    def hooks(clock: Clock) -> list[Any]:
        handles = _mark_hooks(reference.target_generator, clock, "teacher_start", "teacher_end")  # type: ignore[arg-type]
        handles += _mark_hooks(backbone, clock, "student_start", "backbone_end")
        handles += _mark_hooks(reference.neck, clock, "neck_start", "student_end")  # type: ignore[arg-type]
        real = backbone.attention_masking

        def timed(*args: Any, **kwargs: Any) -> Any:
            clock("mask_start")
            out = real(*args, **kwargs)
            clock("mask_end")
            return out

        backbone.attention_masking = timed

        class _Restore:
            def remove(self) -> None:
                del backbone.attention_masking

        return [*handles, _Restore()]

    # The teacher (target_generator) is frozen: out of the optimizer, as in ours.
    params = [p for n, p in reference.named_parameters() if p.requires_grad and not n.startswith("target_generator.")]
    scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None
    return Runner("reference", reference, make_adamw(params, optimizer), forward, hooks, device, scaler, True)


def loss_check(
    ours: MILAN,
    reference: nn.Module,
    images: torch.Tensor,
    precision: str,
    device: torch.device,
    teacher_dtype: torch.dtype | None,
) -> dict[str, Any]:
    """Both losses on the same images (up to 8) and the same forced mask, before any update; then ours again with
    the teacher in ``teacher_dtype`` (applied here, as the timed model runs it)."""
    from tests.parity.mm_reference import forced_multinomial

    dtype = PRECISIONS[precision]
    x = images[:8]
    assert ours.teacher is not None
    with torch.no_grad(), torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
        importance = ours.teacher(x).cls_attention
        noise = torch.rand(importance.shape, generator=torch.Generator(device).manual_seed(1), device=device)
        mask = attention_masking(importance, ours.mask_ratio, noise)
        ours_loss = ours(x, mask=mask).loss.item()
        with forced_multinomial(mask.ids_shuffle):
            ref_loss = reference.loss(x, None)["loss"].item()  # type: ignore[operator]
        check = {"images": x.shape[0], "ours": ours_loss, "reference": ref_loss, "abs_diff": abs(ours_loss - ref_loss)}
        if teacher_dtype is not None:
            ours.teacher.to_compute_dtype(teacher_dtype)
            check["ours_with_teacher_dtype"] = ours(x, mask=mask).loss.item()
            check["teacher_dtype"] = str(teacher_dtype)
    return check


# ---------------------------------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------------------------------


def _warm_up(runner: Runner, steps: int, memory: PeakMemory, other_resident: int) -> None:
    for i in range(steps):
        if i == steps - 1:  # steady state: the optimizer state exists and compilation is done
            synchronize(runner.device)
            memory.reset()
        loss = runner.step()
        runner.losses.append(loss.item())
    synchronize(runner.device)
    runner.peak_bytes = memory.peak() - other_resident


def _median_stages(samples: list[dict[str, float]]) -> dict[str, float]:
    return {k: statistics.median(s[k] for s in samples) for k in samples[0]} if samples else {}


def _summary(runner: Runner, batch: int, flops: float, peak: float | None, memory: PeakMemory) -> dict[str, Any]:
    median = statistics.median(runner.times)
    stages = _median_stages(runner.stages)
    achieved = flops * batch / median / 1e12
    return {
        "img_per_s": batch / median,
        "img_per_s_best": batch / min(runner.times),
        "step_s_median": median,
        "step_s": runner.times,
        "peak_memory_gib": runner.peak_bytes / 2**30,
        "memory_kind": memory.kind(),
        "breakdown_s": stages,
        "breakdown_fraction": {k: v / sum(stages.values()) for k, v in stages.items()} if stages else {},
        "achieved_tflops": achieved,
        "mfu": achieved * 1e12 / peak if peak else None,
        "optimizer": _optimizer_impl(runner.optimizer),
        "warmup_losses": runner.losses,
        # CPU runs: the process's CPU time per step (user + system, all threads). On a shared machine it is far
        # less sensitive to other jobs than wall time (exact with --threads 1; with more threads it also counts
        # the OpenMP threads' spin-waiting).
        "cpu_s_median": statistics.median(runner.cpu_times) if runner.cpu_times else None,
        "cpu_s": runner.cpu_times,
        "breakdown_cpu_s": _median_stages(runner.cpu_stages) if runner.device.type == "cpu" else {},
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Runs the benchmark described by the parsed arguments and returns the JSON record."""
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.warmup < 2:
        raise SystemExit("--warmup must be >= 2 (the peak memory is read on the last warm-up step)")
    cfg = model_config(args.model)
    torch.manual_seed(args.seed)
    memory = PeakMemory(device)

    reference = None
    if args.reference:
        sys.path.insert(0, str(REPO))  # tests/parity/mm_reference.py builds mmpretrain's MILAN at any size
        from tests.parity.mm_reference import build_reference, load_reference_into

        reference = build_reference(cfg, seed=args.seed)
    ours = build_milan(cfg)
    if reference is not None:
        load_reference_into(ours, reference)
    assert ours.teacher is not None, "the benchmark times MILAN with its teacher"
    teacher_dtype = PRECISIONS[args.precision] if args.teacher_dtype == "auto" else PRECISIONS[args.teacher_dtype]

    images = torch.randn(
        args.batch_size, 3, cfg.encoder.img_size, cfg.encoder.img_size, generator=torch.Generator().manual_seed(0)
    ).to(device)
    ours.to(device)
    if args.channels_last:
        ours.to(memory_format=torch.channels_last)
        images_ours = images.contiguous(memory_format=torch.channels_last)
    else:
        images_ours = images
    ours_resident = memory.allocated()
    ref_resident = 0
    record: dict[str, Any] = environment(device)
    record["args"] = vars(args)
    if reference is not None:
        reference.to(device)
        ref_resident = memory.allocated() - ours_resident
        record["loss_check"] = loss_check(ours, reference, images, args.precision, device, teacher_dtype)
    if teacher_dtype is not None and ours.teacher.compute_dtype != teacher_dtype:
        ours.teacher.to_compute_dtype(teacher_dtype)
    if args.compile:
        compile_milan(ours, mode=args.compile_mode, backend=args.compile_backend)

    optimizer = make_adamw([p for p in ours.parameters() if p.requires_grad], args.optimizer)
    runners = [ours_runner(ours, lambda: images_ours, args.precision, optimizer, device, args.seed)]
    _warm_up(runners[0], args.warmup, memory, ref_resident)
    if reference is not None:
        ours_resident = memory.allocated() - ref_resident
        runners.append(reference_runner(reference, images, args.precision, args.reference_optimizer, device))
        _warm_up(runners[-1], args.warmup, memory, ours_resident)
    jpegs = None
    if args.data is not None:  # the same model and optimizer, fed from JPEG files instead of the fixed batch
        jpegs = JpegBatches(args.data, cfg.encoder.img_size, args, device)
        runners.append(ours_runner(ours, jpegs, args.precision, optimizer, device, args.seed + 1, "ours_data"))
        _warm_up(runners[-1], args.warmup, memory, ref_resident)
        jpegs.wait, jpegs.images = 0.0, 0

    for r in range(args.rounds):
        for runner in runners if r % 2 == 0 else runners[::-1]:
            synchronize(device)
            start, cpu_start = time.perf_counter(), time.process_time()
            for _ in range(args.steps):
                runner.step()
            synchronize(device)
            runner.times.append((time.perf_counter() - start) / args.steps)
            runner.cpu_times.append((time.process_time() - cpu_start) / args.steps)
        if args.verbose:
            print(
                f"round {r}: "
                + "  ".join(
                    f"{x.name} {args.batch_size / x.times[-1]:.2f} img/s ({x.cpu_times[-1]:.2f} cpu-s)" for x in runners
                )
            )
    data_seconds = sum(runners[-1].times) * args.steps if jpegs is not None else 0.0
    data_wait = jpegs.wait if jpegs is not None else 0.0
    for _ in range(args.breakdown_steps):
        for runner in runners:
            runner.instrumented_step()

    counted = model_flops(cfg)
    flops = counted.total
    peak = peak_flops(device, args.peak_tflops)
    record["flops_per_image"] = {
        "teacher_forward": counted.teacher,
        "student_forward": counted.student_forward,
        "student_backward": 2 * counted.student_forward - counted.patch_embed,
        "total": counted.total,
        "source": "milan.flops.pretrain_flops (matmuls only; backward = 2x forward, no input gradient of the images)",
    }
    record["peak_tflops"] = peak / 1e12 if peak else None
    compute = ours.teacher.compute_dtype
    autocast = "" if args.precision == "fp32" else f" weights under {args.precision} autocast"
    record["teacher_dtype"] = str(compute).replace("torch.", "") if compute is not None else f"float32{autocast}"
    record["ours"] = _summary(runners[0], args.batch_size, flops, peak, memory)
    if args.compile:
        record["ours"]["compile"] = {"mode": args.compile_mode, "backend": args.compile_backend}
    if jpegs is not None:
        data = _summary(runners[-1], args.batch_size, flops, peak, memory)
        record["data"] = {
            "folder": str(jpegs.folder),
            "images": len(jpegs.loader.dataset),  # type: ignore[arg-type]
            "workers": args.workers,
            "img_per_s": data["img_per_s"],
            "img_per_s_best": data["img_per_s_best"],
            "step_s": data["step_s"],
            "breakdown_s": data["breakdown_s"],
            "fraction_of_synthetic": data["img_per_s"] / record["ours"]["img_per_s"],
            "data_wait_fraction": data_wait / data_seconds if data_seconds else None,
        }
    if reference is not None:
        record["reference"] = _summary(runners[1], args.batch_size, flops, peak, memory)
        paired = [r / o for o, r in zip(runners[0].times, runners[1].times, strict=True)]
        record["ratio"] = {
            "paired_median": statistics.median(paired),
            "of_medians": record["ours"]["img_per_s"] / record["reference"]["img_per_s"],
            "of_best": record["ours"]["img_per_s_best"] / record["reference"]["img_per_s_best"],
            "per_round": paired,
        }
        if device.type == "cpu":
            cpu_paired = [r / o for o, r in zip(runners[0].cpu_times, runners[1].cpu_times, strict=True)]
            record["ratio"]["cpu_time_paired_median"] = statistics.median(cpu_paired)
            record["ratio"]["cpu_time_per_round"] = cpu_paired
    return record


def _print(record: dict[str, Any]) -> None:
    args, hw = record["args"], record["hardware"]
    print(
        f"{args['model']}  batch {args['batch_size']}  {args['device']}  {args['precision']}"
        f"  rounds {args['rounds']} x {args['steps']} steps  ({hw.get('gpu', hw['cpu'])})"
    )
    for name in ("ours", "reference"):
        if name not in record:
            continue
        r = record[name]
        mfu = f"  MFU {100 * r['mfu']:.1f}%" if r["mfu"] else ""
        print(
            f"  {name:9s} {r['img_per_s']:9.2f} img/s (best {r['img_per_s_best']:.2f})  "
            f"peak {r['peak_memory_gib']:.2f} GiB  {r['achieved_tflops']:.2f} TFLOP/s{mfu}  [{r['optimizer']}]"
        )
        if r["breakdown_s"]:
            print("     wall   " + "  ".join(f"{k} {1e3 * v:.1f}ms" for k, v in r["breakdown_s"].items()))
        if r.get("breakdown_cpu_s"):
            print("     cpu    " + "  ".join(f"{k} {1e3 * v:.1f}ms" for k, v in r["breakdown_cpu_s"].items()))
    if "data" in record:
        d = record["data"]
        print(
            f"  from JPEGs ({d['workers']} workers): {d['img_per_s']:.2f} img/s = "
            f"{100 * d['fraction_of_synthetic']:.1f}% of synthetic, "
            f"data wait {100 * (d['data_wait_fraction'] or 0):.1f}%"
        )
    if "ratio" in record:
        q = record["ratio"]
        cpu = f", {q['cpu_time_paired_median']:.3f} (process CPU time)" if "cpu_time_paired_median" in q else ""
        print(f"  ratio ours/reference: {q['paired_median']:.3f} (paired median), {q['of_best']:.3f} (best){cpu}")
    if "loss_check" in record:
        c = record["loss_check"]
        print(f"  loss check: ours {c['ours']:.6f}  reference {c['reference']:.6f}  |diff| {c['abs_diff']:.2e}")
        if "ours_with_teacher_dtype" in c:
            print(f"  ours with the teacher in {c['teacher_dtype']}: {c['ours_with_teacher_dtype']:.6f}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="milan_vit_base_patch16", help="a name from milan.models.list_models()")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--precision", choices=tuple(PRECISIONS), default="bf16", help="autocast dtype (fp32: none)")
    p.add_argument(
        "--teacher-dtype",
        choices=("auto", *PRECISIONS),
        default="auto",
        help="our teacher's weights and compute dtype; auto = the autocast dtype (fp32 for --precision fp32)",
    )
    p.add_argument("--compile", action="store_true", help="torch.compile our student and teacher (eager fallback)")
    p.add_argument("--compile-mode", default=None, help="torch.compile mode, e.g. max-autotune-no-cudagraphs")
    p.add_argument("--compile-backend", default="inductor")
    p.add_argument("--channels-last", action="store_true", help="channels-last input and patch convolutions (ours)")
    p.add_argument("--optimizer", choices=OPTIMIZERS, default="fused", help="our AdamW implementation")
    p.add_argument(
        "--reference-optimizer",
        choices=OPTIMIZERS,
        default="stock",
        help="the reference's AdamW: stock = what mmengine builds (torch's default implementation)",
    )
    p.add_argument("--reference", action="store_true", help="also time mmpretrain 1.2.0's MILAN (`parity` extra)")
    p.add_argument("--data", type=Path, default=None, help="also time our step fed from this JPEG folder")
    p.add_argument("--workers", type=int, default=8, help="data-loader workers for --data")
    p.add_argument(
        "--decode",
        choices=("cpu", "device"),
        default="cpu",
        help="--data: decode in the workers (cpu) or in batches on the device (data.decode=device: nvJPEG on CUDA)",
    )
    p.add_argument("--warmup", type=int, default=3, help="warm-up steps per model (>= 2)")
    p.add_argument("--rounds", type=int, default=5, help="timed rounds (each model once per round)")
    p.add_argument("--steps", type=int, default=5, help="consecutive steps per model per round")
    p.add_argument("--breakdown-steps", type=int, default=2, help="instrumented steps per model (0: none)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: leave torch's default)")
    p.add_argument(
        "--peak-tflops", type=float, default=None, help="the chip's dense peak for MFU (default: milan.flops table)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None, help="write the record here")
    p.add_argument("--verbose", action="store_true", help="print every round")
    return p.parse_args(argv)


@contextlib.contextmanager
def _quiet_warnings() -> Iterator[None]:
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*(TypedStorage|torch.cuda.amp|pkg_resources).*")
        yield


def markdown_table(paths: list[Path]) -> str:
    """The README's results table from recorded JSON files."""
    rows = [
        "| run | hardware | model, batch, precision | options | ours img/s | reference img/s | ratio (paired median)"
        " | ratio (CPU time) | rounds x steps | ours peak GiB | MFU | date, commit |",
        "| --- | --- | --- | --- | ---: | ---: | ---: | ---: | --- | ---: | ---: | --- |",
    ]
    for path in paths:
        r = json.loads(path.read_text())
        a, ours, ref = r["args"], r["ours"], r.get("reference")
        options = [k for k in ("compile", "channels_last") if a.get(k)]
        options += [f"mode={a['compile_mode']}"] if a.get("compile_mode") else []
        options += [f"teacher {r.get('teacher_dtype', '?')}", f"ours AdamW {ours['optimizer']}"]
        options += [f"ref AdamW {ref['optimizer']}"] if ref else []
        options += [f"{a['threads']} threads"] if a.get("threads") else []
        hw = r["hardware"].get("gpu") or f"{r['hardware']['cpu']} ({r['hardware']['cpu_cores']} cores)"
        ratio = f"{r['ratio']['paired_median']:.3f}" if "ratio" in r else "-"
        ref_rate = f"{ref['img_per_s']:.2f}" if ref else "-"
        cpu_ratio = r.get("ratio", {}).get("cpu_time_paired_median")
        cpu_ratio_text = f"{cpu_ratio:.3f}" if cpu_ratio else "-"
        mfu = f"{100 * ours['mfu']:.1f}%" if ours.get("mfu") else "-"
        dirty = "+dirty" if r["git"].get("dirty") else ""
        rows.append(
            f"| {path.name} | {hw} | {a['model']}, {a['batch_size']}, {a['precision']} | {', '.join(options)} | "
            f"{ours['img_per_s']:.2f} | {ref_rate} | {ratio} | {cpu_ratio_text} | "
            f"{a['rounds']} x {a['steps']} | {ours['peak_memory_gib']:.2f} | {mfu} | "
            f"{r['date'][:10]}, {r['git']['commit'][:8]}{dirty} |"
        )
        if "data" in r:
            d = r["data"]
            rows.append(
                f"| {path.name} (from JPEGs) | {hw} | {a['model']}, {a['batch_size']}, {a['precision']} | "
                f"{d['workers']} workers | {d['img_per_s']:.2f} | - | {d['fraction_of_synthetic']:.3f} of synthetic"
                f" | - | {a['rounds']} x {a['steps']} | - | - | {r['date'][:10]} |"
            )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    if argv[:1] == ["--table"]:  # python benchmarks/step.py --table benchmarks/results/*.json
        print(markdown_table([Path(p) for p in argv[1:] if p.endswith(".json")]))
        return 0
    args = parse_args(argv)
    with _quiet_warnings():
        record = run(args)
    record["args"] = {k: str(v) if isinstance(v, Path) else v for k, v in record["args"].items()}
    _print(record)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(record, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
