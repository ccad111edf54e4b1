"""The evaluation jobs end to end on CPU: tiny encoder, CIFAR-10 subsets (chance = 10 %)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from milan.checkpoint import load_classifier
from milan.data import build_dataset, eval_transform
from milan.jobs.classifier import load_pretrained_encoder
from milan.jobs.evaluate import evaluate_checkpoint
from milan.jobs.finetune import finetune
from milan.jobs.knn import encoder_features, knn
from milan.jobs.linprobe import linprobe
from milan.knn import knn_scores
from milan.train.config import FinetuneConfig, KnnConfig, LinprobeConfig, load_config
from milan.train.logging import read_metrics
from tests.jobs.conftest import job_overrides

QUIET = {"log.tensorboard": False, "log.every_steps": 5}


def _naive_topk(model: torch.nn.Module, root: Path, size: int) -> tuple[float, float, int]:
    """Top-1/top-5 by ranking each image's true-class logit, one image at a time."""
    data = build_dataset(root, eval_transform(size), labelled=True)
    top1 = top5 = 0
    model.eval()
    with torch.no_grad():
        for i in range(len(data)):
            image, label = data[i]
            logits = model(image[None])[0]
            rank = int((logits > logits[label]).sum())
            top1 += rank == 0
            top5 += rank < 5
    return 100 * top1 / len(data), 100 * top5 / len(data), len(data)


def test_linprobe_beats_chance_and_evaluate_matches_naive(tmp_path, cifar, tiny_encoder_ckpt):
    overrides = job_overrides(
        tmp_path / "lp", tiny_encoder_ckpt, cifar, batch_size=100, **{"optim.lr": 1.0, "optim.lr_grid": "[3,10,30]"},
        **{"schedule.epochs": 4, "schedule.warmup_epochs": 1, "eval_every": 4, "data.scale": "[0.35,1.0]"}, **QUIET,
    )  # fmt: skip
    result = linprobe(load_config(LinprobeConfig, overrides=overrides))
    # random frozen features, 40 LARS steps: ~22 % here; chance is 10 % (16 % is 3.5 sigma above it on 300 images)
    assert result.final["top1"] > 16.0, result.final
    assert [h["lr"] for h in result.final["heads"]] == [3.0, 10.0, 30.0]
    assert result.final["top1"] == max(h["top1"] for h in result.final["heads"])
    saved = json.loads((result.run_dir / "results.json").read_text())
    assert saved["top1"] == result.final["top1"] and saved["job"] == "linprobe"
    records = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert {"train", "eval", "summary"} <= {r["event"] for r in records}

    # milan evaluate on the exported probe reproduces the run's number and a naive per-image computation
    out = evaluate_checkpoint(str(result.run_dir / "classifier.pt"), str(cifar["val"]), device="cpu", num_workers=0)
    naive = _naive_topk(load_classifier(result.run_dir / "classifier.pt"), cifar["val"], 32)
    assert (out["top1"], out["top5"], out["count"]) == pytest.approx(naive)
    assert out["top1"] == pytest.approx(result.final["top1"])
    assert out["kind"] == "linear_probe"


def test_finetune_beats_chance_with_ema(tmp_path, cifar, tiny_encoder_ckpt):
    overrides = job_overrides(
        tmp_path / "ft", tiny_encoder_ckpt, cifar, batch_size=50, **{"optim.lr": 1e-3, "schedule.epochs": 3},
        **{"schedule.warmup_epochs": 1, "eval_every": 3, "ema.enabled": True, "ema.decay": 0.9}, **QUIET,
    )  # fmt: skip
    result = finetune(load_config(FinetuneConfig, overrides=overrides))
    # full reference augmentation, 60 steps from a random encoder: ~25 % here; chance is 10 %
    assert result.final["top1"] > 18.0, result.final
    assert 0 <= result.final["ema_top1"] <= 100
    weights = torch.load(result.run_dir / "classifier.pt", weights_only=True)["model"]
    averaged = torch.load(result.run_dir / "classifier_ema.pt", weights_only=True)["model"]
    assert weights.keys() == averaged.keys() and not torch.equal(weights["head.weight"], averaged["head.weight"])
    out = evaluate_checkpoint(str(result.run_dir / "classifier.pt"), str(cifar["val"]), device="cpu", num_workers=0)
    assert out["top1"] == pytest.approx(result.final["top1"]) and out["kind"] == "finetune"
    ema = evaluate_checkpoint(str(result.run_dir / "classifier_ema.pt"), str(cifar["val"]), device="cpu", num_workers=0)
    assert ema["top1"] == pytest.approx(result.final["ema_top1"])


def test_linprobe_resume_is_exact(tmp_path, cifar, tiny_encoder_ckpt):
    data = {"train": cifar["train_small"], "val": cifar["val"]}
    common = {"batch_size": 50, "optim.lr": 3.0, "optim.lr_grid": "[1.0,3.0]", "schedule.epochs": 2, **QUIET}
    common |= {"schedule.warmup_epochs": 1, "eval_every": 2}

    def cfg(out: Path, **extra: object) -> LinprobeConfig:
        return load_config(LinprobeConfig, overrides=job_overrides(out, tiny_encoder_ckpt, data, **common, **extra))

    full = linprobe(cfg(tmp_path / "full"))
    first = linprobe(cfg(tmp_path / "split", **{"schedule.max_steps": 5}))  # stops mid-epoch 0 (6 steps/epoch)
    assert first.state.step == 5
    resumed = linprobe(cfg(tmp_path / "split"), resume="auto")
    assert resumed.state.step == full.state.step == 12
    a = torch.load(full.run_dir / "classifier.pt", weights_only=True)["model"]
    b = torch.load(resumed.run_dir / "classifier.pt", weights_only=True)["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert resumed.final["top1"] == full.final["top1"] and resumed.final["heads"] == full.final["heads"]


def test_knn_beats_chance_caches_and_matches_direct_computation(tmp_path, cifar, tiny_encoder_ckpt):
    extra = {"k": "[5,20]", "batch_size": 100, "cache_dir": tmp_path / "cache"}
    first = knn(load_config(KnnConfig, overrides=job_overrides(tmp_path / "a", tiny_encoder_ckpt, cifar, **extra)))
    assert first.cache_hits == 0 and first.num_train == 1000 and first.num_val == 300
    assert first.metrics[20]["top1"] > 16.0, first.metrics  # random features: ~24 % here; chance is 10 %
    again = knn(load_config(KnnConfig, overrides=job_overrides(tmp_path / "b", tiny_encoder_ckpt, cifar, **extra)))
    assert again.cache_hits == 2 and again.metrics == first.metrics

    # the same number from features computed here and the plain scoring function
    cfg = load_config(KnnConfig, overrides=job_overrides(tmp_path / "c", tiny_encoder_ckpt, cifar))
    encoder = load_pretrained_encoder(cfg.encoder)[0].eval()

    def feats(root: Path) -> tuple[torch.Tensor, torch.Tensor]:
        ds = build_dataset(root, eval_transform(32), labelled=True)
        with torch.no_grad():
            xs = torch.cat(
                [
                    encoder_features(encoder, "cls", torch.stack([ds[i][0] for i in range(j, min(j + 100, len(ds)))]))
                    for j in range(0, len(ds), 100)
                ]
            )
        return xs.half().float(), torch.tensor([s[1] for s in ds.samples])  # the cache stores float16

    (tf, ty), (vf, vy) = feats(cifar["train"]), feats(cifar["val"])
    scores = knn_scores(tf, ty, vf, 10, k=5, temperature=0.07)
    assert 100 * float((scores.argmax(1) == vy).float().mean()) == pytest.approx(first.metrics[5]["top1"])


def _failing_backend(gm: torch.fx.GraphModule, example_inputs: list[torch.Tensor]) -> object:
    raise RuntimeError("inductor: no C++ compiler")


def test_finetune_compile_falls_back_to_eager(tmp_path, cifar, tiny_encoder_ckpt, monkeypatch):
    """runtime.compile in fine-tuning goes through milan.models.compile (inside DDP, after the EMA copy): a failing
    backend warns, runs eagerly, and gives eager's losses, weights and EMA weights."""
    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: real_compile(fn, backend=_failing_backend))
    settings = {"optim.lr": 1e-3, "schedule.epochs": 1, "schedule.warmup_epochs": 0, "schedule.max_steps": 2, **QUIET}
    settings.update({"ema.enabled": True, "log.every_steps": 1})

    def run(name: str, compile_: bool) -> object:
        overrides = job_overrides(tmp_path / name, tiny_encoder_ckpt, cifar, batch_size=50, **settings)
        return finetune(load_config(FinetuneConfig, overrides=[*overrides, f"runtime.compile={compile_}"]))

    with pytest.warns(RuntimeWarning, match="torch.compile of FinetuneClassifier.forward failed"):
        compiled = run("compiled", True)
    results = [run("eager", False), compiled]
    losses = [[r["loss"] for r in read_metrics(r.run_dir / "metrics.jsonl")] for r in results]
    assert len(losses[0]) == 2 and losses[0] == losses[1]
    for file in ("classifier.pt", "classifier_ema.pt"):
        a, b = (torch.load(r.run_dir / file, weights_only=True)["model"] for r in results)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), file
