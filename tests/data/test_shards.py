"""webdataset tar shards: labels, bad samples, worker splitting, brace patterns."""

from __future__ import annotations

import importlib.util
import io
import sys
import tarfile
from pathlib import Path

import pytest
from PIL import Image

from milan.data import ShardImages, SkipReport, build_dataset, build_loader, eval_transform, pretrain_transform
from milan.data.sources import is_shard_source
from milan.errors import ConfigError

from .conftest import encode

needs_webdataset = pytest.mark.skipif(importlib.util.find_spec("webdataset") is None, reason="optional extra")


def test_missing_webdataset_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "webdataset", None)  # makes `import webdataset` fail
    with pytest.raises(ConfigError, match=r"pip install 'milan-pretrain\[webdataset\]'"):
        build_dataset(str(tmp_path / "train-{000000..000001}.tar"), pretrain_transform(8))


def _write_shard(path: Path, samples: dict[str, dict[str, bytes]]) -> None:
    with tarfile.open(path, "w") as tf:
        for key, files in samples.items():
            for ext, data in files.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))


@pytest.fixture()
def shards(tmp_path: Path) -> Path:
    def jpg(value: int) -> bytes:
        return encode(Image.new("RGB", (20, 16), (value, value, value)), "JPEG", quality=95)

    _write_shard(
        tmp_path / "train-000000.tar",
        {f"{i:06d}": {"jpg": jpg(10 * i), "cls": str(i % 3).encode()} for i in range(4)},
    )
    second = {f"{i:06d}": {"png": encode(Image.new("L", (20, 16), 10 * i), "PNG"), "cls": b"1"} for i in range(4, 7)}
    second["000007"] = {"jpg": b"not a jpeg", "cls": b"2"}
    second["000008"] = {"txt": b"caption without an image"}
    _write_shard(tmp_path / "train-000001.tar", second)
    return tmp_path


@needs_webdataset
@pytest.mark.parametrize("num_workers", [0, 2])
def test_shards_yield_good_images_with_labels_and_report_bad_samples(shards: Path, num_workers: int) -> None:
    urls = str(shards / "train-{000000..000001}.tar")
    dataset = ShardImages(urls, eval_transform(8, crop_pct=1.0))
    report = SkipReport()
    labels, brightness = [], []
    for batch in build_loader(dataset, batch_size=3, num_workers=num_workers, persistent_workers=False):
        report.update(batch)
        labels += batch.labels.tolist()
        brightness += batch.images.mean(dim=(1, 2, 3)).tolist()
    assert sorted(labels) == sorted([0, 1, 2, 0, 1, 1, 1])
    assert len(set(round(b, 3) for b in brightness)) == 7  # seven distinct images
    assert report.seen == 9 and dict(report.counts) == {"not an image": 2}
    assert {Path(e.path.split(":")[0]).name for e in report.examples} == {"train-000001.tar"}


def _order(dataset: ShardImages) -> list[float]:
    return [round(b.images.mean().item(), 4) for b in build_loader(dataset, batch_size=1) if not b.empty]


@needs_webdataset
def test_shard_shuffling_is_seeded_and_changes_every_epoch(shards: Path) -> None:
    urls = [str(shards / "train-000000.tar"), str(shards / "train-000001.tar")]
    assert is_shard_source(urls) and is_shard_source("s3/x-{0..9}.tar") and not is_shard_source(str(shards))
    view = pretrain_transform(8, hflip=0.0, scale=(1.0, 1.0), ratio=(1.25, 1.25))
    dataset = build_dataset(urls, view, shuffle_buffer=1000, seed=0, num_samples=9)
    assert isinstance(dataset, ShardImages) and len(dataset) == 9
    epoch0 = _order(dataset)
    epoch1 = _order(dataset)
    same_seed = build_dataset(urls, view, shuffle_buffer=1000, seed=0)
    other_seed = build_dataset(urls, view, shuffle_buffer=1000, seed=5)
    assert isinstance(same_seed, ShardImages) and isinstance(other_seed, ShardImages)
    assert len(epoch0) == 7 and sorted(epoch0) == sorted(epoch1)
    assert epoch0 == _order(same_seed) and epoch0 != epoch1 and epoch0 != _order(other_seed)
    with pytest.raises(TypeError, match="num_samples"):
        len(same_seed)
    with pytest.raises(ValueError, match="iterable"):
        build_loader(same_seed, 2, sampler=range(2))
