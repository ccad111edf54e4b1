"""The run skeleton's hooks: periodic evaluation, its history across a resume, extra state, the summary."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from milan.data import BadSample, Batch, SkipReport
from milan.train.checkpointing import load_training_checkpoint
from milan.train.config import AdamWConfig, RunConfig, derive, load_config
from milan.train.logging import read_metrics
from milan.train.loop import data_step
from milan.train.optim import build_adamw, param_groups
from milan.train.trainer import Evaluation, Trainer, describe_metrics

CPU = torch.device("cpu")


def batches(n: int = 4, size: int = 8) -> list[Batch]:
    """``n`` fixed batches of a linearly separable 2-class problem (the loader re-iterates them every epoch)."""
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        x = torch.randn(size, 4, generator=g)
        out.append(Batch(x, (x[:, 0] > 0).long()))
    return out


class Job:
    """A tiny classifier job on the engine's Trainer; counts what the trainer calls."""

    def __init__(
        self, run_dir: Path, overrides: list[str], resume_from: Path | None = None, evaluate: bool = True
    ) -> None:
        base = ["log.progress=false", "log.tensorboard=false", "batch_size=8", "optim.lr=0.1", "checkpoint.keep=0"]
        self.cfg = load_config(
            RunConfig, overrides=[*base, "schedule.epochs=4", "schedule.warmup_epochs=0", *overrides]
        )
        torch.manual_seed(0)
        self.model = nn.Linear(4, 2)
        self.data = batches()
        self.calls: dict[str, Any] = {"eval": 0, "loaded": None, "train_modes": []}
        self.extra = torch.zeros(1)  # stands for a job's extra state (e.g. EMA weights)

        def forward(data: Batch, noise: torch.Tensor | None) -> tuple[torch.Tensor, int]:
            self.calls["train_modes"].append(self.model.training)
            return F.cross_entropy(self.model(data.images), data.labels), len(data)

        def extra_state() -> dict[str, Any]:
            return {"extra": self.extra.clone()}

        def load_extra(ckpt: dict[str, Any]) -> None:
            self.calls["loaded"] = ckpt["extra"].clone()
            self.extra.copy_(ckpt["extra"])

        d = derive(self.cfg, 1, len(self.data))
        report = SkipReport()
        self.trainer = Trainer(
            self.cfg, d, run_dir, model=self.model, train_module=self.model,
            optimizer=build_adamw(param_groups(self.model, 0.0), AdamWConfig(), d.lr, CPU),
            step_fn=data_step(forward, self.model, CPU, report), loader=self.data, sampler=None, report=report,
            device=CPU, dtype=torch.float32, resume_from=resume_from, extra_state=extra_state,
            load_extra_state=load_extra,
            evaluation=Evaluation(self.evaluate, every_epochs=2) if evaluate else None,
        )  # fmt: skip

    @torch.no_grad()
    def evaluate(self) -> dict[str, Any]:
        self.calls["eval"] += 1
        self.model.eval()  # the trainer puts it back in training mode for the next epoch
        x = torch.cat([b.images for b in self.data])
        y = torch.cat([b.labels for b in self.data])
        acc = float((self.model(x).argmax(1) == y).float().mean()) * 100
        return {"acc": acc, "weight": self.model.weight.sum().item()}

    def fit(self) -> None:
        with self.trainer:
            self.trainer.fit(after_step=lambda s: self.extra.add_(1))


def test_evaluates_every_n_epochs_and_at_the_end_and_keeps_the_history(tmp_path: Path) -> None:
    job = Job(tmp_path / "run", [])
    job.fit()
    history = job.trainer.eval_history
    assert [(h["epoch"], h["step"]) for h in history] == [(2, 8), (4, 16)]  # every 2 epochs; the last one included
    assert job.calls["eval"] == 2 and job.trainer.final_eval is history[-1]
    assert all(job.calls["train_modes"])  # every step ran in training mode, although evaluation switched it off
    assert min(h["acc"] for h in history) >= 75.0  # it learned (chance: 50 %)
    records = read_metrics(tmp_path / "run" / "metrics.jsonl", "eval")
    assert [r["step"] for r in records] == [8, 16] and all(r["eval_time"] >= 0 for r in records)
    log = (tmp_path / "run" / "log.txt").read_text()
    assert f"eval epoch 4 (step 16): {describe_metrics(history[-1])}" in log
    ckpt = load_training_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    assert ckpt["eval_history"] == history and torch.equal(ckpt["extra"], torch.tensor([16.0]))


def test_a_mid_epoch_stop_is_evaluated_and_a_resume_reports_the_same_history(tmp_path: Path) -> None:
    full = Job(tmp_path / "full", [])
    full.fit()
    first = Job(tmp_path / "split", ["schedule.max_steps=10"])  # stops 2 steps into epoch 2
    first.fit()
    assert [h["step"] for h in first.trainer.eval_history] == [8, 10]  # epoch 2, then the stop
    ckpt = tmp_path / "split" / "checkpoints" / "last.pt"
    assert [h["step"] for h in load_training_checkpoint(ckpt)["eval_history"]] == [8, 10]

    resumed = Job(tmp_path / "split", [], resume_from=ckpt)
    assert resumed.calls["loaded"] is not None and torch.equal(resumed.calls["loaded"], torch.tensor([10.0]))
    assert resumed.trainer.eval_history == first.trainer.eval_history  # restored before training on
    resumed.fit()
    assert [h["step"] for h in resumed.trainer.eval_history] == [8, 10, 16]
    assert resumed.trainer.eval_history[0] == first.trainer.eval_history[0]
    assert same_numbers(resumed.trainer.eval_history[0], full.trainer.eval_history[0])  # the same run up to step 8
    last = load_training_checkpoint(ckpt)
    assert last["eval_history"] == resumed.trainer.eval_history and torch.equal(last["extra"], torch.tensor([16.0]))


def same_numbers(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Equal evaluations, apart from the time they took."""
    return {k: v for k, v in a.items() if k != "eval_time"} == {k: v for k, v in b.items() if k != "eval_time"}


def test_a_finished_run_resumed_is_not_evaluated_again(tmp_path: Path) -> None:
    job = Job(tmp_path / "run", [])
    job.fit()
    again = Job(tmp_path / "run", [], resume_from=tmp_path / "run" / "checkpoints" / "last.pt")
    again.fit()
    assert again.calls["eval"] == 0 and again.trainer.eval_history == job.trainer.eval_history
    plain = Job(tmp_path / "plain", ["schedule.max_steps=2"], evaluate=False)
    plain.fit()
    assert plain.calls["eval"] == 0 and "eval_history" not in load_training_checkpoint(plain.trainer.checkpointer.last)
    with pytest.raises(RuntimeError, match="without an evaluation"):
        plain.trainer.evaluate()


def test_finish_writes_the_summary_record_and_results_json(tmp_path: Path) -> None:
    job = Job(tmp_path / "run", ["schedule.max_steps=3"])
    with job.trainer:
        job.trainer.fit()
        job.trainer.finish({"acc": 1.5, "job": "toy"}, "done: toy", results=True)
    assert json.loads((tmp_path / "run" / "results.json").read_text()) == {"acc": 1.5, "job": "toy"}
    assert read_metrics(tmp_path / "run" / "metrics.jsonl", "summary") == [
        {"event": "summary", "acc": 1.5, "job": "toy"}
    ]
    assert (tmp_path / "run" / "log.txt").read_text().rstrip().endswith("done: toy")


def test_data_step_gives_a_zero_loss_for_an_all_bad_batch_and_passes_the_noise() -> None:
    model = nn.Linear(4, 2)
    report = SkipReport()
    seen: list[Any] = []

    def forward(data: Batch, noise: torch.Tensor | None) -> tuple[torch.Tensor, int]:
        seen.append(noise)
        return model(data.images).sum(), len(data)

    step = data_step(forward, model, CPU, report)
    bad = BadSample("x.jpg", "decode", "broken")
    empty = step(Batch(torch.zeros(0, 4), torch.zeros(0, dtype=torch.long), (bad,)))
    assert empty.batch_size == 0 and empty.skipped == 1 and float(empty.loss.detach()) == 0.0 and not seen
    empty.loss.backward()
    assert all(p.grad is not None and not p.grad.any() for p in model.parameters())  # connected, zero gradients
    noise = torch.rand(2, 3)
    out = step((Batch(torch.ones(2, 4), torch.zeros(2, dtype=torch.long)), noise))
    assert out.batch_size == 2 and seen == [noise] and report.skipped == 1
    step(Batch(torch.ones(1, 4), torch.zeros(1, dtype=torch.long)))
    assert seen[-1] is None
