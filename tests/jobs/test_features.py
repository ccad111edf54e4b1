"""Feature extraction, the on-disk cache and its key, and the evaluation data helpers."""

from __future__ import annotations

import os

import pytest
import torch
from PIL import Image

import milan.data.sampling as sampling_module
from milan.data import BadSample, Batch, build_dataset, eval_loader, eval_transform, finetune_transform
from milan.data.transforms import posterize
from milan.errors import ConfigError
from milan.jobs.knn import FeatureCache, cache_key, dataset_fingerprint, extract_features


class _Folder:
    def __init__(self, samples):
        self.samples = samples


def test_extract_features_skips_empty_batches_and_reports():
    batches = [
        Batch(torch.ones(2, 3, 4, 4), torch.tensor([0, 1])),
        Batch(torch.empty(0), torch.empty(0, dtype=torch.long), skipped=(BadSample("x.jpg", "corrupt", "bad"),)),
        Batch(2 * torch.ones(1, 3, 4, 4), torch.tensor([2])),
    ]
    from milan.data import SkipReport

    report = SkipReport()
    f, y = extract_features(lambda x: x.mean(dim=(2, 3)), batches, torch.device("cpu"), report=report, progress=False)
    assert f.shape == (3, 3) and y.tolist() == [0, 1, 2] and f[2].tolist() == [2.0, 2.0, 2.0]
    assert report.skipped == 1 and report.seen == 4


def test_cache_roundtrip_rounding_and_corrupt_entry(tmp_path):
    cache = FeatureCache(tmp_path / "c", torch.float16)
    f, y = torch.randn(5, 3), torch.arange(5)
    assert cache.load("k") is None
    cache.save("k", f, y, meta={"split": "train"})
    got_f, got_y = cache.load("k")
    assert torch.equal(got_f, cache.round(f)) and torch.equal(got_y, y) and got_f.dtype == torch.float32
    cache.path("k").write_bytes(b"garbage")  # a damaged entry is a miss, not a crash
    assert cache.load("k") is None
    assert FeatureCache(None).load("k") is None and FeatureCache(None).path("k") is None


def test_cache_key_and_fingerprint_follow_their_inputs(tmp_path):
    a, b = tmp_path / "a.jpg", tmp_path / "b.jpg"
    for p in (a, b):
        Image.new("RGB", (4, 4)).save(p)
    ds = _Folder([(a, 0), (b, 1)])
    fp = dataset_fingerprint(ds)
    assert fp == dataset_fingerprint(_Folder([(a, 0), (b, 1)]))
    assert fp != dataset_fingerprint(_Folder([(a, 0), (b, 0)]))  # a label changed
    Image.new("RGB", (5, 5)).save(b)
    os.utime(b, ns=(1, 1))
    assert fp != dataset_fingerprint(ds)  # a file changed
    k = cache_key(weights="w", data=fp, transform="T")
    assert k == cache_key(transform="T", data=fp, weights="w")
    assert k != cache_key(weights="w", data=fp, transform="T2")


def test_eval_loader_shards_cover_each_index_once(monkeypatch):
    shards = []
    for r in range(3):
        monkeypatch.setattr(sampling_module.dist, "rank", lambda r=r: r)
        monkeypatch.setattr(sampling_module.dist, "world_size", lambda: 3)
        loader = eval_loader(list(range(10)), 2, 0, torch.device("cpu"))
        shards.append(list(loader.sampler))
        assert len(loader) == -(-len(shards[-1]) // 2)
    assert sorted(i for s in shards for i in s) == list(range(10))
    assert [len(s) for s in shards] == [4, 3, 3]


def test_posterize_zero_bits_is_black_not_an_error():
    img = Image.new("RGB", (3, 2), (200, 100, 50))
    assert posterize(img, 0).getextrema() == ((0, 0), (0, 0), (0, 0))
    assert posterize(img, 8) is img
    assert posterize(img, 1).getpixel((0, 0)) == (128, 0, 0)


def test_finetune_pipeline_survives_max_magnitude():
    # magnitude 10 everywhere: PosterizeIncreasing asks for 0 bits
    pipe = finetune_transform(32, auto_augment="rand-n15-m10-inc1")
    torch.manual_seed(0)
    for _ in range(10):
        out = pipe(Image.new("RGB", (40, 40), (120, 80, 40)))
        assert out.shape == (3, 32, 32)


def test_labelled_source_errors(tmp_path):
    view = eval_transform(8)
    with pytest.raises(ConfigError, match=r"data\.train='.*missing': not found \(an ImageFolder tree"):
        build_dataset(str(tmp_path / "missing"), view, key="data.train", labelled=True)
    with pytest.raises(ConfigError, match=r"data\.train is not set: pass data\.train=PATH"):
        build_dataset(None, view, key="data.train", labelled=True)
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ConfigError, match=r"data\.val='.*notes\.txt': not a folder or a \.tar/\.tar\.gz archive"):
        build_dataset(str(tmp_path / "notes.txt"), view, key="data.val", labelled=True)
