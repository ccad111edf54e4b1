"""What a run shows and records: a progress bar, ``metrics.jsonl``, TensorBoard and ``log.txt``.

Only the main process writes; on the others every method is a no-op. ``metrics.jsonl`` holds one JSON object per
line with an ``event`` field:

* ``"train"`` every ``log.every_steps`` optimizer steps: ``step``, ``epoch`` (fractional), ``loss`` (mean over
  the interval, all processes), ``lr``, ``img_per_s``, ``step_time`` and ``data_time`` (mean seconds per step),
  ``data_wait`` (fraction of the step spent waiting for data), ``images_seen``, ``skipped`` (images dropped so
  far), ``elapsed`` (seconds since this launch), and on CUDA ``max_mem_gb`` and ``mfu``;
* ``"epoch"`` at each epoch end (``epoch``, ``step``, ``loss``, the data pipeline's skip report), and
  ``"summary"`` once at the end; jobs may add their own events (e.g. ``"eval"``).
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from milan.checkpoint.io import atomic_path
from milan.flops import mfu
from milan.train.loop import TrainState


class RunLogger:
    """Progress bar + JSONL + TensorBoard + text log of one run (see the module docstring).

    Args:
        run_dir: Where ``metrics.jsonl``, ``tb/`` and ``log.txt`` go.
        enabled: Whether this process logs (the main process).
        total_steps: Optimizer steps this launch runs to (the progress bar's end).
        start_step: Step this launch starts from (a resume); later records in ``metrics.jsonl`` are dropped.
        progress: Show a progress bar (a tqdm bar on a terminal, else a line every 10 s).
        flops_per_image: For the MFU of CUDA runs, with ``peak_flops`` (per device) and ``world_size``.
        device: Where peak memory is read (CUDA only).
    """

    def __init__(
        self,
        run_dir: str | os.PathLike[str],
        *,
        enabled: bool = True,
        total_steps: int,
        start_step: int = 0,
        steps_per_epoch: int = 1,
        every_steps: int = 20,
        progress: bool = True,
        tensorboard: bool = True,
        flops_per_image: float | None = None,
        peak_flops: float | None = None,
        world_size: int = 1,
        device: torch.device | None = None,
    ) -> None:
        self.enabled = enabled
        self.run_dir = Path(run_dir)
        self.steps_per_epoch = max(1, steps_per_epoch)
        self.every_steps = max(1, every_steps)
        self.total_steps = total_steps
        self.flops_per_image, self.peak_flops, self.world_size = flops_per_image, peak_flops, world_size
        self.device = device
        self.t0 = time.perf_counter()
        self.skipped = 0
        self.last: dict[str, Any] = {}
        self._window: dict[str, float] = {}
        self._bar: tqdm[Any] | None = None
        self._tb: Any = None
        if not enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        _truncate_jsonl(self.run_dir / "metrics.jsonl", start_step)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(self.run_dir / "tb"), purge_step=start_step or None)
        # A live bar on a terminal (created at the first step, after the start-up messages); elsewhere (CI, files)
        # a plain progress line at every record instead.
        self._use_bar = progress and sys.stderr.isatty()
        self._print_lines = progress and not self._use_bar
        self._start_step = start_step
        self._printed_at = -1e9

    def step(self, state: TrainState, metrics: dict[str, float]) -> None:
        """Records one optimizer step (``loss``, ``lr``, ``images``, ``skipped``, ``step_time``, ``data_time``)."""
        if not self.enabled:
            return
        w = self._window
        for key in ("loss", "images", "step_time", "data_time"):
            w[key] = w.get(key, 0.0) + metrics[key]
        w["steps"] = w.get("steps", 0.0) + 1
        self.skipped += int(metrics.get("skipped", 0))
        img_s = metrics["images"] / max(metrics["step_time"], 1e-9)
        if self._use_bar and self._bar is None:
            self._bar = tqdm(total=self.total_steps, initial=self._start_step, unit="step", dynamic_ncols=True)
        if self._bar is not None:
            wait = metrics["data_time"] / max(metrics["step_time"], 1e-9)
            self._bar.set_postfix_str(
                f"ep {state.epoch} loss {metrics['loss']:.4f} lr {metrics['lr']:.2e} {img_s:.1f} img/s data {wait:.0%}",
                refresh=False,
            )
            self._bar.update(1)
        if state.step % self.every_steps == 0 or state.step >= self.total_steps:
            n = w["steps"]
            record: dict[str, Any] = {
                "event": "train",
                "step": state.step,
                "epoch": round(state.step / self.steps_per_epoch, 4),
                "loss": w["loss"] / n,
                "lr": metrics["lr"],
                "img_per_s": w["images"] / max(w["step_time"], 1e-9),
                "step_time": w["step_time"] / n,
                "data_time": w["data_time"] / n,
                "data_wait": w["data_time"] / max(w["step_time"], 1e-9),
                "images_seen": state.images_seen,
                "skipped": self.skipped,
                "elapsed": time.perf_counter() - self.t0,
            }
            if "grad_norm" in metrics:
                record["grad_norm"] = metrics["grad_norm"]
            if self.device is not None and self.device.type == "cuda":
                record["max_mem_gb"] = torch.cuda.max_memory_allocated(self.device) / 2**30
                if self.flops_per_image is not None:
                    util = mfu(record["img_per_s"], self.flops_per_image, self.peak_flops, self.world_size)
                    if util is not None:
                        record["mfu"] = util
            self.write(record)
            self._window = {}
            # Without a terminal, a progress line at most every 10 s (and at the end) keeps logs short.
            if self._print_lines and (record["elapsed"] - self._printed_at >= 10.0 or state.step >= self.total_steps):
                r, self._printed_at = record, record["elapsed"]
                eta = (self.total_steps - r["step"]) * r["elapsed"] / max(r["step"] - self._start_step, 1)
                self.info(
                    f"step {r['step']}/{self.total_steps} (epoch {r['epoch']:.2f}) loss {r['loss']:.4f} "
                    f"lr {r['lr']:.3e} {r['img_per_s']:.1f} img/s data {r['data_wait']:.0%} "
                    f"elapsed {tqdm.format_interval(round(r['elapsed']))} eta {tqdm.format_interval(round(eta))}"
                )

    def write(self, record: dict[str, Any]) -> None:
        """Appends a record to ``metrics.jsonl`` and its numbers to TensorBoard (under ``event/name``)."""
        if not self.enabled:
            return
        record = {k: _json_safe(v) for k, v in record.items()}
        self.last = record
        with (self.run_dir / "metrics.jsonl").open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self._tb is not None and "step" in record:
            event = record.get("event", "train")
            for key, value in record.items():
                if key not in ("event", "step") and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self._tb.add_scalar(f"{event}/{key}", value, record["step"])

    def info(self, message: str) -> None:
        """Prints a line (above the progress bar) and appends it to ``log.txt``."""
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(message, file=sys.stdout)
        else:
            print(message, flush=True)
        with (self.run_dir / "log.txt").open("a") as f:
            f.write(f"[{time.strftime('%Y-%m-%d %H:%M:%S')}] {message}\n")

    def warning(self, message: str) -> None:
        self.info(f"WARNING: {message}")

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return value.item()
    return value


def _truncate_jsonl(path: Path, start_step: int) -> None:
    """Drops records after ``start_step`` (written by a run that was interrupted after its last checkpoint)."""
    if not path.is_file():
        return
    if start_step == 0:
        path.unlink()
        return
    kept = [r for r in read_metrics(path, None) if isinstance(r.get("step", 0), int) and r.get("step", 0) <= start_step]
    with atomic_path(path) as tmp:
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))


def read_metrics(path: str | os.PathLike[str], event: str | None = "train") -> list[dict[str, Any]]:
    """Reads ``metrics.jsonl`` records (of one ``event`` kind, or all with ``None``); bad lines are skipped."""
    records = []
    for line in Path(path).read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and (event is None or record.get("event") == event):
            records.append(record)
    return records
