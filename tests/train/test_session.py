"""A job's loop on the Session: periodic evaluation, its history across a resume, extra state, the summary."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from milan.data import BadSample, Batch, SkipReport
from milan.jobs.pretrain import milan_loss
from milan.models import create_model
from milan.train.checkpointing import load_training_checkpoint
from milan.train.config import AdamWConfig, RunConfig, derive, load_config
from milan.train.logging import read_metrics
from milan.train.loop import StepOutput, zero_loss
from milan.train.optim import build_adamw, param_groups
from milan.train.run import RunContext
from milan.train.session import Session, describe_metrics

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
    """A tiny classifier job written the way the real ones are; counts what happens."""

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
        self.evaluate = evaluate
        self.calls: dict[str, Any] = {"eval": 0, "loaded": None, "train_modes": []}
        d = derive(self.cfg, 1, len(self.data))
        run = RunContext(CPU, torch.float32, run_dir, resume_from, None, time.perf_counter())
        optimizer = build_adamw(param_groups(self.model, 0.0), AdamWConfig(), d.lr, CPU)
        self.session = Session(self.cfg, d, run, model=self.model, optimizer=optimizer)
        self.extra = torch.zeros(1)  # stands for a job's extra state (e.g. EMA weights)
        if self.session.resumed is not None:
            self.calls["loaded"] = self.session.resumed["extra"].clone()
            self.extra.copy_(self.session.resumed["extra"])
        self.session.extra["extra"] = self.extra

    def loss(self, data: Batch, report: SkipReport) -> StepOutput:
        self.calls["train_modes"].append(self.model.training)
        report.update(data)
        return StepOutput(F.cross_entropy(self.model(data.images), data.labels), len(data))

    @torch.no_grad()
    def validate(self) -> None:
        self.calls["eval"] += 1
        self.model.eval()  # the loop puts it back in training mode for the next epoch
        x = torch.cat([b.images for b in self.data])
        y = torch.cat([b.labels for b in self.data])
        acc = float((self.model(x).argmax(1) == y).float().mean()) * 100
        self.session.record_eval({"acc": acc, "weight": self.model.weight.sum().item()}, 0.01)

    def fit(self) -> None:
        s, report = self.session, SkipReport()
        with s:
            with s.training():
                while s.epochs_left():
                    self.model.train()
                    batches = s.epoch_batches(self.data, None)
                    while s.steps_left():
                        if s.train_step(self.loss, batches, report) is None:
                            break
                        self.extra.add_(1)
                        s.end_step()
                    if s.end_epoch(report):
                        if self.evaluate and s.eval_due(2):
                            self.validate()
                        s.save_epoch()
            if self.evaluate and not s.evaluated():
                self.validate()
            s.save_last()


def test_evaluates_every_n_epochs_and_at_the_end_and_keeps_the_history(tmp_path: Path) -> None:
    job = Job(tmp_path / "run", [])
    job.fit()
    history = job.session.eval_history
    assert [(h["epoch"], h["step"]) for h in history] == [(2, 8), (4, 16)]  # every 2 epochs; the last one included
    assert job.calls["eval"] == 2 and job.session.evaluated()
    assert all(job.calls["train_modes"])  # every step ran in training mode, although evaluation switched it off
    assert min(h["acc"] for h in history) >= 75.0  # it learned (chance: 50 %)
    records = read_metrics(tmp_path / "run" / "metrics.jsonl", "eval")
    assert [r["step"] for r in records] == [8, 16] and all(r["eval_time"] >= 0 for r in records)
    log = (tmp_path / "run" / "log.txt").read_text()
    assert f"eval epoch 4 (step 16): {describe_metrics(history[-1])}" in log
    assert [r["epoch"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl", "epoch")] == [1, 2, 3, 4]
    ckpt = load_training_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    assert ckpt["eval_history"] == history and torch.equal(ckpt["extra"], torch.tensor([16.0]))


def test_a_mid_epoch_stop_is_evaluated_and_a_resume_reports_the_same_history(tmp_path: Path) -> None:
    full = Job(tmp_path / "full", [])
    full.fit()
    first = Job(tmp_path / "split", ["schedule.max_steps=10"])  # stops 2 steps into epoch 2
    first.fit()
    assert [h["step"] for h in first.session.eval_history] == [8, 10]  # epoch 2, then the stop
    ckpt = tmp_path / "split" / "checkpoints" / "last.pt"
    assert [h["step"] for h in load_training_checkpoint(ckpt)["eval_history"]] == [8, 10]

    resumed = Job(tmp_path / "split", [], resume_from=ckpt)
    assert resumed.calls["loaded"] is not None and torch.equal(resumed.calls["loaded"], torch.tensor([10.0]))
    assert resumed.session.eval_history == first.session.eval_history  # restored before training on
    resumed.fit()
    assert [h["step"] for h in resumed.session.eval_history] == [8, 10, 16]
    assert resumed.session.eval_history[0] == first.session.eval_history[0]
    assert same_numbers(resumed.session.eval_history[0], full.session.eval_history[0])  # the same run up to step 8
    assert same_numbers(resumed.session.eval_history[-1], full.session.eval_history[-1])  # and to the end
    last = load_training_checkpoint(ckpt)
    assert last["eval_history"] == resumed.session.eval_history and torch.equal(last["extra"], torch.tensor([16.0]))


def same_numbers(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Equal evaluations, apart from the time they took."""
    return {k: v for k, v in a.items() if k != "eval_time"} == {k: v for k, v in b.items() if k != "eval_time"}


def test_a_finished_run_resumed_is_not_evaluated_again(tmp_path: Path) -> None:
    job = Job(tmp_path / "run", [])
    job.fit()
    again = Job(tmp_path / "run", [], resume_from=tmp_path / "run" / "checkpoints" / "last.pt")
    before = (tmp_path / "run" / "checkpoints" / "last.pt").stat().st_mtime_ns
    again.fit()
    assert again.calls["eval"] == 0 and again.session.eval_history == job.session.eval_history
    assert (tmp_path / "run" / "checkpoints" / "last.pt").stat().st_mtime_ns == before  # nothing new to save
    assert "nothing to train: the run is already at step 16" in (tmp_path / "run" / "log.txt").read_text()
    plain = Job(tmp_path / "plain", ["schedule.max_steps=2"], evaluate=False)
    plain.fit()
    assert plain.calls["eval"] == 0 and "eval_history" not in load_training_checkpoint(plain.session.checkpointer.last)


def test_finish_writes_the_summary_record_and_results_json(tmp_path: Path) -> None:
    job = Job(tmp_path / "run", ["schedule.max_steps=3"])
    job.fit()
    job.session.finish({"acc": 1.5, "job": "toy"}, "done: toy", results=True)
    assert json.loads((tmp_path / "run" / "results.json").read_text()) == {"acc": 1.5, "job": "toy"}
    assert read_metrics(tmp_path / "run" / "metrics.jsonl", "summary") == [
        {"event": "summary", "acc": 1.5, "job": "toy"}
    ]
    assert (tmp_path / "run" / "log.txt").read_text().rstrip().endswith("done: toy")


def test_an_all_bad_batch_gives_a_zero_loss_and_the_noise_reaches_the_mask() -> None:
    """Every process must take part in every step: a batch whose files were all unreadable still backpropagates,
    a zero loss connected to every trainable parameter (the accumulated gradients stay as they were)."""
    model = create_model("milan_test_tiny")
    report = SkipReport()
    bad = BadSample("x.jpg", "decode", "broken")
    empty = Batch(torch.zeros(0, 3, 32, 32), torch.zeros(0, dtype=torch.long), (bad,))
    out = milan_loss((empty, torch.zeros(0, 16)), model, model.student, report)
    assert out.batch_size == 0 and out.skipped == 1 and float(out.loss.detach()) == 0.0 and report.skipped == 1
    out.loss.backward()
    trainable = [p for p in model.student.parameters() if p.requires_grad]
    assert all(p.grad is not None and not p.grad.any() for p in trainable)
    assert float(zero_loss(nn.Linear(2, 2).requires_grad_(False), CPU)) == 0.0
    images = torch.randn(2, 3, 32, 32)
    noise = torch.rand(2, 16)
    a = milan_loss((Batch(images, torch.zeros(2, dtype=torch.long)), noise), model, model.student, report)
    b = milan_loss((Batch(images, torch.zeros(2, dtype=torch.long)), noise), model, model.student, report)
    c = milan_loss((Batch(images, torch.zeros(2, dtype=torch.long)), 1 - noise), model, model.student, report)
    assert a.batch_size == 2 and torch.equal(a.loss, b.loss) and not torch.equal(a.loss, c.loss)
