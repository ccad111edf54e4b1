"""A small-scale replica of MILAN's comparison on real images: ``python benchmarks/proxy/run.py --out DIR``.

1. Trains the stand-in teacher (a CLIP-shaped ViT, supervised on the Tiny-ImageNet subset; NOT CLIP) and saves it
   in the library's teacher format.
2. Pretrains the same small ViT student on CIFAR-10 train images (labels unused) with the same budget in every arm,
   through the library's own pretraining job (:func:`milan.jobs.pretrain.pretrain`):
   (a) MILAN; (b) random masking; (c) a standard MAE decoder; (d) MAE with pixel targets.
3. Evaluates (a)-(d), (e) the randomly initialised student and the teacher itself with weighted k-NN and a linear
   probe on frozen CLS features of CIFAR-10 test, for every seed.
4. Writes ``DIR/results.json``, ``DIR/results.md`` (the table) and ``DIR/results.png`` (the bar chart).

The teacher is trained first, alone, on every thread. The (arm, seed) tasks of steps 2-3 then run ``--jobs`` at a
time in worker processes (default on a CPU: one process per core with one torch thread each; on a GPU: one after
the other). Every task seeds itself, so the results do not depend on how the tasks are spread over processes.

Modes: the default (``full``) is sized for about 10 minutes on one GPU; ``--quick`` for under 30 minutes on 2 idle
CPU cores; ``--smoke`` runs the whole pipeline on a handful of images in well under a minute (tests).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as dt
import json
import multiprocessing
import os
import platform
import resource
import shutil
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: import `benchmarks.proxy` from the repository root instead
    _here = str(Path(__file__).resolve().parent)
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _here]
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch

from benchmarks.environment import cpu_name, git_state
from benchmarks.proxy import probe, report
from benchmarks.proxy.data import (
    cifar_eval_tensors,
    cifar_root,
    data_dir,
    folder_tensors,
    normalize,
    split_per_class,
)
from benchmarks.proxy.settings import ARMS, IMG_SIZE, MODES, Arm, Budget, model_config
from benchmarks.proxy.teacher import TeacherResult, train_teacher
from milan.checkpoint import load_encoder, load_teacher
from milan.jobs.pretrain import pretrain, seed_everything
from milan.models.factory import build_encoder
from milan.models.vit import VisionTransformer
from milan.train.config import (
    AdamWConfig,
    CheckpointConfig,
    PlotLogConfig,
    PretrainConfig,
    PretrainDataConfig,
    PretrainRuntimeConfig,
    ScheduleConfig,
)

PUBLISHED = ("results.json", "results.md", "results.png")


def log(message: str) -> None:
    print(f"[{dt.datetime.now():%H:%M:%S}] {message}", flush=True)


def pretrain_config(
    arm: Arm,
    budget: Budget,
    seed: int,
    teacher: Path,
    train_root: Path,
    out: Path,
    device: str,
    threads: int | None = None,
) -> PretrainConfig:
    """The arm's pretraining job: identical data, optimizer, schedule and student in every arm."""
    s = budget.student
    return PretrainConfig(
        out_dir=str(out / "runs" / f"{arm.name}-seed{seed}"),
        seed=seed,
        batch_size=s.batch_size,
        model_name=None,
        model=model_config(arm, budget, str(teacher)),
        data=PretrainDataConfig(path=str(train_root), scale=s.crop_scale, num_workers=budget.num_workers),
        optim=AdamWConfig(lr=s.lr, weight_decay=s.weight_decay),
        schedule=ScheduleConfig(epochs=s.epochs, warmup_epochs=s.warmup_epochs),
        runtime=PretrainRuntimeConfig(device=device, cpu_threads=threads),  # type: ignore[arg-type]
        checkpoint=CheckpointConfig(every_epochs=0, keep=0),
        log=PlotLogConfig(every_steps=10, progress=False, tensorboard=False, plot=False),
    )


@dataclass(frozen=True)
class Job:
    """What every (arm, seed) task needs; sent to the worker processes."""

    budget: Budget
    data_root: str
    teacher_path: str
    train_root: str
    out: str
    device: str
    threads: int | None  # torch threads of each task (None: torch's default)
    holdout: bool = False  # evaluate on held-out CIFAR-10 train images instead of the test set


def parallelism(device: torch.device, tasks: int, jobs: int | None, threads: int | None) -> tuple[int, int | None]:
    """``(parallel tasks, torch threads per task)``.

    On a CPU the tasks run in parallel processes with one thread each by default (one per core): this proxy's
    models are so small that two one-thread processes get about twice the work done of one two-thread process
    (which also idles a core while the data pipeline decodes). On a GPU they run one after the other.
    """
    if device.type != "cpu":
        return jobs or 1, threads
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    jobs = max(1, min(jobs or cores, tasks))
    return jobs, threads or max(1, cores // jobs)


_EVAL_DATA: dict[str, torch.Tensor] = {}  # a worker's evaluation images, loaded once per process


def eval_data(budget: Budget, data_root: Path, holdout: bool = False) -> dict[str, torch.Tensor]:
    """The labelled CIFAR-10 train (k-NN bank, probe) and test images, normalised, from the tensor cache.

    With ``holdout``, the "test" images are the last ``test_per_class`` CIFAR-10 *train* images of every class
    instead (never in the k-NN bank or the probe's training set, nor, in ``--quick``, among the pretraining images):
    a validation split for choosing settings without looking at the test set.
    """
    if not _EVAL_DATA:
        ev = budget.eval
        train_x, train_y = cifar_eval_tensors(data_root, "train", ev.train_per_class, IMG_SIZE)
        if holdout:
            images, labels = folder_tensors(cifar_root(data_root, "train", None), IMG_SIZE)
            per_class = ev.test_per_class or 500
            _, held = split_per_class(labels, per_class)
            test_x, test_y = normalize(images[held]), labels[held]
        else:
            test_x, test_y = cifar_eval_tensors(data_root, "test", ev.test_per_class, IMG_SIZE)
        _EVAL_DATA.update(train_x=train_x, train_y=train_y, test_x=test_x, test_y=test_y)
    return _EVAL_DATA


def _init_worker(threads: int | None) -> None:
    if threads:
        torch.set_num_threads(threads)


def run_task(job: Job, arm_name: str, seed: int) -> dict[str, Any]:
    """Pretrains one arm with one seed (if it has pretraining) and evaluates its encoder: one row of results."""
    arm = next(a for a in ARMS if a.name == arm_name)
    budget, device = job.budget, torch.device(job.device)
    if job.threads:
        torch.set_num_threads(job.threads)
    data = eval_data(budget, Path(job.data_root), job.holdout)
    row: dict[str, Any] = {"arm": arm.name, "seed": seed}
    if arm.pretrain:
        cfg = pretrain_config(
            arm, budget, seed, Path(job.teacher_path), Path(job.train_root), Path(job.out), job.device, job.threads
        )
        log(f"pretraining {arm.name} seed {seed}")
        summary = pretrain(cfg)
        row.update(
            pretrain_wall_s=summary.wall_time,
            final_loss=summary.final_loss,
            pretrain_images=summary.state.images_seen,
            pretrain_steps=summary.state.step,
            img_per_s=summary.images_per_second,
            run_dir=str(summary.run_dir),
        )
        if summary.checkpoint is None:
            raise RuntimeError(f"{arm.name} seed {seed}: the pretraining run wrote no checkpoint")
        fn = cls_of(load_encoder(summary.checkpoint).to(device))
    elif arm.name == "random_init":
        seed_everything(seed)
        fn = cls_of(build_encoder(model_config(arm, budget, None).encoder).to(device))
    else:
        raise ValueError(f"{arm.name} is evaluated in the main process")
    row.update(evaluate(fn, data, device, budget, seed))
    log(f"  {arm.name} seed {seed}: k-NN {row['knn_top1']:.1f} %, linear probe {row['linprobe_top1']:.1f} %")
    return row


def cpu_seconds() -> float:
    """User + system CPU time of this process and its finished children (e.g. data-loader workers)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def hardware(device: torch.device, jobs: int, threads: int | None) -> dict[str, Any]:
    info: dict[str, Any] = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU",
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "threads": threads or torch.get_num_threads(),  # per task
        "parallel_tasks": jobs,
        "platform": platform.platform(),
    }
    with contextlib.suppress(OSError):
        info["load_average_at_start"] = list(os.getloadavg())
    return info


def evaluate(
    fn: Any,
    data: dict[str, torch.Tensor],
    device: torch.device,
    budget: Budget,
    seed: int,
    cache: dict[str, torch.Tensor] | None = None,
) -> dict[str, float]:
    """k-NN and linear-probe top-1 of one feature function (features kept in ``cache`` when given)."""
    t0 = time.perf_counter()
    if cache is not None and cache:
        train, test = cache["train"], cache["test"]
    else:
        train = probe.features(fn, data["train_x"], data["train_y"], device)
        test = probe.features(fn, data["test_x"], data["test_y"], device)
        if cache is not None:
            cache.update(train=train, test=test)
    knn = probe.knn_top1(train, data["train_y"], test, data["test_y"], budget.eval)
    lin = probe.linear_probe_top1(train, data["train_y"], test, data["test_y"], budget.eval, seed=seed)
    return {
        "knn_top1": knn,
        "linprobe_top1": lin,
        "feature_dim": int(train.shape[1]),
        "eval_wall_s": time.perf_counter() - t0,
    }


def cls_of(encoder: VisionTransformer) -> Any:
    encoder.eval()
    return lambda x: encoder.forward_features(x)[:, 0]  # (B, D) CLS after the final LayerNorm


def write_report(out: Path, results: dict[str, Any], publish: str | None) -> None:
    """results.md and results.png from the results (and copies of all three into ``publish``)."""
    results["summary"] = report.summarize(results["runs"])
    results["ordering"] = report.ordering(results["summary"])
    (out / "results.json").write_text(json.dumps(results, indent=2))
    (out / "results.md").write_text(report.markdown(results))
    report.bar_chart(results, out / "results.png")
    if publish:
        dest = Path(publish)
        dest.mkdir(parents=True, exist_ok=True)
        for name in PUBLISHED:
            shutil.copy2(out / name, dest / name)
        log(f"copied {', '.join(PUBLISHED)} to {dest}")


def run(args: argparse.Namespace) -> int:
    if args.report_only:  # re-render the table and chart of an earlier run (e.g. after a change to report.py)
        out = Path(args.out)
        write_report(out, json.loads((out / "results.json").read_text()), args.publish)
        print(report.markdown(json.loads((out / "results.json").read_text())))
        return 0
    if args.holdout and args.publish:
        raise SystemExit("--holdout results are for choosing settings, not for publishing: drop --publish")
    t_start = time.perf_counter()
    budget = MODES[args.mode]
    if args.seeds:
        budget = dataclasses.replace(budget, seeds=tuple(args.seeds))
    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    root = data_dir(args.data)
    arms = [a for a in ARMS if not args.arms or a.name in args.arms]
    tasks = [(a.name, seed) for a in arms if a.name != "teacher" for seed in budget.seeds]  # longest first
    jobs, threads = parallelism(device, len(tasks), args.jobs, args.threads)
    main_threads = jobs * threads if threads else None  # the teacher runs alone, on every core the tasks share
    if main_threads:
        torch.set_num_threads(main_threads)
    git = git_state()
    started = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    hw = hardware(device, jobs, threads)
    load = hw.get("load_average_at_start")
    log(f"MILAN proxy, {budget.mode} mode, seeds {list(budget.seeds)}, device {device}, {jobs} parallel task(s) x "
        f"{threads or torch.get_num_threads()} thread(s), load average at start {load}, out {out}")  # fmt: skip
    timing: dict[str, float] = {}

    # Data: unpacked once into ~/.cache/milan/proxy, decoded once into tensors there; reused afterwards.
    t0 = time.perf_counter()
    train_root = cifar_root(root, "train", budget.student.train_per_class)
    data = eval_data(budget, root, args.holdout)
    num_pretrain = sum(1 for p in train_root.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    timing["data_s"] = time.perf_counter() - t0
    log(f"data ready in {timing['data_s']:.0f} s: {num_pretrain} pretraining images, "
        f"{len(data['train_y'])} labelled train (k-NN bank / probe), {len(data['test_y'])} test")  # fmt: skip

    # The stand-in teacher.
    t0 = time.perf_counter()
    if args.teacher:
        teacher_path = Path(args.teacher)
        load_teacher(teacher_path)  # fail early
        meta_file = teacher_path.with_suffix(".json")
        teacher_info = json.loads(meta_file.read_text()) if meta_file.is_file() else {"path": str(teacher_path)}
        teacher_info.setdefault("wall_time", 0.0)
        teacher_info.setdefault("val_top1", float("nan"))
        teacher_info.setdefault("num_classes", 202)
        teacher_info["reused"] = True
        log(f"reusing teacher {teacher_path}")
    else:
        log(f"training the teacher ({budget.teacher.epochs} epochs on the Tiny-ImageNet subset)")
        teacher_path = out / "teacher" / "teacher.pt"
        result: TeacherResult = train_teacher(budget.teacher, root, teacher_path, device, seed=0, log=log)
        teacher_info = result.to_dict()
        teacher_path.with_suffix(".json").write_text(json.dumps(teacher_info, indent=2))
        log(f"teacher: held-out Tiny-ImageNet top-1 {result.val_top1:.1f} % ({result.wall_time:.0f} s, "
            f"{result.images_per_second:.0f} img/s)")  # fmt: skip
    timing["teacher_s"] = time.perf_counter() - t0

    runs: list[dict[str, Any]] = []
    results: dict[str, Any] = {
        "benchmark": "milan-proxy",
        "mode": budget.mode,
        "statement": report.TEACHER_NOTE,
        "date": started,
        "git_commit": git["commit"][:7] + ("-dirty" if git["dirty"] else ""),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "hardware": hw,
        "versions": {"torch": torch.__version__, "python": platform.python_version()},
        "budget": budget.to_dict(),
        "models": {"student": dataclasses.asdict(model_config(ARMS[0], budget, None).encoder)},
        "data": {
            "evaluated_on": "held-out CIFAR-10 train images" if args.holdout else "CIFAR-10 test images",
            "pretrain_images": num_pretrain,
            "probe_train_images": len(data["train_y"]),
            "test_images": len(data["test_y"]),
        },
        "teacher": teacher_info,
        "timing": timing,
        "runs": runs,
    }

    def save_partial() -> None:
        order = {(a.name, seed): i for i, (seed, a) in enumerate((s, a) for s in budget.seeds for a in ARMS)}
        runs.sort(key=lambda r: order[(r["arm"], r["seed"])])
        results["summary"] = report.summarize(runs)
        results["ordering"] = report.ordering(results["summary"])
        results["total_wall_s"] = time.perf_counter() - t_start
        results["total_cpu_s"] = cpu_seconds()
        with contextlib.suppress(OSError):
            hw["load_average_at_end"] = list(os.getloadavg())
        (out / "results.json").write_text(json.dumps(results, indent=2))

    # The teacher's own CLS embedding (after ln_post and the projection): features are seed-free, only the probe
    # depends on the seed.
    t0 = time.perf_counter()
    if any(a.name == "teacher" for a in arms):
        teacher_model = load_teacher(teacher_path).to(device)
        feature_cache: dict[str, torch.Tensor] = {}
        for seed in budget.seeds:
            row: dict[str, Any] = {"arm": "teacher", "seed": seed}
            row.update(evaluate(lambda x: teacher_model(x).features[:, 0], data, device, budget, seed, feature_cache))
            runs.append(row)
            log(f"  teacher seed {seed}: k-NN {row['knn_top1']:.1f} %, linear probe {row['linprobe_top1']:.1f} %")
        save_partial()
    timing["teacher_eval_s"] = time.perf_counter() - t0

    # Every (arm, seed): pretraining (same budget everywhere) and evaluation, `jobs` at a time.
    t0 = time.perf_counter()
    job = Job(budget, str(root), str(teacher_path), str(train_root), str(out), device.type, threads, args.holdout)
    if jobs == 1:
        for arm_name, seed in tasks:
            runs.append(run_task(job, arm_name, seed))
            save_partial()
    else:
        if threads:
            torch.set_num_threads(threads)
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(jobs, mp_context=context, initializer=_init_worker, initargs=(threads,)) as pool:
            for future in as_completed([pool.submit(run_task, job, a, seed) for a, seed in tasks]):
                runs.append(future.result())
                save_partial()
    timing["tasks_s"] = time.perf_counter() - t0

    save_partial()
    write_report(out, results, args.publish)
    log(f"done in {results['total_wall_s'] / 60:.1f} min: {out / 'results.md'}, {out / 'results.png'}")
    print(report.markdown(results))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--out", required=True, help="output folder (results, teacher, pretraining runs)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", dest="mode", action="store_const", const="quick", help="~30 min on 2 CPU cores")
    mode.add_argument("--smoke", dest="mode", action="store_const", const="smoke", help="tiny budget: pipeline check")
    mode.add_argument("--full", dest="mode", action="store_const", const="full", help="~10 min on a GPU (default)")
    parser.set_defaults(mode="full")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--data", help="the shared data folder (default ../shared/data next to the repository)")
    parser.add_argument("--seeds", type=int, nargs="+", help="override the mode's seeds")
    parser.add_argument(
        "--jobs", type=int, help="(arm, seed) tasks run in parallel processes (default: one per CPU core; 1 on a GPU)"
    )
    parser.add_argument("--threads", type=int, help="torch CPU threads per task (default: cores / jobs)")
    parser.add_argument("--teacher", help="reuse a teacher saved by an earlier run (OUT/teacher/teacher.pt)")
    parser.add_argument("--arms", nargs="+", choices=[a.name for a in ARMS], help="only these arms")
    parser.add_argument(
        "--holdout",
        action="store_true",
        help="evaluate on held-out CIFAR-10 train images (the last N per class) instead of the test set, to choose "
        "settings without looking at the test set",
    )
    parser.add_argument("--publish", help="copy results.json/.md/.png to this folder (e.g. benchmarks/results/...)")
    parser.add_argument("--report-only", action="store_true", help="only re-render OUT/results.md/.png from its json")
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
