"""``milan segment`` end to end: the ADE20K preset on generated data, resume, evaluate and visualize, errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from milan.checkpoint.segmenter import load_segmenter, segmentation_spec
from milan.cli import main
from milan.jobs.segment import segment
from milan.train.checkpointing import load_training_checkpoint
from milan.train.config import SegmentConfig, load_config
from milan.train.logging import read_metrics
from tests.segment.conftest import REPO, generic_overrides, overrides, write_pairs

ADE_PRESET = REPO / "configs/segment/milan_vit_base_patch16_ade20k_512_160k.yaml"
CAMVID_PRESET = REPO / "configs/segment/camvid_tiny_cpu.yaml"


def camvid(out: Path, root: Path, encoder: Path, *extra: str, **more: object) -> SegmentConfig:
    return load_config(SegmentConfig, CAMVID_PRESET, [*generic_overrides(out, root, encoder, **more), *extra])


def test_a_tiny_run_writes_its_artifacts_and_prints_miou(
    tmp_path: Path, folder_root: Path, tiny_encoder8: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = camvid(tmp_path / "r", folder_root, tiny_encoder8, **{"schedule.iters": 5, "eval.every_steps": 2})
    result = segment(cfg)
    run = result.run_dir
    out = capsys.readouterr().out
    assert "done: segment mIoU" in out and "on 3 images" in out
    summary = json.loads((run / "results.json").read_text())
    assert summary["job"] == "segment" and summary["step"] == 5 and summary["epoch"] == 1  # 4 steps, then 1 of 4
    assert summary["images_seen"] == 10 and summary["eval_images"] == 3
    assert {"mIoU", "mAcc", "aAcc", "IoU", "Acc", "max_mIoU", "wall_time", "segmenter"} <= summary.keys()
    assert sorted(summary["IoU"]) == ["0", "1", "2", "3"]
    evals = read_metrics(run / "metrics.jsonl", "eval")
    assert [e["step"] for e in evals] == [2, 4, 5]  # every 2 steps, inside the epoch loop, and at the end
    assert evals[-1]["mIoU"] == summary["mIoU"] and [r["step"] for r in read_metrics(run / "metrics.jsonl")] == [
        1, 2, 3, 4, 5
    ]  # fmt: skip
    log = (run / "log.txt").read_text()
    assert "4 steps/epoch x 2 epochs (the last one partial) = 5 steps" in log and "5 iterations (schedule.iters)" in log
    lrs = [r["lr"] for r in read_metrics(run / "metrics.jsonl")]
    peak = cfg.optim.lr
    assert peak is not None and lrs[0] == pytest.approx(1e-6 * peak)  # warm-up of 1 step from 1e-6 x lr
    assert lrs[1:] == pytest.approx([peak, peak * 3 / 4, peak / 2, peak / 4])  # poly (power 1) to 0 at step 5
    assert "skipped 0 of 10 images" in log  # the last, partial epoch's 2 images are counted too
    blob = torch.load(run / "segmenter.pt", weights_only=True)
    assert blob["class_names"] == ["0", "1", "2", "3"] and blob["metrics"]["mIoU"] == summary["mIoU"]
    assert blob["config"]["data"]["crop_size"] == 64 and blob["spec"]["kind"] == "segmentation"
    ckpt = load_training_checkpoint(run / "checkpoints" / "last.pt")
    assert ckpt["spec"] == blob["spec"] and ckpt["state"]["step"] == 5
    assert segmentation_spec(run / "checkpoints" / "last.pt") == blob["spec"]
    model, spec = load_segmenter(run / "segmenter.pt")
    assert model.num_classes == 4 and not model.training and spec["eval"] == {
        "scale": [96, 64], "mode": "slide", "crop": 64, "stride": 43
    }  # fmt: skip


def test_ade20k_preset_runs_two_steps_on_generated_ade20k_data(
    tmp_path: Path, ade_root: Path, tiny_encoder16: Path
) -> None:
    cfg = load_config(SegmentConfig, ADE_PRESET, overrides(tmp_path / "ade", ade_root, tiny_encoder16))
    d = cfg.data  # the preset's pipeline, untouched by the overrides (only sizes: encoder, heads, steps)
    assert (d.crop_size, d.scale, d.ratio_range, d.cat_max_ratio, d.reduce_zero_label, d.photometric) == (
        512, (2048, 512), (0.5, 2.0), 0.75, True, True
    )  # fmt: skip
    assert (cfg.eval.mode, cfg.eval.crop, cfg.eval.stride, cfg.layer_decay, cfg.optim.lr) == (
        "slide",
        512,
        341,
        0.65,
        1e-4,
    )
    assert len(d.class_names or []) == 150
    result = segment(cfg)
    run = result.run_dir
    assert result.state.step == 2 and result.state.images_seen == 4
    summary = json.loads((run / "results.json").read_text())
    assert summary["job"] == "segment" and summary["step"] == 2 and summary["eval_images"] == 2
    assert 0.0 <= summary["mIoU"] <= 100.0 and len(summary["IoU"]) == 150 and "wall" in summary["IoU"]
    assert [r["step"] for r in read_metrics(run / "metrics.jsonl")] == [1, 2]
    (ev,) = read_metrics(run / "metrics.jsonl", "eval")
    assert ev["mIoU"] == summary["mIoU"]
    log = (run / "log.txt").read_text()
    assert "2 iterations (schedule.iters)" in log and "150 classes, ignore index 255, reduce_zero_label" in log
    ckpt = load_training_checkpoint(run / "checkpoints" / "last.pt")
    assert ckpt["spec"]["kind"] == "segmentation" and ckpt["config"]["data"]["crop_size"] == 512
    model, spec = load_segmenter(run / "segmenter.pt")
    assert model.num_classes == 150 and spec["arch"]["blocks"] == [0, 0, 0, 1]
    assert spec["eval"] == {"scale": [2048, 512], "mode": "slide", "crop": 512, "stride": 341}
    assert spec["labels"]["class_names"][:2] == ["wall", "building"]
    # a finished run has nothing left to do, and changes no file
    before = (run / "results.json").read_text()
    resumed = segment(cfg, resume="auto")
    assert resumed.state.step == 2 and resumed.summary["mIoU"] == summary["mIoU"]
    assert (run / "results.json").read_text() == before


def test_an_interrupted_run_resumes_to_the_same_weights(tmp_path: Path, folder_root: Path, tiny_encoder8: Path) -> None:
    extra = {"schedule.iters": 7, "schedule.warmup_iters": 2, "checkpoint.every_steps": 2, "batch_size": 3,
             "eval.every_steps": 4}  # fmt: skip  # 8 pairs -> 2 batches per epoch: 4 epochs, the last partial
    full = segment(camvid(tmp_path / "a", folder_root, tiny_encoder8, **extra))
    first = segment(camvid(tmp_path / "b", folder_root, tiny_encoder8, "schedule.max_steps=3", **extra))
    assert first.state.step == 3 and first.state.batch_in_epoch == 1  # stopped mid-epoch
    second = segment(camvid(tmp_path / "b", folder_root, tiny_encoder8, **extra), resume="auto")
    assert second.state.step == 7
    a = torch.load(full.run_dir / "segmenter.pt", weights_only=True)["model"]
    b = torch.load(second.run_dir / "segmenter.pt", weights_only=True)["model"]
    assert a.keys() == b.keys()
    for key in a:  # dropout 0.1 and drop path 0.1 are on: their draws are the same too
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)
    assert [h["step"] for h in full.history] == [4, 7] and [h["step"] for h in second.history] == [3, 4, 7]
    assert [h["mIoU"] for h in second.history[1:]] == [
        h["mIoU"] for h in full.history
    ]  # step 3: the first launch's end
    steps = [r["step"] for r in read_metrics(second.run_dir / "metrics.jsonl")]
    assert steps == [1, 2, 3, 4, 5, 6, 7]


def test_a_bad_label_value_stops_with_one_line_naming_file_and_value(
    tmp_path: Path, tiny_encoder8: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["segment", "--config", str(CAMVID_PRESET), f"out_dir={tmp_path / 'x'}", "runtime.device=cpu"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "data.root is not set: pass data.root=DIR" in err
    bad = tmp_path / "bad"
    stems = write_pairs(bad / "train" / "images", bad / "train" / "labels", 4, size=(64, 48), values=4)
    write_pairs(bad / "test" / "images", bad / "test" / "labels", 1, size=(64, 48), values=4)
    Image.fromarray(np.full((48, 64), 200, dtype=np.uint8), mode="L").save(bad / "train" / "labels" / f"{stems[2]}.png")
    code = main(["segment", "--config", str(CAMVID_PRESET),
                 *generic_overrides(tmp_path / "y", bad, tiny_encoder8, batch_size=4)])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert f"{stems[2]}.png: label value 200" in err and "data.num_classes" in err


@pytest.mark.ddp
def test_two_gloo_processes_train_and_evaluate_like_one(tmp_path: Path, folder_root: Path, tiny_encoder8: Path) -> None:
    """torchrun with 2 processes x 1 image equals 1 process x 2 images: the same samples and crops, BatchNorm
    statistics over both processes' images, gradients averaged, evaluation shards summed."""
    import os
    import subprocess
    import sys

    same = {"schedule.iters": 3, "schedule.warmup_iters": 1, "model.dropout": 0.0, "drop_path_rate": 0.0}
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "milan"]
    args = ["segment", "--config", str(CAMVID_PRESET),
            *generic_overrides(tmp_path / "ddp", folder_root, tiny_encoder8, batch_size=1, **same)]  # fmt: skip
    result = subprocess.run([*cmd, *args], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 process(es)" in result.stdout and "effective 2" in result.stdout
    assert "BatchNorm statistics are all-reduced" in result.stdout
    single = segment(camvid(tmp_path / "one", folder_root, tiny_encoder8, batch_size=2, **same))
    two = json.loads((tmp_path / "ddp" / "results.json").read_text())
    a = torch.load(tmp_path / "ddp" / "segmenter.pt", weights_only=True)["model"]
    b = torch.load(single.run_dir / "segmenter.pt", weights_only=True)["model"]
    assert a.keys() == b.keys()
    for key in a:  # float summation order differs (all-reduced sums vs one batch)
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-4, msg=key)
    assert two["eval_images"] == 3 and two["images_seen"] == single.state.images_seen == 6
    assert two["mIoU"] == pytest.approx(single.final["mIoU"], abs=0.5)


def test_evaluate_and_visualize_read_segmentation_checkpoints(
    tmp_path: Path, folder_root: Path, tiny_encoder8: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = segment(camvid(tmp_path / "r", folder_root, tiny_encoder8)).run_dir
    final = json.loads((run / "results.json").read_text())
    out_json = tmp_path / "ev.json"
    for ckpt in (run / "segmenter.pt", run / "checkpoints" / "last.pt"):
        args = ["--data", str(folder_root / "test"), "--num-workers", "0", "--device", "cpu", "--no-progress"]
        assert main(["evaluate", "--checkpoint", str(ckpt), *args, "--out", str(out_json)]) == 0
        ev = json.loads(out_json.read_text())
        assert (
            ev["kind"] == "segmentation" and ev["count"] == 3 and ev["mIoU"] == pytest.approx(final["mIoU"], abs=1e-9)
        )
        assert ev["IoU"] == pytest.approx(final["IoU"], abs=1e-9)
        assert f"segmentation {ckpt}: mIoU {final['mIoU']:.2f}" in capsys.readouterr().out
    png = tmp_path / "vis.png"
    images = folder_root / "test" / "images"
    assert main(["visualize", "--checkpoint", str(run / "segmenter.pt"), str(images), "--out", str(png),
                 "--max-images", "2", "--device", "cpu"]) == 0  # fmt: skip
    picture = np.asarray(Image.open(png).convert("RGB"))
    assert picture.shape[0] > 300 and picture.std() > 10  # a drawn grid, not a blank canvas
    # the legend and the ground-truth column: render the same rows without labels and compare
    no_labels = tmp_path / "nolabels" / "images"
    no_labels.mkdir(parents=True)
    for p in sorted(images.iterdir())[:2]:
        (no_labels / p.name).write_bytes(p.read_bytes())
    png2 = tmp_path / "vis2.png"
    assert main(["visualize", "-c", str(run / "segmenter.pt"), str(no_labels), "-o", str(png2), "--device", "cpu"]) == 0
    other = np.asarray(Image.open(png2).convert("RGB"))
    assert other.shape == picture.shape and not np.array_equal(other, picture)
    capsys.readouterr()
    assert main(["evaluate", "--checkpoint", str(run / "segmenter.pt"), "--data", str(tmp_path / "nolabels")]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "images/ and labels/" in err
    assert main(["inspect", str(run / "segmenter.pt")]) != 0  # an encoder/classifier reader refuses it in one line
    err = capsys.readouterr().err
    assert "milan segment checkpoint" in err and len(err.strip().splitlines()) == 1


def test_a_timm_vit_file_is_an_encoder(tmp_path: Path, folder_root: Path) -> None:
    """A plain timm ViT state dict (safetensors, as `milan export --to timm` writes) starts a segmentation run."""
    import timm
    from safetensors.torch import save_file

    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=32, patch_size=8,
                            embed_dim=32, depth=2, num_heads=2)  # fmt: skip
    path = tmp_path / "timm_vit.safetensors"
    save_file({k: v.contiguous() for k, v in vit.state_dict().items()}, str(path))
    result = segment(camvid(tmp_path / "t", folder_root, path, **{"schedule.iters": 1}))
    log = (result.run_dir / "log.txt").read_text()
    assert "timm format" in log and "ViT 32d x 2 blocks, 2 heads, patch 8" in log
    assert result.state.step == 1
    trained = torch.load(result.run_dir / "segmenter.pt", weights_only=True)["model"]
    for key in ("patch_embed.proj.weight", "blocks.1.mlp.fc2.weight"):  # step 0's lr is 1e-6 x lr: still the file's
        torch.testing.assert_close(trained[f"encoder.{key}"], vit.state_dict()[key], atol=1e-6, rtol=0)
