"""Segmentation transfer on real street scenes: ``python benchmarks/segment/run.py --quick --out DIR``.

UperNet (``milan segment``, the ADE20K recipe's model and pipeline, scaled down) is trained on CamVid's 367 train
images and evaluated on its 233 test images (11 classes, mIoU), from three encoders of the same small ViT (the proxy
benchmark's student: 128 wide, 4 blocks, 4 px patches at 32 px):

(a) MILAN-pretrained on the CamVid train frames (labels unused) with the proxy benchmark's stand-in teacher (a small
    CLIP-shaped ViT trained with labels on the Tiny-ImageNet subset: NOT CLIP; ``benchmarks/proxy/teacher.py``);
(b) pixel-MAE-pretrained on the same frames with the same budget (same images, optimizer, schedule, batch, steps);
(c) randomly initialised.

Every arm's pretraining runs through the library's own ``milan pretrain`` job and every fine-tuning through
``milan segment`` (:func:`milan.jobs.segment.segment`, from ``configs/segment/camvid_tiny_cpu.yaml`` plus the
overrides below), identical for every arm and seed. Writes ``OUT/results.json`` (every seed, per-class IoU, budgets,
hardware, wall and CPU times), ``OUT/results.md`` and ``OUT/results.png``.

Modes: ``--quick`` is sized for under 30 minutes on 2 idle CPU cores (2 seeds); ``--smoke`` checks the pipeline on a
handful of images; the default (``full``) is sized for a GPU (not yet run).
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
import shutil
import statistics
import sys
import tarfile
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: import `benchmarks.*` from the repository root instead
    _here = str(Path(__file__).resolve().parent)
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _here]
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch

from benchmarks.environment import git_state
from benchmarks.proxy.data import DEFAULT_DATA, cache_root, tiny_archive
from benchmarks.proxy.run import cpu_seconds, hardware, log, parallelism, pretrain_config
from benchmarks.proxy.settings import ARMS, Budget, StudentBudget, TeacherBudget, model_config
from benchmarks.proxy.teacher import train_teacher
from milan.jobs.pretrain import pretrain
from milan.jobs.segment import segment
from milan.models.factory import build_milan
from milan.train.config import SegmentConfig, load_config

REPO = Path(__file__).resolve().parents[2]
PRESET = REPO / "configs" / "segment" / "camvid_tiny_cpu.yaml"
CAMVID_CLASSES = 11
PUBLISHED = ("results.json", "results.md", "results.png")


@dataclass(frozen=True)
class SegBudget:
    """The fine-tuning shared by every arm (``milan segment`` overrides of the CamVid preset)."""

    iters: int = 600  # 250 at lr 1e-3 left every encoder at the same 19 mIoU (sky, building and road only)
    warmup_iters: int = 30
    batch_size: int = 8
    lr: float = 3e-3  # chosen on CamVid's val split (101 images), never on the test split
    layer_decay: float = 0.75
    crop: int = 64  # 16 x 16 patches of 4 px
    scale: tuple[int, int] = (120, 90)  # quarter resolution: RandomResize bound (x 0.5-2) and evaluation resize
    stride: int = 43  # sliding windows of `crop`, 2/3 overlap as in the recipe
    channels: int = 32  # UperNet width
    aux_channels: int = 32
    train_limit: int | None = None  # CamVid train images used (None: all 367)
    test_limit: int | None = None  # CamVid test images evaluated (None: all 233)


@dataclass(frozen=True)
class Mode:
    name: str
    seeds: tuple[int, ...]
    teacher: TeacherBudget
    student: StudentBudget  # the pretraining (model and schedule) of arms (a) and (b)
    seg: SegBudget = field(default_factory=SegBudget)
    pretrain_limit: int | None = None  # CamVid train frames used for pretraining (None: all 367)

    def proxy_budget(self) -> Budget:
        """The proxy's budget object, for its model and pretraining-config builders."""
        return Budget(mode=self.name, seeds=self.seeds, teacher=self.teacher, student=self.student)


# Pretraining on the 367 CamVid frames: 32 px crops of 5-25 % of a 480x360 frame (about the pixel scale of the
# quarter-resolution segmentation crops), batch 64 (5 steps per epoch).
_STUDENT = StudentBudget(epochs=50, batch_size=64, lr=1.5e-3, warmup_epochs=5.0, crop_scale=(0.05, 0.25))
MODES: dict[str, Mode] = {
    "smoke": Mode(
        "smoke",
        (0,),
        teacher=TeacherBudget(width=64, depth=1, num_heads=1, out_dim=32, epochs=1, per_class=3, val_per_class=1),
        student=dataclasses.replace(
            _STUDENT,
            embed_dim=32,
            depth=1,
            num_heads=2,
            decoder_dim=32,
            decoder_depth=1,
            decoder_heads=2,
            epochs=1,
            batch_size=8,
            warmup_epochs=0.0,
        ),
        seg=SegBudget(iters=2, warmup_iters=1, batch_size=4, channels=8, aux_channels=8, train_limit=8, test_limit=2),
        pretrain_limit=16,
    ),
    # Under 30 minutes on 2 CPU cores: the proxy's quick teacher with 8 epochs instead of 10, 450 fine-tuning
    # iterations (600 took 32-39 min in all on the shared 2-core machine; the lr was chosen on CamVid val at 600).
    "quick": Mode(
        "quick",
        (0, 1),
        teacher=TeacherBudget(epochs=8, patch_drop=0.5, full_token_epochs=2),
        student=_STUDENT,
        seg=SegBudget(iters=450),
    ),
    # A GPU: longer pretraining and fine-tuning, 3 seeds.
    "full": Mode(
        "full",
        (0, 1, 2),
        teacher=TeacherBudget(epochs=30, batch_size=256),
        student=dataclasses.replace(_STUDENT, epochs=300),
        seg=SegBudget(iters=4000, warmup_iters=200),
    ),
}

ARM_LABELS = {
    "milan": "(a) MILAN pretraining (stand-in teacher, attention masking, prompting decoder)",
    "pixel_mae": "(b) pixel-MAE pretraining (same images and budget)",
    "random_init": "(c) random initialisation",
}


def camvid_root(data: Path) -> Path:
    """CamVid's train and test splits unpacked once under the cache (``train/{images,labels}``, ``test/...``)."""
    root = cache_root() / "camvid"
    for split in ("train", "test"):
        if not (root / split / "labels").is_dir():
            archive = data / "camvid" / f"{split}.tar.gz"
            if not archive.is_file():
                raise FileNotFoundError(f"CamVid not found: {archive} (pass --data DIR)")
            tmp = root / f".{split}.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            with tarfile.open(archive) as tar:
                tar.extractall(tmp, filter="data")
            os.replace(tmp / split, root / split)
            shutil.rmtree(tmp, ignore_errors=True)
    return root


def pretrain_frames(camvid: Path, limit: int | None) -> Path:
    """The train frames the encoders are pretrained on: all, or the first ``limit`` (linked into a folder)."""
    if limit is None:
        return camvid / "train" / "images"
    subset = cache_root() / f"camvid-pretrain-{limit}"
    if not subset.is_dir():
        subset.mkdir(parents=True)
        for image in sorted((camvid / "train" / "images").iterdir())[:limit]:
            (subset / image.name).symlink_to(image)
    return subset


@dataclass(frozen=True)
class Job:
    mode: Mode
    camvid: str
    pretrain_images: str
    teacher: str
    out: str
    device: str
    threads: int | None


def segment_overrides(job: Job, arm: str, seed: int, encoder: Path) -> list[str]:
    s = job.mode.seg
    values: dict[str, object] = {
        "out_dir": Path(job.out) / "segment" / f"{arm}-seed{seed}", "seed": seed, "data.root": job.camvid,
        "encoder.pretrained": encoder, "encoder.model_name": None, "encoder.num_heads": job.mode.student.num_heads,
        "batch_size": s.batch_size, "optim.lr": s.lr, "layer_decay": s.layer_decay, "schedule.iters": s.iters,
        "schedule.warmup_iters": s.warmup_iters, "data.crop_size": s.crop, "data.scale": list(s.scale),
        "eval.scale": list(s.scale), "eval.crop": s.crop, "eval.stride": s.stride, "model.channels": s.channels,
        "model.aux_channels": s.aux_channels, "data.train_limit": s.train_limit, "data.val_limit": s.test_limit,
        "runtime.device": job.device, "runtime.cpu_threads": job.threads, "log.progress": False,
        "log.tensorboard": False, "checkpoint.every_steps": 0, "log.every_steps": max(1, s.iters // 10),
    }  # fmt: skip
    return [f"{k}={'null' if v is None else json.dumps(v) if isinstance(v, list) else v}" for k, v in values.items()]


def random_encoder(job: Job, seed: int) -> Path:
    """A randomly initialised student (seeded), saved as a pretraining checkpoint with no training."""
    torch.manual_seed(seed)
    cfg = model_config(ARMS[3], job.mode.proxy_budget(), None)  # the student of every arm; pixel targets: no teacher
    model = build_milan(cfg)
    path = Path(job.out) / "random_init" / f"seed{seed}.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": model.student.state_dict(), "config": {"model": dataclasses.asdict(cfg)}}, path)
    return path


def run_task(job: Job, arm_name: str, seed: int) -> dict[str, Any]:
    """Pretrains (arms a, b) and fine-tunes one encoder with one seed: one row of results."""
    if job.threads:
        torch.set_num_threads(job.threads)
    row: dict[str, Any] = {"arm": arm_name, "seed": seed}
    if arm_name == "random_init":
        encoder = random_encoder(job, seed)
    else:
        arm = next(a for a in ARMS if a.name == arm_name)
        cfg = pretrain_config(arm, job.mode.proxy_budget(), seed, Path(job.teacher), Path(job.pretrain_images),
                              Path(job.out), job.device, job.threads)  # fmt: skip
        log(f"pretraining {arm_name} seed {seed}")
        summary = pretrain(cfg)
        if summary.checkpoint is None:
            raise RuntimeError(f"{arm_name} seed {seed}: the pretraining run wrote no checkpoint")
        encoder = summary.checkpoint
        row.update(pretrain_wall_s=summary.wall_time, pretrain_final_loss=summary.final_loss,
                   pretrain_images=summary.state.images_seen, pretrain_steps=summary.state.step)  # fmt: skip
    log(f"fine-tuning {arm_name} seed {seed}")
    seg_cfg = load_config(SegmentConfig, PRESET, segment_overrides(job, arm_name, seed, encoder))
    result = segment(seg_cfg)
    s = result.summary
    row.update(mIoU=s["mIoU"], mAcc=s["mAcc"], aAcc=s["aAcc"], IoU=s["IoU"], segment_wall_s=s["wall_time"],
               segment_steps=s["step"], test_images=s["eval_images"], run_dir=str(result.run_dir))  # fmt: skip
    log(
        f"  {arm_name} seed {seed}: CamVid test mIoU {row['mIoU']:.2f} (mAcc {row['mAcc']:.2f}, aAcc {row['aAcc']:.2f})"
    )
    return row


# ----------------------------------------------------------------------------------------------------------------
# Report


def summarize(runs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for arm in ARM_LABELS:
        rows = [r for r in runs if r["arm"] == arm]
        if not rows:
            continue
        entry: dict[str, Any] = {"label": ARM_LABELS[arm], "seeds": [r["seed"] for r in rows], "n": len(rows)}
        for key in ("mIoU", "mAcc", "aAcc"):
            values = [float(r[key]) for r in rows]
            entry[f"{key}_mean"] = statistics.fmean(values)
            entry[f"{key}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
            entry[key] = values
        names = list(rows[0]["IoU"])
        entry["IoU_mean"] = {
            n: statistics.fmean(v) if (v := [r["IoU"][n] for r in rows if r["IoU"][n] is not None]) else None
            for n in names
        }
        for key in ("pretrain_wall_s", "segment_wall_s"):
            walls = [float(r[key]) for r in rows if r.get(key) is not None]
            entry[f"{key}_mean"] = statistics.fmean(walls) if walls else None
        out[arm] = entry
    return out


def markdown(results: dict[str, Any]) -> str:
    lines = [
        "| encoder | CamVid test mIoU (%) | mAcc (%) | aAcc (%) | mIoU per seed | pretraining / fine-tuning wall |",
        "|---|---|---|---|---|---|",
    ]
    for e in results["summary"].values():
        walls = " / ".join("-" if e[f"{k}_mean"] is None else f"{e[f'{k}_mean']:.0f} s"
                           for k in ("pretrain_wall_s", "segment_wall_s"))  # fmt: skip
        seeds = ", ".join(f"{v:.2f}" for v in e["mIoU"])
        lines.append(
            f"| {e['label']} | {e['mIoU_mean']:.2f} ± {e['mIoU_std']:.2f} | {e['mAcc_mean']:.2f} ± {e['mAcc_std']:.2f} "
            f"| {e['aAcc_mean']:.2f} ± {e['aAcc_std']:.2f} | {seeds} | {walls} |"
        )
    lines.append("")
    lines.append(f"Mean ± sample std over seeds {results['seeds']}; {results['note']}")
    return "\n".join(lines) + "\n"


def bar_chart(results: dict[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = results["summary"]
    fig, ax = plt.subplots(figsize=(6.4, 3.2), dpi=100, layout="constrained")
    for i, e in enumerate(summary.values()):
        ax.bar(i, e["mIoU_mean"], color=("tab:red", "tab:blue", "tab:gray")[i % 3], alpha=0.8)
        ax.scatter([i] * len(e["mIoU"]), e["mIoU"], color="black", s=12, zorder=3)
    short = {"milan": "(a) MILAN", "pixel_mae": "(b) pixel MAE", "random_init": "(c) random init"}
    ax.set_xticks(range(len(summary)), [short[arm] for arm in summary])
    ax.set_ylabel("CamVid test mIoU (%)")
    ax.set_title(f"UperNet on CamVid ({results['mode']}): bars = mean, dots = seeds", fontsize=9)
    fig.savefig(path)
    plt.close(fig)
    return path


def write_report(out: Path, results: dict[str, Any], publish: str | None) -> None:
    results["summary"] = summarize(results["runs"])
    (out / "results.json").write_text(json.dumps(results, indent=2))
    (out / "results.md").write_text(markdown(results))
    bar_chart(results, out / "results.png")
    if publish:
        dest = Path(publish)
        dest.mkdir(parents=True, exist_ok=True)
        for name in PUBLISHED:
            shutil.copy2(out / name, dest / name)
        log(f"copied {', '.join(PUBLISHED)} to {dest}")


NOTE = (
    "tiny encoders (128 wide, 4 blocks, 4 px patches), quarter resolution (120x90, 64 px crops), short schedules; "
    "the MILAN teacher is a small CLIP-shaped ViT trained with labels on a Tiny-ImageNet subset, NOT CLIP."
)


def run(args: argparse.Namespace) -> int:
    if args.report_only:
        out = Path(args.out)
        results = json.loads((out / "results.json").read_text())
        write_report(out, results, args.publish)
        print(markdown(results))
        return 0
    t_start = time.perf_counter()
    mode = MODES[args.mode]
    if args.seeds:
        mode = dataclasses.replace(mode, seeds=tuple(args.seeds))
    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = Path(args.data or DEFAULT_DATA).expanduser()
    if not tiny_archive(data).is_file():
        raise SystemExit(f"Tiny-ImageNet subset not found under {data} (pass --data DIR)")
    arms = [a for a in ARM_LABELS if not args.arms or a in args.arms]
    tasks = [(a, s) for a in arms for s in mode.seeds]  # pretraining arms first: the longest tasks start first
    jobs, threads = parallelism(device, len(tasks), args.jobs, args.threads)
    if threads:
        torch.set_num_threads(jobs * threads)  # the teacher trains alone, on every core the tasks share
    hw = hardware(device, jobs, threads)
    git = git_state()
    log(
        f"segmentation benchmark, {mode.name} mode, seeds {list(mode.seeds)}, device {device}, {jobs} parallel "
        f"task(s) x {threads or torch.get_num_threads()} thread(s), load average {hw.get('load_average_at_start')}"
    )
    timing: dict[str, float] = {}
    t0 = time.perf_counter()
    camvid = camvid_root(data)
    frames = pretrain_frames(camvid, mode.pretrain_limit)
    timing["data_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    teacher_info: dict[str, Any] = {}
    if "milan" in arms:
        if args.teacher:
            teacher_path = Path(args.teacher)
            meta = teacher_path.with_suffix(".json")  # written next to the teacher by the run that trained it
            teacher_info = {**(json.loads(meta.read_text()) if meta.is_file() else {}), "path": str(teacher_path)}
            teacher_info["reused"] = True
            log(f"reusing teacher {teacher_path}")
        else:
            log(f"training the stand-in teacher ({mode.teacher.epochs} epochs on the Tiny-ImageNet subset)")
            teacher_path = out / "teacher" / "teacher.pt"
            result = train_teacher(mode.teacher, data, teacher_path, device, seed=0, log=log)
            teacher_info = result.to_dict()
            teacher_path.with_suffix(".json").write_text(json.dumps(teacher_info, indent=2))
            log(f"teacher: held-out Tiny-ImageNet top-1 {result.val_top1:.1f} % ({result.wall_time:.0f} s)")
    else:
        teacher_path = out / "no-teacher"
    timing["teacher_s"] = time.perf_counter() - t0
    results: dict[str, Any] = {
        "benchmark": "milan-segment-camvid", "mode": mode.name, "seeds": list(mode.seeds), "note": NOTE,
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": git["commit"][:7] + ("-dirty" if git["dirty"] else ""),
        "command": " ".join([Path(sys.executable).name, *sys.argv]), "hardware": hw,
        "versions": {"torch": torch.__version__, "python": platform.python_version()},
        "budget": dataclasses.asdict(mode), "teacher": teacher_info, "timing": timing, "runs": [],
    }  # fmt: skip
    runs: list[dict[str, Any]] = results["runs"]

    def save_partial() -> None:
        order = {t: i for i, t in enumerate(tasks)}
        runs.sort(key=lambda r: order[(r["arm"], r["seed"])])
        results["total_wall_s"] = time.perf_counter() - t_start
        results["total_cpu_s"] = cpu_seconds()
        with contextlib.suppress(OSError):
            hw["load_average_at_end"] = list(os.getloadavg())
        (out / "results.json").write_text(json.dumps(results, indent=2))

    t0 = time.perf_counter()
    job = Job(mode, str(camvid), str(frames), str(teacher_path), str(out), device.type, threads)
    if jobs == 1:
        for arm, seed in tasks:
            runs.append(run_task(job, arm, seed))
            save_partial()
    else:
        if threads:
            torch.set_num_threads(threads)
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(jobs, mp_context=context) as pool:
            for future in as_completed([pool.submit(run_task, job, a, s) for a, s in tasks]):
                runs.append(future.result())
                save_partial()
    timing["tasks_s"] = time.perf_counter() - t0
    save_partial()
    write_report(out, results, args.publish)
    log(f"done in {results['total_wall_s'] / 60:.1f} min: {out / 'results.md'}")
    print(markdown(results))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="output folder (results, teacher, runs)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", dest="mode", action="store_const", const="quick", help="~30 min on 2 CPU cores")
    mode.add_argument("--smoke", dest="mode", action="store_const", const="smoke", help="pipeline check")
    mode.add_argument("--full", dest="mode", action="store_const", const="full", help="sized for a GPU (default)")
    parser.set_defaults(mode="full")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--data", help="the shared data folder (default ../shared/data next to the repository)")
    parser.add_argument("--seeds", type=int, nargs="+", help="override the mode's seeds")
    parser.add_argument("--jobs", type=int, help="tasks run in parallel processes (default: one per CPU core)")
    parser.add_argument("--threads", type=int, help="torch CPU threads per task (default: cores / jobs)")
    parser.add_argument("--teacher", help="reuse a stand-in teacher saved by this or the proxy benchmark")
    parser.add_argument("--arms", nargs="+", choices=list(ARM_LABELS), help="only these arms")
    parser.add_argument("--publish", help="copy results.json/.md/.png to this folder")
    parser.add_argument("--report-only", action="store_true", help="only re-render OUT/results.md/.png")
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
