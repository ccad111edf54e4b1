"""A small-scale replica of MILAN's comparison on real images: ``python benchmarks/proxy/run.py --out DIR``.

1. Trains the stand-in teacher (a CLIP-shaped ViT, supervised on the Tiny-ImageNet subset; NOT CLIP) and saves it
   in the library's teacher format.
2. Pretrains the same small ViT student on CIFAR-10 train images (labels unused) with the same budget in every arm,
   through the library's own pretraining job (:func:`milan.engine.pretrain.pretrain`):
   (a) MILAN; (b) random masking; (c) a standard MAE decoder; (d) MAE with pixel targets.
3. Evaluates (a)-(d), (e) the randomly initialised student and the teacher itself with weighted k-NN and a linear
   probe on frozen CLS features of CIFAR-10 test, for every seed.
4. Writes ``DIR/results.json``, ``DIR/results.md`` (the table) and ``DIR/results.png`` (the bar chart).

Modes: the default (``full``) is sized for about 10 minutes on one GPU; ``--quick`` for about 30 minutes on 2 CPU
cores; ``--smoke`` runs the whole pipeline on a handful of images in a minute or two (tests).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as dt
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: import `benchmarks.proxy` from the repository root instead
    _here = str(Path(__file__).resolve().parent)
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _here]
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch

from benchmarks.proxy import probe, report
from benchmarks.proxy.data import REPO, cifar_eval_tensors, cifar_root, data_dir
from benchmarks.proxy.settings import ARMS, IMG_SIZE, MODES, Arm, Budget, model_config
from benchmarks.proxy.teacher import TeacherResult, train_teacher
from milan.checkpoint import load_encoder, load_teacher
from milan.engine.config import (
    CheckpointConfig,
    LogConfig,
    OptimConfig,
    PretrainConfig,
    PretrainDataConfig,
    RuntimeConfig,
    ScheduleConfig,
)
from milan.engine.pretrain import pretrain, seed_everything
from milan.models.factory import build_encoder
from milan.models.vit import VisionTransformer

PUBLISHED = ("results.json", "results.md", "results.png")


def log(message: str) -> None:
    print(f"[{dt.datetime.now():%H:%M:%S}] {message}", flush=True)


def pretrain_config(
    arm: Arm, budget: Budget, seed: int, teacher: Path, train_root: Path, out: Path, device: str
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
        optim=OptimConfig(lr=s.lr, weight_decay=s.weight_decay),
        schedule=ScheduleConfig(epochs=s.epochs, warmup_epochs=s.warmup_epochs),
        runtime=RuntimeConfig(device=device, cpu_threads=budget.threads),  # type: ignore[arg-type]
        checkpoint=CheckpointConfig(every_epochs=0, keep=0),
        log=LogConfig(every_steps=10, progress=False, tensorboard=False, plot=False),
    )


def cpu_seconds() -> float:
    """User + system CPU time of this process and its finished children (e.g. data-loader workers)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def hardware(device: torch.device) -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info: dict[str, Any] = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU",
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "platform": platform.platform(),
    }
    with contextlib.suppress(OSError):
        info["load_average_at_start"] = list(os.getloadavg())
    return info


def git_commit() -> tuple[str, bool]:
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True
        )
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=REPO, capture_output=True, text=True, check=True)
        return sha.stdout.strip(), bool(dirty.stdout.strip())
    except (OSError, subprocess.CalledProcessError):
        return "unknown", False


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
    t_start = time.perf_counter()
    budget = MODES[args.mode]
    if args.seeds:
        budget = dataclasses.replace(budget, seeds=tuple(args.seeds))
    if args.threads:
        budget = dataclasses.replace(budget, threads=args.threads)
    if budget.threads:
        torch.set_num_threads(budget.threads)
    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    root = data_dir(args.data)
    arms = [a for a in ARMS if not args.arms or a.name in args.arms]
    commit, dirty = git_commit()
    started = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    log(f"MILAN proxy, {budget.mode} mode, seeds {list(budget.seeds)}, device {device}, out {out}")

    # Data (unpacked once into ~/.cache/milan/proxy, reused afterwards).
    t0 = time.perf_counter()
    train_root = cifar_root(root, "train", budget.student.train_per_class)
    ev = budget.eval
    train_x, train_y = cifar_eval_tensors(root, "train", ev.train_per_class, IMG_SIZE)
    test_x, test_y = cifar_eval_tensors(root, "test", ev.test_per_class, IMG_SIZE)
    data = {"train_x": train_x, "train_y": train_y, "test_x": test_x, "test_y": test_y}
    num_pretrain = sum(1 for p in train_root.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    log(f"data ready in {time.perf_counter() - t0:.0f} s: {num_pretrain} pretraining images, "
        f"{len(train_y)} labelled train (k-NN bank / probe), {len(test_y)} test")  # fmt: skip

    # The stand-in teacher.
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
        result: TeacherResult = train_teacher(
            budget.teacher, root, teacher_path, device, seed=0, num_workers=budget.num_workers, log=log
        )
        teacher_info = result.to_dict()
        teacher_path.with_suffix(".json").write_text(json.dumps(teacher_info, indent=2))
        log(f"teacher: held-out Tiny-ImageNet top-1 {result.val_top1:.1f} % ({result.wall_time:.0f} s, "
            f"{result.images_per_second:.0f} img/s)")  # fmt: skip

    runs: list[dict[str, Any]] = []
    results: dict[str, Any] = {
        "benchmark": "milan-proxy",
        "mode": budget.mode,
        "statement": report.TEACHER_NOTE,
        "date": started,
        "git_commit": commit + ("-dirty" if dirty else ""),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "hardware": hardware(device),
        "versions": {"torch": torch.__version__, "python": platform.python_version()},
        "budget": budget.to_dict(),
        "models": {"student": dataclasses.asdict(model_config(ARMS[0], budget, None).encoder)},
        "data": {"pretrain_images": num_pretrain, "probe_train_images": len(train_y), "test_images": len(test_y)},
        "teacher": teacher_info,
        "runs": runs,
    }

    def save_partial() -> None:
        results["summary"] = report.summarize(runs)
        results["ordering"] = report.ordering(results["summary"])
        results["total_wall_s"] = time.perf_counter() - t_start
        results["total_cpu_s"] = cpu_seconds()
        (out / "results.json").write_text(json.dumps(results, indent=2))

    teacher_model = load_teacher(teacher_path).to(device)
    feature_cache: dict[str, torch.Tensor] = {}
    for seed in budget.seeds:
        for arm in arms:
            row: dict[str, Any] = {"arm": arm.name, "seed": seed}
            if arm.pretrain:
                cfg = pretrain_config(arm, budget, seed, teacher_path, train_root, out, device.type)
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
            else:  # the teacher's own CLS embedding (after ln_post and the projection); features are seed-free
                fn = lambda x: teacher_model(x).features[:, 0]  # noqa: E731
            row.update(evaluate(fn, data, device, budget, seed, cache=feature_cache if arm.name == "teacher" else None))
            runs.append(row)
            log(f"  {arm.name} seed {seed}: k-NN {row['knn_top1']:.1f} %, linear probe {row['linprobe_top1']:.1f} %")
            save_partial()

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
    parser.add_argument("--threads", type=int, help="torch CPU threads")
    parser.add_argument("--teacher", help="reuse a teacher saved by an earlier run (OUT/teacher/teacher.pt)")
    parser.add_argument("--arms", nargs="+", choices=[a.name for a in ARMS], help="only these arms")
    parser.add_argument("--publish", help="copy results.json/.md/.png to this folder (e.g. benchmarks/results/...)")
    parser.add_argument("--report-only", action="store_true", help="only re-render OUT/results.md/.png from its json")
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
