"""Pretraining on unusable data stops with one line; a damaged shard ends its epoch cleanly; data keys are checked.

Each case was observed on the code before this test: an all-bad folder "trained" on zero images, wrote a
checkpoint and exited 0; a truncated shard crashed the epoch ("the loader ran out of batches"); ``pipe:`` ran its
command; ``data.max_image_pixels=-1`` was accepted.
"""

from __future__ import annotations

import io
import tarfile
from pathlib import Path
from typing import Any

import pytest

import milan.jobs.pretrain as pretrain_module
from milan.cli import main as cli
from milan.train.config import ConfigError, PretrainConfig, check_pretrain, load_config
from milan.train.logging import read_metrics
from tests.data.conftest import encode, noisy_rgb
from tests.train.conftest import tiny_overrides, write_jpegs

REPO = Path(__file__).resolve().parents[2]


def test_a_folder_without_a_usable_image_stops_without_a_checkpoint(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad"
    bad.mkdir()
    for i in range(6):
        (bad / f"x{i}.jpg").write_bytes(b"not an image")
    assert cli(["pretrain", *tiny_overrides(tmp_path / "run", bad, {"batch_size": 2})]) == 1
    err = capsys.readouterr().err.strip()  # one line, the skip report included
    assert err.startswith(
        "milan pretrain: error: epoch 1 had no usable image: skipped 6 of 6 images: 6 not an image (first: "
    )
    assert "\n" not in err
    assert not (tmp_path / "run" / "checkpoints").exists() or not any((tmp_path / "run" / "checkpoints").iterdir())


def test_a_file_list_of_missing_files_stops(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    listing = tmp_path / "train.txt"
    listing.write_text("gone_1.jpg\ngone_2.jpg\n")
    assert cli(["pretrain", *tiny_overrides(tmp_path / "run", listing, {"batch_size": 2})]) == 1
    assert "epoch 1 had no usable image: skipped 2 of 2 images: 2 missing" in capsys.readouterr().err


def test_too_many_skipped_images_stop_the_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = write_jpegs(tmp_path / "data", 4)
    for i in range(6):
        (data / f"zero_{i}.jpg").write_bytes(b"")
    assert cli(["pretrain", *tiny_overrides(tmp_path / "a", data, {"batch_size": 2})]) == 1  # 6 of 10 > 0.5
    err = capsys.readouterr().err
    assert "epoch 1 skipped 60% of its images, more than data.max_skip_fraction=0.5: skipped 6 of 10 images" in err
    extra = {"batch_size": 2, "data.max_skip_fraction": 0.7, "schedule.epochs": 1}
    assert cli(["pretrain", *tiny_overrides(tmp_path / "b", data, extra)]) == 0
    (epoch,) = read_metrics(tmp_path / "b" / "metrics.jsonl", "epoch")
    assert epoch["data"]["seen"] == 10 and epoch["data"]["reasons"] == {"empty": 6}


def _shard(path: Path, first: int, n: int, cut_after: int | None = None) -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for i in range(first, first + n):
            data = encode(noisy_rgb(40, 36, seed=i), "JPEG", quality=90)
            info = tarfile.TarInfo(f"{i:06d}.jpg")
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    raw = buf.getvalue()
    if cut_after is not None:
        with tarfile.open(fileobj=io.BytesIO(raw)) as tf:
            raw = raw[: tf.getmembers()[cut_after].offset_data + 5]
    path.write_bytes(raw)


@pytest.mark.skipif(pytest.importorskip("webdataset") is None, reason="optional extra")
def test_a_truncated_shard_ends_the_epoch_cleanly_and_is_reported(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for s in range(3):
        _shard(tmp_path / f"s-{s}.tar", 8 * s, 8, cut_after=2 if s == 1 else None)  # shard 1 keeps 2 of 8
    path = str(tmp_path / "s-{0..2}.tar")
    extra = {"data.num_samples": 24, "batch_size": 2, "schedule.epochs": 1, "schedule.warmup_epochs": 0}
    assert cli(["pretrain", *tiny_overrides(tmp_path / "run", path, extra)]) == 0
    out = capsys.readouterr().out
    # 8 + 2 + 8 samples and one damaged-shard marker = 19 items: 9 batches of 2, one item dropped with the tail
    assert "WARNING: epoch 1/1 ended after 9 of 12 batches: the shards held fewer samples than data.num_samples" in out
    (epoch,) = read_metrics(tmp_path / "run" / "metrics.jsonl", "epoch")
    data = epoch["data"]
    assert data["damaged_shards"] == 1 and data["skipped"] == 0 and data["expected"] == 24
    (shard, reason, detail), *_ = data["shard_examples"]
    assert shard == str(tmp_path / "s-1.tar") and reason == "damaged shard"
    assert detail.startswith("unreadable after 2 samples (ReadError: ")
    assert data["seen"] in (17, 18)  # the marker or the last image fell into the dropped tail
    assert f"1 damaged shard ({shard}: unreadable after 2 samples" in out
    assert f"used {data['seen']} of the 24 samples expected" in out


def test_data_values_are_checked_when_the_config_is_read(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad_values = {
        "data.max_image_pixels=-1": "data.max_image_pixels must be >= 1 or null (no limit), got -1",
        "data.max_skip_fraction=1.5": "data.max_skip_fraction must be in [0, 1], got 1.5",
        "data.num_samples=0": "data.num_samples must be >= 1 or null, got 0",
        "data.num_workers=-2": "data.num_workers must be >= 0 or null",
        "data.ratio=[2.0,1.0]": "data.ratio must satisfy 0 < min <= max",
        "data.path=null": "data.path is not set: pass data.path=PATH",
        "data.path=pipe:touch x; cat y.tar": "set data.allow_shell_pipes=true to allow it",
        "data.path=https://example.com/a-{0..9}.tar": "set data.allow_shell_pipes=true to allow it",
    }
    for override, message in bad_values.items():
        with pytest.raises(ConfigError) as err:
            check_pretrain(load_config(PretrainConfig, overrides=["model_name=milan_test_tiny", override]))
        assert message in str(err.value), override
    check_pretrain(load_config(PretrainConfig, overrides=["data.path=pipe:cat a.tar", "data.allow_shell_pipes=true"]))
    assert cli(["pretrain", "data.max_image_pixels=-1", f"out_dir={tmp_path / 'x'}"]) == 2
    assert "data.max_image_pixels must be >= 1" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_the_paper_presets_leave_the_data_to_the_user(capsys: pytest.CaptureFixture[str]) -> None:
    preset = REPO / "configs/pretrain/milan_vit_base_patch16_in1k_400e.yaml"
    cfg = load_config(PretrainConfig, preset)
    assert cfg.data.path is None and cfg.data.draft is False and cfg.data.num_workers == 16
    assert cli(["pretrain", "--config", str(preset)]) == 2
    assert capsys.readouterr().err.strip() == (
        "milan pretrain: error: data.path is not set: pass data.path=PATH (a folder of images, a .txt list "
        "of image paths, or tar shards)"
    )
    for preset in sorted((REPO / "configs").rglob("*.yaml")):
        text = preset.read_text()
        assert "/work/" not in text and "/shared/" not in text, preset  # no machine-specific paths


def test_draft_and_the_start_line_reach_the_run(
    tmp_path: Path, image_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    seen: dict[str, Any] = {}

    def spy(real: Any) -> Any:
        def call(*args: Any, **kwargs: Any) -> Any:
            seen.update(kwargs)
            return real(*args, **kwargs)

        return call

    for name in ("pretrain_transform", "build_dataset"):  # the view (draft) and the source (shell pipes)
        monkeypatch.setattr(pretrain_module, name, spy(getattr(pretrain_module, name)))
    (image_dir.parent / "extra").mkdir(exist_ok=True)
    extra = {"data.draft": "true", "schedule.max_steps": 1}
    assert cli(["pretrain", *tiny_overrides(tmp_path / "run", image_dir, extra)]) == 0
    assert seen["draft"] is True and seen["allow_shell_pipes"] is False
    assert f"found 16 images in {image_dir}; 4 steps per epoch" in capsys.readouterr().out
    assert PretrainConfig().data.draft is False and PretrainConfig().data.num_workers is None
