"""Data-pipeline throughput: decoded + augmented images per second, per worker and in total.

Measures the MILAN pretraining view (RandomResizedCrop(0.2-1, bicubic) + flip + ToTensor + Normalize, i.e.
``milan.data.pretrain_transform`` of ``milan.data.build_dataset``) through ``milan.data.build_loader`` on three
kinds of JPEG folders:

* ``cifar10``: real CIFAR-10 train JPEGs (32x32), a class-balanced subset of the shared archive, view 32 px;
* ``tiny``: real Tiny-ImageNet JPEGs (64x64), a subset of the shared archive, view 64 px;
* ``imagenet_like``: generated photo-like JPEGs of ImageNet's typical size (500x375, quality 90), view 224 px;
* ``photo_2mp``: generated 1600x1200 JPEGs (quality 90; web/camera-sized originals), view 224 px;
* ``camvid``: real photos, the shared CamVid train frames (480x360 JPEGs, quality 95; ImageNet-sized), view 224 px;
* ``camvid_2x``: the same frames upscaled 2x (bicubic) to 960x720 and saved at quality 90 (larger originals);

each with JPEG draft decoding on and off, for every ``--workers`` count (0 = in the main process). The
worker start-up and the first batch are excluded from the timing; files are read once beforehand so that the
page cache is warm; ``--repeats`` runs of each configuration are reduced to their median.

Draft mode can only help when a crop is at least twice the view size on both sides: with scale (0.2, 1) that
never happens for 500x375 images at 224 px (so draft on/off should measure the same there), but often for
larger originals or smaller views. ``img/s/worker`` is the total divided by
``max(1, workers)``; on a machine with fewer free cores than workers it understates the per-core speed.

``--draft-effect`` measures what JPEG draft mode (``data.draft``) does to the views, on the chosen datasets: for
each image and ``--draws`` random crops (the same seed with draft on and off) of the pretraining view (scale
0.2-1, torchvision crop) and of the linear-probe training view (scale 0.08-1, the original's ``byol`` crop), the
share of crops that draft decodes at a reduced scale, their mean and maximum absolute pixel difference (in 0-255
units, on the 224 px crop before normalisation), and the decode stage's speed (open + crop + resize, one process)
with and without draft in alternating rounds, per wall second and per CPU second of the process (the steadier
measure on a shared machine), with the load average around the timing.

``--end-to-end MODEL`` additionally times training from a JPEG folder: the loader feeds
``milan.models.create_model(MODEL)`` forward + backward + AdamW steps; it reports img/s and the fraction of the
time spent waiting for data.

    python benchmarks/data.py --workers 0 2 --num-images 256 --json benchmarks/results/data_cpu.json
    python benchmarks/data.py --datasets imagenet_like --workers 0 4 8 16 --num-images 4000
    python benchmarks/data.py --datasets --end-to-end milan_test_tiny --workers 2   # end-to-end only
    python benchmarks/data.py --datasets camvid camvid_2x --workers 0 --draft-effect --num-images 200
"""

from __future__ import annotations

import argparse
import datetime as dt
import io
import json
import math
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

if __package__ in (None, ""):  # run as a script: import `benchmarks.*` from the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from PIL import Image, ImageFilter, features

from benchmarks.environment import cpu_name, git_state, package_version
from milan.data import (
    SkipReport,
    build_dataset,
    build_loader,
    extract_archive_subset,
    open_image,
    pretrain_transform,
)
from milan.data.sources import scan_images
from milan.data.transforms import RandomResizedCropDecode
from milan.models import create_model, model_config

SHARED = Path("/work/shared/data")
CIFAR_TRAIN = SHARED / "cifar10_jpg" / "train.tar.gz"
TINY_TRAIN = SHARED / "tiny_imagenet_subset" / "train100.tar.gz"
CAMVID_TRAIN = SHARED / "camvid" / "train.tar.gz"


# ---------------------------------------------------------------------------------------------------------------
# Environment record
# ---------------------------------------------------------------------------------------------------------------


def environment() -> dict[str, Any]:
    """Hardware, versions, date and commit."""
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    versions = {"python": platform.python_version()}
    for dist in ("torch", "torchvision", "pillow", "pillow-simd", "numpy", "webdataset"):
        version = package_version(dist)
        if version is not None:
            versions[dist] = version
    return {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "git": git_state(),
        "hardware": {
            "cpu": cpu_name(),
            "cpu_cores": os.cpu_count(),
            "usable_cores": usable,
            "load_average_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
            "platform": platform.platform(),
        },
        "versions": versions,
        "pillow_features": {"libjpeg_turbo": features.check_feature("libjpeg_turbo"), "webp": features.check("webp")},
    }


# ---------------------------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------------------------


def photo_like(width: int, height: int, seed: int) -> Image.Image:
    """Smooth shapes plus blurred texture: compresses and decodes like a photo, unlike white noise."""
    rng = np.random.default_rng(seed)
    texture = Image.fromarray(rng.integers(0, 256, (height // 4, width // 4, 3), dtype=np.uint8))
    texture = texture.resize((width, height), Image.Resampling.BICUBIC).filter(ImageFilter.GaussianBlur(2))
    x, y = np.meshgrid(np.linspace(0, 1, width), np.linspace(0, 1, height))
    fx, fy, phase = rng.uniform(2, 9, 3)
    waves = 127 + 90 * np.sin(fx * x * 6.28 + phase)[..., None] * np.cos(fy * y * 6.28)[..., None]  # (H, W, 1)
    colour = rng.uniform(0.5, 1.0, 3)
    pixels = 0.5 * np.asarray(texture, dtype=np.float64) + 0.5 * waves * colour
    return Image.fromarray(pixels.clip(0, 255).astype(np.uint8))


def generate_jpegs(folder: Path, n: int, width: int, height: int, quality: int) -> Path:
    """Writes ``n`` photo-like JPEGs (reused if already there)."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        path = folder / f"img_{i:06d}.jpg"
        if not path.exists():
            buf = io.BytesIO()
            photo_like(width, height, seed=i).save(buf, "JPEG", quality=quality)
            path.write_bytes(buf.getvalue())
    return folder


def prepare(name: str, n: int, work: Path, img_size: int) -> tuple[Path, int, str]:
    """A JPEG folder with at least ``n`` images, the view size to use, and a description of the images."""
    if name == "cifar10":
        per_class = math.ceil(n / 10)
        return extract_archive_subset(CIFAR_TRAIN, None, per_class=per_class, split="train"), 32, "32x32 q75"
    if name == "tiny":
        per_class = math.ceil(n / 202)
        return extract_archive_subset(TINY_TRAIN, None, per_class=per_class, split="train"), 64, "64x64"
    if name == "imagenet_like":
        return generate_jpegs(work / "imagenet_like", n, 500, 375, 90), img_size, "500x375 q90 (generated)"
    if name == "photo_2mp":
        return generate_jpegs(work / "photo_2mp", n, 1600, 1200, 90), img_size, "1600x1200 q90 (generated)"
    if name == "camvid":
        root = extract_archive_subset(CAMVID_TRAIN, None, per_class=n, split="train", classes=["images"])
        return root / "images", img_size, "480x360 q95 (CamVid, real)"
    if name == "camvid_2x":
        return (
            upscaled(prepare("camvid", n, work, img_size)[0], work / "camvid_2x", 2, 90),
            img_size,
            ("960x720 q90 (CamVid upscaled 2x)"),
        )
    raise ValueError(f"unknown dataset {name!r}")


def upscaled(source: Path, folder: Path, factor: int, quality: int) -> Path:
    """The JPEGs of ``source`` resized ``factor`` times (bicubic) and saved at ``quality`` (reused if there)."""
    folder.mkdir(parents=True, exist_ok=True)
    for path in scan_images(source).paths:
        out = folder / path.name
        if not out.exists():
            with Image.open(path) as img:
                big = img.convert("RGB").resize((img.width * factor, img.height * factor), Image.Resampling.BICUBIC)
            big.save(out, "JPEG", quality=quality)
    return folder


# ---------------------------------------------------------------------------------------------------------------
# Draft mode: pixels and decode speed
# ---------------------------------------------------------------------------------------------------------------

VIEWS = {  # name -> (scale, crop geometry)
    "pretrain (scale 0.2-1, torchvision crop)": ((0.2, 1.0), "torchvision"),
    "linprobe train (scale 0.08-1, byol crop)": ((0.08, 1.0), "byol"),
}


def draft_effect(folder: Path, view: int, *, n: int, draws: int, repeats: int) -> list[dict[str, Any]]:
    """Per training view: how often draft changes the crop, by how much, and the decode stage's img/s on/off."""
    files = [path.read_bytes() for path in scan_images(folder).paths[:n]]
    rows = []
    for name, (scale, crop) in VIEWS.items():
        on = RandomResizedCropDecode(view, scale=scale, draft=True, crop=crop)  # type: ignore[arg-type]
        off = RandomResizedCropDecode(view, scale=scale, draft=False, crop=crop)  # type: ignore[arg-type]
        drafted = changed = 0
        diffs: list[float] = []
        max_diff = 0
        for i, data in enumerate(files):
            for k in range(draws):
                torch.manual_seed(i * 1000 + k)
                img = open_image(data)
                size = img.size
                a = np.asarray(on(img), dtype=np.int16)  # (view, view, 3)
                drafted += img.size != size  # Pillow's draft() shrinks the opened image's size
                torch.manual_seed(i * 1000 + k)
                b = np.asarray(off(open_image(data)), dtype=np.int16)
                diff = np.abs(a - b)
                if diff.any():
                    changed += 1
                    diffs.append(float(diff.mean()))
                    max_diff = max(max_diff, int(diff.max()))
        speed = decode_speed(files, {"draft_on": on, "draft_off": off}, repeats)
        total = len(files) * draws
        rows.append({
            "view": name,
            "crops": total,
            "drafted_share": round(drafted / total, 4),
            "changed_share": round(changed / total, 4),
            "mean_abs_diff_of_changed_crops_255": round(float(np.mean(diffs)), 3) if diffs else 0.0,
            "p90_mean_abs_diff_of_changed_crops_255": round(float(np.percentile(diffs, 90)), 3) if diffs else 0.0,
            "max_abs_diff_255": max_diff,
            "mean_abs_diff_all_crops_255": round(float(np.sum(diffs)) / total, 4),
            "decode_speed": speed,
            "speedup": speed["speedup_cpu_time"],
        })  # fmt: skip
    return rows


def decode_speed(files: list[bytes], stages: dict[str, Any], repeats: int) -> dict[str, Any]:
    """img/s of each decode stage over ``files``, in alternating rounds (the order flips every round).

    Both the wall clock and this process's CPU time are recorded: on a shared machine the CPU-time rate is the
    steadier measure of the work per image; the speed-up is the median over rounds of the per-round ratio.
    """
    names = list(stages)
    wall: dict[str, list[float]] = {name: [] for name in names}
    cpu: dict[str, list[float]] = {name: [] for name in names}
    loads = [os.getloadavg()[0]]
    for r in range(repeats):
        for name in names if r % 2 == 0 else names[::-1]:
            torch.manual_seed(r)
            t0, c0 = time.perf_counter(), time.process_time()
            for data in files:
                stages[name](open_image(data))
            wall[name].append(len(files) / (time.perf_counter() - t0))
            cpu[name].append(len(files) / (time.process_time() - c0))
        loads.append(os.getloadavg()[0])
    first, second = names
    out: dict[str, Any] = {
        name: {
            "img_per_s_wall": round(float(np.median(wall[name])), 1),
            "img_per_s_cpu_time": round(float(np.median(cpu[name])), 1),
            "img_per_s_wall_runs": [round(x, 1) for x in wall[name]],
        }
        for name in names
    }
    out["speedup_wall"] = round(float(np.median(np.array(wall[first]) / np.array(wall[second]))), 3)
    out["speedup_cpu_time"] = round(float(np.median(np.array(cpu[first]) / np.array(cpu[second]))), 3)
    out["load_average_1m_min_max"] = [round(min(loads), 2), round(max(loads), 2)]
    return out


# ---------------------------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------------------------


def time_loader(folder: Path, img_size: int, *, draft: bool, workers: int, n: int, batch_size: int) -> dict[str, Any]:
    """Decoded + augmented img/s for one configuration (start-up and first batch excluded)."""
    dataset = build_dataset(scan_images(folder).paths[:n], pretrain_transform(img_size, draft=draft))
    loader = build_loader(dataset, batch_size, num_workers=workers, persistent_workers=False, seed=0)
    report = SkipReport()
    timed = 0
    start = time.perf_counter()
    t0 = start
    for i, batch in enumerate(loader):
        report.update(batch)
        if i == 0:  # the first batch pays for worker start-up
            t0 = time.perf_counter()
            continue
        timed += len(batch)
    seconds = time.perf_counter() - t0
    rate = timed / seconds if seconds > 0 and timed else float("nan")
    return {
        "workers": workers,
        "draft": draft,
        "images": len(dataset),
        "timed_images": timed,
        "seconds": round(seconds, 3),
        "startup_s": round(t0 - start, 3),
        "img_per_s": round(rate, 1),
        "img_per_s_per_worker": round(rate / max(1, workers), 1),
        "skipped": report.skipped,
    }


def median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The run with the median img/s, plus every run's img/s."""
    ordered = sorted(runs, key=lambda r: r["img_per_s"])
    return {**ordered[len(ordered) // 2], "img_per_s_runs": [r["img_per_s"] for r in runs]}


def end_to_end(
    folder: Path, model_name: str, *, workers: int, batch_size: int, steps: int, device: torch.device
) -> dict[str, Any]:
    """Training img/s from a JPEG folder: loader -> model forward + backward + AdamW, with the data-wait share."""
    model = create_model(model_name).to(device)
    img_size = model_config(model_name).encoder.img_size
    student = model.student
    optimizer = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=1e-4, betas=(0.9, 0.95))
    dataset = build_dataset(folder, pretrain_transform(img_size))
    loader = build_loader(dataset, batch_size, num_workers=workers, drop_last=True, seed=0)
    warmup = 2  # steps before the clock starts (worker start-up, allocator warm-up)

    def batches() -> Any:
        while True:  # as many epochs as needed
            yield from loader

    stream = batches()
    done = images = 0
    wait = 0.0
    t_start = time.perf_counter()
    while done < warmup + steps:
        if done == warmup:
            t_start, wait, images = time.perf_counter(), 0.0, 0
        t_wait = time.perf_counter()
        batch = next(stream)
        wait += time.perf_counter() - t_wait
        if batch.empty:
            continue
        out = model(batch.images.to(device, non_blocking=True))
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        images += len(batch)
        done += 1
    seconds = time.perf_counter() - t_start
    return {
        "model": model_name,
        "img_size": img_size,
        "workers": workers,
        "batch_size": batch_size,
        "steps": steps,
        "device": str(device),
        "img_per_s": round(images / seconds, 1),
        "data_wait_fraction": round(wait / seconds, 3),
        "final_loss": round(float(out.loss.detach()), 4),
    }


# ---------------------------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--datasets", nargs="*", default=["cifar10", "tiny", "imagenet_like", "photo_2mp", "camvid", "camvid_2x"]
    )
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--num-images", type=int, default=256, help="images per dataset and configuration")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--img-size", type=int, default=224, help="view size for imagenet_like")
    parser.add_argument("--draft", choices=["both", "on", "off"], default="both")
    parser.add_argument("--repeats", type=int, default=1, help="runs per configuration (median reported)")
    parser.add_argument("--work-dir", type=Path, default=None, help="where generated JPEGs go (default: a temp dir)")
    parser.add_argument("--draft-effect", action="store_true", help="measure draft mode's pixel effect and speed")
    parser.add_argument("--draws", type=int, default=10, help="--draft-effect: random crops per image")
    parser.add_argument("--end-to-end", metavar="MODEL", default=None, help="also time training, e.g. milan_test_tiny")
    parser.add_argument("--e2e-data", type=Path, default=None, help="JPEG folder for --end-to-end (default: tiny)")
    parser.add_argument("--e2e-steps", type=int, default=10)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch threads in the main process")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    drafts = {"both": [True, False], "on": [True], "off": [False]}[args.draft]
    config = {k: v if isinstance(v, int | str | list | None) else str(v) for k, v in vars(args).items()}
    record: dict[str, Any] = {"benchmark": "data", **environment(), "config": config}
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="milan-bench-data-") as tmp:
        work = args.work_dir or Path(tmp)
        header = f"{'dataset':<14} {'images':<26} {'view':>4} {'draft':>5} {'workers':>7} {'img/s':>9} {'/worker':>9}"
        print(header)
        print("-" * len(header))
        for name in args.datasets:
            folder, view, what = prepare(name, args.num_images, work, args.img_size)
            for path in scan_images(folder).paths[: args.num_images]:
                path.read_bytes()  # warm the page cache: measure decoding, not the disk
            for workers in args.workers:
                for draft in drafts:
                    runs = [
                        time_loader(
                            folder, view, draft=draft, workers=workers, n=args.num_images, batch_size=args.batch_size
                        )
                        for _ in range(args.repeats)
                    ]
                    row = {"dataset": name, "source": what, "view": view, **median_run(runs)}
                    rows.append(row)
                    print(
                        f"{name:<14} {what:<26} {view:>4} {'on' if draft else 'off':>5} {workers:>7} "
                        f"{row['img_per_s']:>9.1f} {row['img_per_s_per_worker']:>9.1f}"
                    )
            if args.draft_effect:
                effect = draft_effect(folder, view, n=args.num_images, draws=args.draws, repeats=args.repeats)
                record.setdefault("draft_effect", []).extend({"dataset": name, "source": what, **e} for e in effect)
                for e in effect:
                    print(
                        f"draft effect {name} {e['view']}: {100 * e['changed_share']:.1f}% of crops changed, mean "
                        f"|diff| {e['mean_abs_diff_of_changed_crops_255']:.2f}/255 (max {e['max_abs_diff_255']}); "
                        f"decode {e['decode_speed']['draft_on']['img_per_s_cpu_time']:.0f} img/s on vs "
                        f"{e['decode_speed']['draft_off']['img_per_s_cpu_time']:.0f} off per CPU second "
                        f"({e['speedup']:.2f}x; wall {e['decode_speed']['speedup_wall']:.2f}x, load "
                        f"{e['decode_speed']['load_average_1m_min_max']})"
                    )
        record["results"] = rows
        if args.end_to_end:
            folder = args.e2e_data or prepare("tiny", 4 * args.batch_size, work, args.img_size)[0]
            e2e = []
            for workers in args.workers:
                result = end_to_end(
                    folder,
                    args.end_to_end,
                    workers=workers,
                    batch_size=args.batch_size,
                    steps=args.e2e_steps,
                    device=torch.device(args.device),
                )
                e2e.append({"data": str(folder), **result})
                print(
                    f"end-to-end {args.end_to_end} workers={workers}: {result['img_per_s']:.1f} img/s, "
                    f"data wait {100 * result['data_wait_fraction']:.0f}%"
                )
            record["end_to_end"] = e2e
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(record, indent=2) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
