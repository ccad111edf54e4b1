"""Artifacts that describe themselves: pretrain -> linear probe and fine-tune -> export -> timm, no flags needed.

One tiny pipeline (the demo model: 64 px, patch 8, width 128 with 4 heads, where shapes alone would suggest 2) on
generated labelled images, then every reader of its files: ``milan export`` / ``inspect`` / ``evaluate``, the Python
loaders, and timm loading the exports with the printed call, ``resolve_model_data_config`` and ``create_transform``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from milan.checkpoint import load_classifier, load_encoder, read_checkpoint, safe_load
from milan.checkpoint.spec import ModelSpec
from milan.cli import main
from milan.data import eval_transform
from milan.jobs.evaluate import evaluate_checkpoint

timm = pytest.importorskip("timm")

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
CLASSES = {"cat": (150, 115, 115), "dog": (115, 150, 115), "owl": (115, 115, 150), "yak": (140, 140, 110)}


def _images(root: Path, per_class: int, seed: int) -> Path:
    """Noisy class-coloured JPEGs of odd sizes, ``root/<class>/<i>.jpg``."""
    rng = np.random.default_rng(seed)
    for name, colour in CLASSES.items():
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            h, w = int(rng.integers(40, 72)), int(rng.integers(40, 72))
            pixels = np.clip(rng.normal(colour, 110, size=(h, w, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i}.jpg", quality=90)
    return root


def _run(args: list[str]) -> None:
    assert main(args) == 0, args


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Pretrain (2 epochs), linear probe (5-lr grid) and fine-tune (2 epochs each) on 32 + 24 generated images."""
    root = tmp_path_factory.mktemp("round_trip")
    train, val = _images(root / "data" / "train", 8, 0), _images(root / "data" / "val", 6, 1)
    quiet = ["log.tensorboard=false", "log.progress=false", "runtime.cpu_threads=1"]
    quiet += ["checkpoint.every_epochs=1", "checkpoint.keep=2"]
    short = ["schedule.epochs=2", "schedule.warmup_epochs=0", "batch_size=16"]
    _run(["pretrain", "--config", str(CONFIGS / "pretrain/demo_cpu.yaml"), f"out_dir={root / 'pre'}",
          f"data.path={train}", "log.plot=false", *short, *quiet])  # fmt: skip
    pretrained = root / "pre" / "checkpoints" / "last.pt"
    data = [f"data.train={train}", f"data.val={val}", "data.train_per_class=null", "data.val_per_class=null"]
    for job in ("linprobe", "finetune"):
        _run([job, "--config", str(CONFIGS / job / "cifar10_tiny_cpu.yaml"), f"out_dir={root / job}",
              f"encoder.pretrained={pretrained}", *data, "eval_every=1", *short, *quiet])  # fmt: skip
    return {"root": root, "train": train, "val": val, "pre": root / "pre", "lp": root / "linprobe",
            "ft": root / "finetune"}  # fmt: skip


def _spec(path: Path) -> ModelSpec:
    blob = safe_load(path)
    return ModelSpec.from_dict(blob["spec"])


def test_every_checkpoint_carries_its_spec(runs: dict[str, Path]) -> None:
    pre, lp, ft = runs["pre"], runs["lp"], runs["ft"]
    for path in (pre / "checkpoints" / "last.pt", pre / "checkpoints" / "epoch_0001.pt"):
        spec = _spec(path)
        assert spec.kind == "milan" and spec.version == 1
        assert (spec.encoder.embed_dim, spec.encoder.depth, spec.encoder.num_heads) == (128, 4, 4)
        assert spec.decoder is not None and spec.decoder.num_heads == 4
        assert spec.teacher is not None and spec.teacher.format == "random" and spec.teacher.tower.img_size == 64
        assert spec.teacher.tower.act == "quick_gelu" and spec.teacher.input_norm == "imagenet"
        assert spec.preprocessing.img_size == 64 and spec.preprocessing.interpolation == "bicubic"
    names = sorted(CLASSES)
    for path in (lp / "checkpoints" / "last.pt", lp / "checkpoints" / "epoch_0001.pt", lp / "classifier.pt"):
        spec = _spec(path)
        assert spec.kind == "linear_probe" and spec.encoder.num_heads == 4 and spec.head is not None
        assert spec.head.class_names == names and spec.head.global_pool == "token" and spec.head.lr is not None
        assert (spec.head.grid_index is None) == (path.name == "classifier.pt")
    results = json.loads((lp / "results.json").read_text())
    assert _spec(lp / "classifier.pt").head.lr == results["best_lr"]  # type: ignore[union-attr]
    for path in (ft / "checkpoints" / "last.pt", ft / "classifier.pt"):
        spec = _spec(path)
        assert spec.kind == "finetune" and spec.encoder.num_heads == 4 and spec.head is not None
        assert spec.head.class_names == names and spec.head.global_pool == "avg"
        assert spec.preprocessing.crop_pct == 0.875
    # the Python loaders take the heads from the spec (shapes alone say 128 / 64 = 2)
    assert load_classifier(ft / "checkpoints" / "last.pt").encoder.num_heads == 4
    assert load_classifier(lp / "checkpoints" / "last.pt").encoder.num_heads == 4
    assert load_encoder(ft / "checkpoints" / "last.pt").num_heads == 4


def test_export_and_inspect_read_the_spec(runs: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    """Today's failures: a fine-tune checkpoint exported with num_heads=2; inspect said "heads 2 (assumed)" and
    called a linear-probe checkpoint a "ViT encoder"."""
    ft_last, lp_last = runs["ft"] / "checkpoints" / "last.pt", runs["lp"] / "checkpoints" / "last.pt"
    capsys.readouterr()
    _run(["export", str(ft_last), "--out", str(runs["root"] / "exports" / "ft_last.safetensors")])
    out, err = capsys.readouterr()
    assert "num_heads=4" in out and "num_heads=2" not in out and err == ""
    _run(["inspect", str(ft_last)])
    out = capsys.readouterr().out
    assert "heads 4," in out and "assumed" not in out and "model spec:  stored (version 1)" in out
    assert "head:        finetune, 4 classes (cat, dog, owl, yak), pooling: mean of the patch tokens" in out
    _run(["inspect", str(lp_last)])
    out = capsys.readouterr().out
    assert "ViT encoder" not in out and "an lr grid of 5 heads" in out and "heads 4," in out
    assert "eval view:   64 px: bicubic resize to 73, center crop (crop_pct 0.875)" in out


def _timm_from_printed(stdout: str) -> tuple[torch.nn.Module, Any]:
    """Runs the printed ``load:`` lines (the user's copy-paste) and returns their ``model`` and ``transform``."""
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("load: "))
    code = [lines[start].removeprefix("load: ")]
    code += [line.strip() for line in lines[start + 1 :] if line.startswith("      ")]
    scope: dict[str, Any] = {"timm": timm}
    exec("import timm.data\n" + "\n".join(code), scope)
    return scope["model"].eval(), scope["transform"]


def _files(root: Path) -> list[tuple[Path, str]]:
    return [(p, c.name) for c in sorted(root.iterdir()) for p in sorted(c.iterdir())]


@pytest.mark.parametrize("job", ["lp", "ft"])
def test_timm_export_predicts_what_milan_evaluate_measures(
    runs: dict[str, Path], job: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """export --to timm of a classifier, no flags -> timm.create_model with the printed arguments,
    resolve_model_data_config + create_transform -> the predictions of milan evaluate, image by image."""
    classifier = runs[job] / "classifier.pt"
    capsys.readouterr()
    _run(["export", str(classifier), "--to", "timm", "--out", str(runs["root"] / "exports" / f"{job}.safetensors")])
    model, transform = _timm_from_printed(capsys.readouterr().out)
    cfg = timm.data.resolve_model_data_config(model)
    assert cfg["input_size"] == (3, 64, 64) and cfg["mean"] == (0.485, 0.456, 0.406) and cfg["crop_pct"] == 0.875
    assert model.pretrained_cfg["label_names"] == sorted(CLASSES)
    files = _files(runs["val"])
    ours = load_classifier(classifier)
    pipeline = eval_transform(64)  # what milan evaluate uses for this spec (checked against its accuracy below)
    with torch.no_grad():
        x_timm = torch.stack([transform(Image.open(p).convert("RGB")) for p, _ in files])
        x_ours = torch.stack([pipeline(Image.open(p).convert("RGB")) for p, _ in files])
        torch.testing.assert_close(x_timm, x_ours, atol=1e-6, rtol=0)
        logits_timm, logits_ours = model(x_timm), ours(x_ours)
    torch.testing.assert_close(logits_timm, logits_ours, atol=1e-4, rtol=1e-4)
    predicted = [model.pretrained_cfg["label_names"][i] for i in logits_timm.argmax(1).tolist()]
    assert predicted == [sorted(CLASSES)[i] for i in logits_ours.argmax(1).tolist()]
    result = evaluate_checkpoint(str(classifier), str(runs["val"]), device="cpu", num_workers=0, progress=False)
    timm_top1 = 100 * float(np.mean([p == c for p, (_, c) in zip(predicted, files, strict=True)]))
    assert result["top1"] == pytest.approx(timm_top1) and result["count"] == len(files) and result["notes"] == []


def test_timm_encoder_export_features(runs: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    ckpt = runs["pre"] / "checkpoints" / "last.pt"
    capsys.readouterr()
    _run(["export", str(ckpt), "--out", str(runs["root"] / "exports" / "encoder.safetensors")])
    model, transform = _timm_from_printed(capsys.readouterr().out)
    image = Image.open(_files(runs["val"])[0][0]).convert("RGB")
    x = transform(image)[None]
    torch.testing.assert_close(x, eval_transform(64)(image)[None], atol=1e-6, rtol=0)
    with torch.no_grad():
        torch.testing.assert_close(model.forward_features(x), load_encoder(ckpt).forward_features(x), atol=1e-5, rtol=0)


def test_evaluate_matches_classes_by_name(runs: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    """Today: with one class folder removed, the labels shift (cat's images gone, dog=0 ...) with no warning."""
    classifier = runs["ft"] / "classifier.pt"
    full = runs["val"]
    three = runs["root"] / "val_without_cat"
    shutil.copytree(full, three)
    shutil.rmtree(three / "cat")
    notes: list[str] = []
    result = evaluate_checkpoint(str(classifier), str(three), device="cpu", num_workers=0, warn=notes.append)
    model = load_classifier(classifier)
    pipeline = eval_transform(64)
    files = [(p, c) for p, c in _files(full) if c != "cat"]
    with torch.no_grad():
        preds = model(torch.stack([pipeline(Image.open(p).convert("RGB")) for p, _ in files])).argmax(1).tolist()
    expected = 100 * float(np.mean([sorted(CLASSES)[i] == c for i, (_, c) in zip(preds, files, strict=True)]))
    assert result["top1"] == pytest.approx(expected) and result["count"] == 18
    assert len(notes) == 1 and "lacks 1 of the classifier's 4 classes (cat)" in notes[0]
    (three / "emu").mkdir()
    shutil.copy(files[0][0], three / "emu" / "0.jpg")
    capsys.readouterr()
    assert main(["evaluate", "--checkpoint", str(classifier), "--data", str(three), "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert "emu" in err and "unknown to the classifier" in err and "\n" not in err


def test_linprobe_summary_names_the_winning_lr_and_plots_every_head(runs: dict[str, Path]) -> None:
    results = json.loads((runs["lp"] / "results.json").read_text())
    done = [line for line in (runs["lp"] / "log.txt").read_text().splitlines() if "done: linprobe" in line]
    assert len(done) == 1 and f"at lr {results['best_lr']:.4g} (winner of 5 heads)" in done[0]
    plot = Path(results["lr_grid_plot"])
    assert plot == runs["lp"] / "lr_grid.png" and Image.open(plot).size[0] > 300
    assert len(results["heads"]) == 5 and results["best_head"] in range(5)


def test_a_foreign_file_gets_one_warning_per_assumption(
    runs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A bare timm-layout encoder records neither its heads nor its view: say what was assumed and which flag."""
    encoder = load_encoder(runs["pre"] / "checkpoints" / "last.pt")
    torch.save(encoder.state_dict(), tmp_path / "bare.pth")
    capsys.readouterr()
    _run(["export", str(tmp_path / "bare.pth"), "--out", str(tmp_path / "bare.safetensors")])
    out, err = capsys.readouterr()
    warnings = err.strip().splitlines()
    assert len(warnings) == 2 and all(w.startswith("milan export: warning: ") for w in warnings)
    assert "encoder heads: 2 assumed" in warnings[0] and "--num-heads" in warnings[0]
    assert "preprocessing:" in warnings[1] and "--crop-pct" in warnings[1]
    _run(["export", str(tmp_path / "bare.pth"), "--out", str(tmp_path / "bare4.safetensors"), "--num-heads", "4",
          "--crop-pct", "0.9", "--interpolation", "bicubic", "--mean", "0.485", "0.456", "0.406",
          "--std", "0.229", "0.224", "0.225"])  # fmt: skip
    out, err = capsys.readouterr()
    assert err == "" and "num_heads=4" in out and "crop_pct=0.9" in out
    assert read_checkpoint(tmp_path / "bare4.safetensors").encoder_arch().num_heads == 4  # the spec travels


def test_export_out_folder(runs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Missing folders are created; a folder that cannot be one is a one-line error with exit 1, no traceback."""
    classifier = str(runs["ft"] / "classifier.pt")
    _run(["export", classifier, "--out", str(tmp_path / "new" / "deeper" / "ft.safetensors")])
    assert (tmp_path / "new" / "deeper" / "ft.safetensors").is_file()
    (tmp_path / "a_file").write_text("x")
    capsys.readouterr()
    for to in ("timm", "hf"):
        assert main(["export", classifier, "--to", to, "--out", str(tmp_path / "a_file" / "sub" / "x")]) == 1
        err = capsys.readouterr().err.strip()
        assert err.startswith("milan export: error: cannot create the output folder") and "\n" not in err
