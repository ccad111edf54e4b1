"""results.json -> summary statistics, the markdown table, the ordering check and the bar chart."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.proxy.settings import ARMS

TEACHER_NOTE = (
    "The teacher is NOT CLIP: no CLIP weights can be had offline, so a small CLIP-shaped ViT trained with labels on "
    "the Tiny-ImageNet subset (other images: 202 classes, none of them CIFAR-10's, resized to 32 px) stands in as "
    "the semantic teacher."
)
SHORT = {
    "milan": "(a) MILAN",
    "random_mask": "(b) random mask",
    "mae_decoder": "(c) MAE decoder",
    "pixel_mae": "(d) pixel MAE",
    "random_init": "(e) random init",
    "teacher": "teacher",
}
METRICS = (("knn_top1", "k-NN top-1"), ("linprobe_top1", "linear probe top-1"))


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    if not values:
        return float("nan"), float("nan")
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarize(runs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per arm: mean and std of each metric over seeds, the seeds, and mean wall times."""
    out: dict[str, dict[str, Any]] = {}
    for arm in ARMS:
        rows = [r for r in runs if r["arm"] == arm.name]
        if not rows:
            continue
        entry: dict[str, Any] = {"label": arm.label, "seeds": [r["seed"] for r in rows], "n": len(rows)}
        for key, _ in METRICS:
            entry[f"{key}_mean"], entry[f"{key}_std"] = mean_std([float(r[key]) for r in rows])
        walls = [float(r["pretrain_wall_s"]) for r in rows if r.get("pretrain_wall_s") is not None]
        entry["pretrain_wall_s_mean"] = statistics.fmean(walls) if walls else None
        losses = [float(r["final_loss"]) for r in rows if r.get("final_loss") is not None]
        entry["final_loss_mean"] = statistics.fmean(losses) if losses else None
        out[arm.name] = entry
    return out


# The paper's ordering, as pairs (better, worse).
PAPER_ORDER = (
    ("milan", "random_mask"),
    ("milan", "mae_decoder"),
    ("random_mask", "pixel_mae"),
    ("mae_decoder", "pixel_mae"),
    ("pixel_mae", "random_init"),
    ("milan", "pixel_mae"),  # the headline claim
    ("milan", "random_init"),
)


def ordering(summary: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Checks each pair of the paper's ordering on each metric.

    A difference counts as *resolved* when it exceeds the sum of the two arms' standard deviations over seeds;
    otherwise the pair is reported as within the seed spread.
    """
    checks = []
    for key, name in METRICS:
        for better, worse in PAPER_ORDER:
            if better not in summary or worse not in summary:
                continue
            a, b = summary[better], summary[worse]
            diff = a[f"{key}_mean"] - b[f"{key}_mean"]
            spread = a[f"{key}_std"] + b[f"{key}_std"]
            several = a["n"] > 1 and b["n"] > 1
            checks.append(
                {
                    "metric": name,
                    "expected": f"{SHORT[better]} > {SHORT[worse]}",
                    "difference": diff,
                    "holds": diff > 0,
                    "resolved": several and abs(diff) > spread,
                    "single_seed": not several,
                }
            )
    return checks


def _pm(mean: float, std: float, n: int) -> str:
    if math.isnan(mean):
        return "n/a"
    return f"{mean:.1f} ± {std:.1f}" if n > 1 else f"{mean:.1f}"


def markdown(results: dict[str, Any]) -> str:
    """The results table with its context (mode, budget, hardware, wall time, the teacher caveat)."""
    summary = results["summary"]
    hw = results["hardware"]
    teacher = results["teacher"]
    seeds = results["budget"]["seeds"]
    lines = [
        f"**MILAN proxy comparison, `{results['mode']}` mode** ({results['date']}, commit `{results['git_commit']}`): "
        f"ViT student (dim {results['models']['student']['embed_dim']}, depth {results['models']['student']['depth']}, "
        f"32 px, 4 px patches) pretrained on {results['data']['pretrain_images']:,} CIFAR-10 train images "
        f"(labels unused) for {results['budget']['student']['epochs']} epoch(s), the same budget in every arm; "
        f"evaluated on frozen CLS features of {results['data']['test_images']:,} "
        f"{results['data'].get('evaluated_on', 'CIFAR-10 test images')} "
        f"(k-NN k={results['budget']['eval']['knn_k']} with {results['data']['probe_train_images']:,} labelled train "
        f"images as the bank; linear probe trained on the same images). Mean ± std over seeds {list(seeds)}.",
        "",
        f"> {TEACHER_NOTE} Teacher: width {results['budget']['teacher']['width']}, depth "
        f"{results['budget']['teacher']['depth']}, trained on {teacher.get('train_images', 0):,} image views; its own "
        f"held-out Tiny-ImageNet top-1 is {teacher['val_top1']:.1f} % ({teacher['num_classes']} classes, chance "
        f"{100 / teacher['num_classes']:.1f} %).",
        "",
        "| arm | k-NN top-1 (%) | linear probe top-1 (%) | pretraining wall time per seed | final loss |",
        "|---|---|---|---|---|",
    ]
    for entry in summary.values():
        wall = entry["pretrain_wall_s_mean"]
        loss = entry["final_loss_mean"]
        lines.append(
            f"| {entry['label']} | {_pm(entry['knn_top1_mean'], entry['knn_top1_std'], entry['n'])} "
            f"| {_pm(entry['linprobe_top1_mean'], entry['linprobe_top1_std'], entry['n'])} "
            f"| {f'{wall:.0f} s' if wall is not None else '-'} | {f'{loss:.4f}' if loss is not None else '-'} |"
        )
    tasks = hw.get("parallel_tasks", 1)
    timing = results.get("timing", {})
    phases = [
        f"{name} {timing[key] / 60:.1f} min"
        for key, name in (
            ("data_s", "data"),
            ("teacher_s", "teacher training"),
            ("teacher_eval_s", "teacher evaluation"),
            ("tasks_s", "pretraining and evaluation of the arms"),
        )
        if key in timing
    ] or [f"teacher training {teacher['wall_time'] / 60:.1f} min"]
    loads = [
        f"load average {when} {hw[key][0]:.2f}"
        for key, when in (("load_average_at_start", "at start"), ("load_average_at_end", "at the end"))
        if key in hw
    ]
    lines += [
        "",
        f"Hardware: {hw['device']} ({hw['cpu']}, {hw['cpu_count']} cores; {tasks} task(s) in parallel x "
        f"{hw['threads']} torch thread(s) each); torch {results['versions']['torch']}. Total wall time "
        f"{results['total_wall_s'] / 60:.1f} min ({', '.join(phases)}), CPU time {results['total_cpu_s'] / 60:.1f} min"
        + (f"; {', '.join(loads)}" if loads else "")
        + ". Losses are not comparable across target types (cosine for features, MSE for pixels).",
        "",
        "Paper's ordering (MILAN > its ablations > pixel MAE > no pretraining), checked pair by pair "
        "(resolved = the difference exceeds the sum of the two seed standard deviations):",
        "",
    ]
    for c in results["ordering"]:
        verdict = "holds" if c["holds"] else "does NOT hold"
        resolved = (
            "single seed" if c.get("single_seed") else ("resolved" if c["resolved"] else "within the seed spread")
        )
        lines.append(f"- {c['metric']}: {c['expected']}: {verdict} ({c['difference']:+.1f} points, {resolved})")
    return "\n".join(lines) + "\n"


def bar_chart(results: dict[str, Any], path: Path) -> Path:
    """Grouped bars (k-NN, linear probe) per arm with std error bars and the individual seeds as dots."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = results["summary"]
    names = list(summary)
    fig, ax = plt.subplots(figsize=(10, 4.6), layout="constrained")
    width = 0.38
    colours = ("tab:blue", "tab:orange")
    for j, (key, label) in enumerate(METRICS):
        xs = [i + (j - 0.5) * width for i in range(len(names))]
        means = [summary[n][f"{key}_mean"] for n in names]
        stds = [summary[n][f"{key}_std"] for n in names]
        bars = ax.bar(xs, means, width, yerr=stds, capsize=3, label=label, color=colours[j], alpha=0.85)
        for x, n in zip(xs, names, strict=True):
            seeds = [r[key] for r in results["runs"] if r["arm"] == n]
            ax.scatter([x] * len(seeds), seeds, s=9, color="black", zorder=3)
        ax.bar_label(bars, labels=[f"{m:.1f}" for m in means], label_type="center", fontsize=8, color="white")
    ax.set_xticks(range(len(names)), [SHORT[n] for n in names], fontsize=9)
    ax.set_ylabel("CIFAR-10 top-1 (%)")
    seeds = results["budget"]["seeds"]
    ax.set_title(
        f"MILAN proxy ({results['mode']}): frozen-feature CIFAR-10 accuracy, mean ± std over {len(seeds)} seed(s)\n"
        "teacher = Tiny-ImageNet-supervised ViT standing in for CLIP (not CLIP)",
        fontsize=10,
    )
    ax.legend(loc="upper left", fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    top = max(max(r[k] for r in results["runs"]) for k, _ in METRICS)
    ax.set_ylim(0, min(100.0, 10 * math.ceil(1.15 * top / 10)))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
