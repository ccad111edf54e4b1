"""Files that lie about their size: refused with one line naming the tensor or record, before anything big is
allocated, through every entry point that reads checkpoints; sharded-weights indexes that are broken or point outside
their folder."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from milan.checkpoint import (
    CheckpointError,
    load_classifier,
    read_checkpoint,
    safe_load,
    save_safetensors,
    teacher_from_config,
)
from milan.checkpoint.spec import EncoderArch
from milan.cli import main
from milan.jobs.classifier import load_pretrained_encoder
from milan.models.factory import TeacherConfig
from milan.train.config import EncoderSource
from tests.checkpoint.lying import ExpandedBuffer, encoder_state, rewrite_zip

ROOT = Path(__file__).resolve().parents[2]


def _entry_points(tmp_path: Path) -> dict[str, Callable[[Path], object]]:
    """Every way a user makes us read a checkpoint file: the CLI tools, the pretraining teacher, the evaluation jobs."""

    def cli(*args: str) -> Callable[[Path], object]:
        def run(path: Path) -> object:
            if main([*args[:1], str(path), *args[1:]]) != 0:
                raise CheckpointError("(see stderr)")
            return None

        return run

    return {
        "inspect": cli("inspect"),
        "export": cli("export", "--out", str(tmp_path / "out.safetensors")),
        "convert": cli("convert", str(tmp_path / "out.pth"), "--to", "milan"),
        "pretrain-teacher": lambda p: teacher_from_config(TeacherConfig(checkpoint=str(p))),
        "evaluate": load_classifier,
        "knn-linprobe-finetune": lambda p: load_pretrained_encoder(EncoderSource(pretrained=str(p))),
    }


ENTRY_POINTS = ["inspect", "export", "convert", "pretrain-teacher", "evaluate", "knn-linprobe-finetune"]


@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_every_entry_point_refuses_a_stride0_tensor_claiming_4_tb(
    tmp_path: Path, entry: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """A 200 KB file whose MLP weights claim 10^12 elements (stride-0 views of one element): today `milan inspect`
    tries to allocate 4 TB and prints a traceback."""
    path = tmp_path / "lying.pth"
    torch.save({"model": encoder_state(blow_up=15_625_000_000)}, path)  # 10^12 elements per fc1/fc2 weight
    assert path.stat().st_size < 300_000
    run = _entry_points(tmp_path)[entry]
    with pytest.raises(CheckpointError) as info:
        run(path)
    message = str(info.value) if entry not in ("inspect", "export", "convert") else capsys.readouterr().err.strip()
    assert "\n" not in message
    assert "'model.blocks.1.mlp.fc2.weight'" in message or "'model.blocks.0.mlp.fc1.weight'" in message, message
    assert "stride-0" in message and "refusing to expand it" in message
    assert not (tmp_path / "out.safetensors").exists() and not (tmp_path / "out.pth").exists()


@pytest.mark.parametrize("container", ["zip", "legacy", "torchscript"])
def test_stride0_views_are_refused_in_every_container(tmp_path: Path, container: str) -> None:
    path = tmp_path / "lying.pt"
    if container == "torchscript":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.jit is deprecated
            torch.jit.save(torch.jit.script(ExpandedBuffer()), str(path))
        name = "'big'"
    else:
        torch.save(
            {"big": torch.zeros(1).expand(10**6, 10**6)}, path, _use_new_zipfile_serialization=container == "zip"
        )
        name = "'big'"
    with pytest.raises(CheckpointError, match=f"tensor {name} claims shape \\(1000000, 1000000\\) \\(4000.0 GB\\)"):
        safe_load(path)


def test_storage_records_shorter_than_claimed_are_named(tmp_path: Path) -> None:
    """The pickle claims a storage of 65,536 floats; its record holds 4 bytes."""
    good = tmp_path / "good.pth"
    torch.save({"w": torch.zeros(256, 256)}, good)
    lying = rewrite_zip(good, tmp_path / "lying.pth", replace={"good/data/0": bytes(4)})
    with pytest.raises(
        CheckpointError, match=r"record 'good/data/0' holds 4 bytes but its tensor storage needs 262.1 KB"
    ):
        safe_load(lying)


def test_architecture_is_checked_before_it_is_built(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Block keys that imply a deep encoder, with one tiny tensor behind each: refused before the encoder is built
    (on the meta device), naming the missing keys; today the whole encoder is allocated first."""
    sd = encoder_state()
    for i in range(2, 40):
        sd[f"blocks.{i}.norm1.weight"] = torch.ones(1)
    torch.save({"model": sd}, tmp_path / "deep.pth")
    real_builds: list[int] = []
    build = EncoderArch.build

    def counting_build(self: EncoderArch, drop_path_rate: float = 0.0) -> Any:
        if torch.empty(0).device.type != "meta":
            real_builds.append(self.depth)
        return build(self, drop_path_rate)

    monkeypatch.setattr(EncoderArch, "build", counting_build)
    with pytest.raises(CheckpointError, match=r"missing \['blocks.10.attn.proj.bias'"):
        load_pretrained_encoder(EncoderSource(pretrained=str(tmp_path / "deep.pth")))
    assert real_builds == []


@pytest.mark.parametrize("kind", ["torch-zip", "torchscript"])
def test_a_compressed_record_that_would_inflate_beyond_its_tensor_is_refused(tmp_path: Path, kind: str) -> None:
    src = tmp_path / "good.pt"
    if kind == "torchscript":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), str(src))
    else:
        torch.save({"w": torch.zeros(2, 2), "b": torch.zeros(2)}, src)
    bomb = rewrite_zip(src, tmp_path / "bomb.pt", bombs={"good/data/0": 16})
    assert bomb.stat().st_size < 100_000
    with pytest.raises(CheckpointError, match=r"compressed zip record 'good/data/0' would inflate to 16.8 MB but its"):
        safe_load(bomb)


# A fresh process loads each lying file through the CLI or the Python API and reports how much its peak resident
# memory grew beyond what the imports took (ru_maxrss: a high-water mark, so no allocation can hide).
_MEASURE = """
import contextlib, io, json, resource, sys
import milan.jobs.export, milan.checkpoint.export, timm.models.vision_transformer
from milan.checkpoint import CheckpointError, safe_load
from milan.cli import main
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
results = []
for job in json.loads(sys.argv[1]):
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        if job[0] == "safe_load":
            try:
                safe_load(job[1]); rc = 0
            except CheckpointError as e:
                print(e, file=sys.stderr); rc = 1
        else:
            rc = main(job)
    results.append([rc, err.getvalue().strip().splitlines()[-1:] or [""]])
grew = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base
print(json.dumps({"results": results, "grew_mb": grew / 1024}))
"""


def test_lying_files_fail_fast_in_little_memory(tmp_path: Path) -> None:
    """Today: `milan export` of the stride-0 file materialises and writes ~1.1 GB (peak +1 GB); the deflated records
    inflate to 128 MiB (TorchScript: twice), and so does a TorchScript data.pkl whose header declares its true size
    over a stream that goes on for 64 MiB. Now each is refused or read with a bound: the peak grows by almost nothing.
    """
    stride0 = tmp_path / "stride0.pth"
    torch.save({"model": encoder_state(blow_up=1 << 20)}, stride0)  # 4 x 268 MB claimed
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), str(tmp_path / "good.pt"))
    torch.save({"w": torch.zeros(2, 2), "b": torch.zeros(2)}, tmp_path / "good.pth")
    ts_bomb = rewrite_zip(tmp_path / "good.pt", tmp_path / "ts_bomb.pt", bombs={"good/data/0": 128})
    pt_bomb = rewrite_zip(tmp_path / "good.pth", tmp_path / "pt_bomb.pth", bombs={"good/data/0": 128})
    # headers that declare the record's true size over a stream that inflates 64 MiB further: read with a bound
    records = {"good/data.pkl": 64, "good/data/0": 64}
    ts_liar = rewrite_zip(tmp_path / "good.pt", tmp_path / "ts_liar.pt", bombs=records, lie=True)
    pt_liar = rewrite_zip(tmp_path / "good.pth", tmp_path / "pt_liar.pth", bombs=records, lie=True)
    out = tmp_path / "export.safetensors"
    jobs = [
        ["export", str(stride0), "--out", str(out)],
        ["inspect", str(ts_bomb)],
        ["safe_load", str(pt_bomb)],
        ["safe_load", str(ts_liar)],
        ["safe_load", str(pt_liar)],
    ]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(
        [sys.executable, "-c", _MEASURE, json.dumps(jobs)], capture_output=True, text=True, timeout=300, env=env,
        cwd=ROOT, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    (export_rc, export_err), (ts_rc, ts_err), (pt_rc, pt_err), (tsl_rc, tsl_err), (ptl_rc, ptl_err) = report["results"]
    assert export_rc == 1 and "stride-0" in export_err[0] and not out.exists(), export_err
    assert ts_rc == 1 and "would inflate to 134.2 MB" in ts_err[0], ts_err
    assert pt_rc == 1 and "would inflate to 134.2 MB" in pt_err[0], pt_err
    assert tsl_rc == 0 and ptl_rc == 0, (tsl_err, ptl_err)  # read as declared: the extra stream is never inflated
    assert report["grew_mb"] < 48, report


# ----------------------------------------------------------------------------------------------------------------
# Sharded weights: model.safetensors.index.json


def _sharded_folder(folder: Path) -> dict[str, torch.Tensor]:
    sd = encoder_state()
    keys = sorted(sd)
    folder.mkdir()
    save_safetensors({k: sd[k] for k in keys[:5]}, folder / "model-00001-of-00002.safetensors")
    save_safetensors({k: sd[k] for k in keys[5:]}, folder / "model-00002-of-00002.safetensors")
    weight_map = {k: f"model-0000{1 if i < 5 else 2}-of-00002.safetensors" for i, k in enumerate(keys)}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return sd


def test_a_sharded_folder_loads(tmp_path: Path) -> None:
    sd = _sharded_folder(tmp_path / "vit")
    ck = read_checkpoint(tmp_path / "vit", num_heads=4)
    assert ck.kind == "encoder" and all(torch.equal(ck.state_dict[k], v) for k, v in sd.items())


@pytest.mark.parametrize("entry", ["inspect", "export", "pretrain-teacher", "evaluate", "knn-linprobe-finetune"])
def test_an_index_that_is_not_json_is_named(tmp_path: Path, entry: str, capsys: pytest.CaptureFixture[str]) -> None:
    """Today: a JSON traceback (pretrain, evaluate, linprobe, knn) or an error without the file's name (inspect)."""
    _sharded_folder(tmp_path / "vit")
    index = tmp_path / "vit" / "model.safetensors.index.json"
    index.write_text('{"weight_map": {"cls_token": "model-00001-of-00002.safetensors",')  # cut short
    with pytest.raises(CheckpointError) as info:
        _entry_points(tmp_path)[entry](tmp_path / "vit")
    message = str(info.value) if entry not in ("inspect", "export") else capsys.readouterr().err.strip()
    assert f"cannot parse the weights index {index}" in message and "\n" not in message, message


@pytest.mark.parametrize("shard", ["../outside.safetensors", "ABSOLUTE"])
def test_index_shards_must_stay_inside_the_folder(tmp_path: Path, shard: str) -> None:
    """Today the file outside the folder is read (here it even holds a valid encoder)."""
    _sharded_folder(tmp_path / "vit")
    save_safetensors(encoder_state(), tmp_path / "outside.safetensors")
    shard = str(tmp_path / "outside.safetensors") if shard == "ABSOLUTE" else shard
    index = tmp_path / "vit" / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {"cls_token": shard}}))
    with pytest.raises(CheckpointError, match=r"names the shard .*outside.safetensors'?, which is outside its folder"):
        read_checkpoint(tmp_path / "vit")
