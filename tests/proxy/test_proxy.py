"""benchmarks/proxy: the arms' configs, the teacher's save/load round trip, the tensor cache and batched augmentation,
the evaluation oracles, the report, and the whole pipeline in its smoke mode on the shared data (skipped where that
data is absent)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from PIL import Image

from benchmarks.proxy import data, probe, report
from benchmarks.proxy.data import DEFAULT_DATA
from benchmarks.proxy.settings import ARMS, MODES, EvalBudget, model_config
from benchmarks.proxy.teacher import check_roundtrip, save_tower
from milan.checkpoint import load_teacher, model_from_config
from milan.data import build_dataset, eval_transform
from milan.models import clip_vision_tower
from milan.train.config import PretrainConfig, check_pretrain


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _teacher_file(tmp_path: Path) -> Path:
    t = MODES["smoke"].teacher
    tower = clip_vision_tower(img_size=32, patch_size=4, width=t.width, depth=t.depth, num_heads=t.num_heads,
                              out_dim=t.out_dim)  # fmt: skip
    path = save_tower(tower, tmp_path / "teacher.pt")
    check_roundtrip(tower, path)  # raises if the loaded teacher differs
    return path


def test_arms_differ_only_in_the_objective(tmp_path: Path) -> None:
    budget = MODES["smoke"]
    teacher = _teacher_file(tmp_path)
    configs = {arm.name: model_config(arm, budget, str(teacher)) for arm in ARMS if arm.pretrain}
    assert len(configs) == 4
    encoders = {json.dumps(vars(c.encoder), sort_keys=True) for c in configs.values()}
    assert len(encoders) == 1  # the same student everywhere
    objectives = {(c.teacher.kind, c.masking, c.decoder.kind, c.loss_on) for c in configs.values()}
    assert objectives == {
        ("clip", "attention", "prompting", "all"),  # (a) MILAN
        ("clip", "random", "prompting", "all"),  # (b)
        ("clip", "attention", "mae", "all"),  # (c)
        ("none", "random", "mae", "masked"),  # (d) pixel MAE
    }
    for name, cfg in configs.items():
        check_pretrain(PretrainConfig(model_name=None, model=cfg))
        model = model_from_config(cfg)  # loads the saved teacher through model.teacher.checkpoint
        assert model.encoder.grid_size == (8, 8), name
        assert (model.teacher is None) == (name == "pixel_mae")


@pytest.mark.parametrize("mode", sorted(MODES))
def test_every_mode_gives_valid_pretraining_jobs(mode: str, tmp_path: Path) -> None:
    from benchmarks.proxy.run import pretrain_config

    budget = MODES[mode]
    for arm in (a for a in ARMS if a.pretrain):
        cfg = pretrain_config(arm, budget, 0, tmp_path / "t.pt", tmp_path, tmp_path, "cpu")
        check_pretrain(cfg)  # raises ConfigError on an invalid budget (e.g. warm-up longer than the schedule)
        assert cfg.schedule.epochs == budget.student.epochs and cfg.batch_size == budget.student.batch_size


def test_saved_teacher_loads_as_users_load_teachers(tmp_path: Path) -> None:
    teacher = load_teacher(_teacher_file(tmp_path))
    out = teacher(torch.randn(2, 3, 32, 32))
    assert out.features.shape == (2, 65, MODES["smoke"].teacher.out_dim) and out.cls_attention.shape == (2, 64)


def test_knn_and_probe_on_separable_features() -> None:
    g = torch.Generator().manual_seed(0)
    centres = 5 * torch.randn(4, 16, generator=g)
    train_y = torch.arange(200) % 4
    test_y = torch.arange(80) % 4
    train = centres[train_y] + torch.randn(200, 16, generator=g)
    test = centres[test_y] + torch.randn(80, 16, generator=g)
    budget = EvalBudget(knn_k=5, probe_epochs=30, probe_batch_size=50, probe_lr=1e-2)
    assert probe.knn_top1(train, train_y, test, test_y, budget) == 100.0
    assert probe.linear_probe_top1(train, train_y, test, test_y, budget) == 100.0
    # and chance level on features that carry no label information
    noise = torch.randn(80, 16, generator=g)
    assert probe.knn_top1(train, train_y, noise, test_y, budget) < 60.0


def _image_tree(root: Path, sizes: dict[str, list[tuple[int, int]]]) -> Path:
    g = torch.Generator().manual_seed(0)
    for cls, shapes in sizes.items():
        (root / cls).mkdir(parents=True)
        for i, (w, h) in enumerate(shapes):
            pixels = torch.randint(0, 256, (h, w, 3), dtype=torch.uint8, generator=g).numpy()
            Image.fromarray(pixels).save(root / cls / f"{i:04d}.jpg", quality=90)
    return root


def test_tensor_cache_equals_the_eval_transform(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MILAN_CACHE", str(tmp_path / "cache"))
    root = _image_tree(tmp_path / "tree", {"a": [(32, 32), (64, 64)], "b": [(50, 40), (32, 32), (40, 64)]})
    images, labels = data.folder_tensors(root, 32)
    assert images.dtype == torch.uint8 and images.shape == (5, 3, 32, 32) and labels.tolist() == [0, 0, 1, 1, 1]
    reference = build_dataset(root, eval_transform(32, crop_pct=1.0), labelled=True)
    expected = torch.stack([reference[i][0] for i in range(len(reference))])  # type: ignore[index]
    torch.testing.assert_close(data.normalize(images), expected, rtol=0, atol=1e-6)
    cached = tmp_path / "cache" / "proxy" / "tensors" / "tree-32px.pt"
    assert cached.is_file()
    again, _ = data.folder_tensors(root, 32)  # read back from the cache
    assert torch.equal(again, images)
    Image.new("RGB", (32, 32), (255, 0, 0)).save(root / "b" / "0003.jpg")  # a changed folder is decoded again
    grown, grown_labels = data.folder_tensors(root, 32)
    assert grown.shape[0] == 6 and grown_labels.tolist() == [0, 0, 1, 1, 1, 1]
    assert (data.normalize(grown[5:]) - data.normalize(torch.tensor([255, 0, 0]).view(1, 3, 1, 1))).abs().max() < 0.1


def test_batched_random_resized_crop() -> None:
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (6, 3, 64, 64), dtype=torch.uint8, generator=g)

    def crops(hflip: float) -> torch.Tensor:
        g = torch.Generator().manual_seed(1)
        return data.random_resized_crop(images, 32, scale=(0.35, 1.0), hflip=hflip, generator=g)

    kept, flipped = crops(0.0), crops(1.0)
    assert kept.shape == (6, 3, 32, 32) and kept.dtype == torch.float32
    torch.testing.assert_close(flipped, kept.flip(-1))  # the same crops, mirrored
    assert not torch.allclose(kept[0], data.resize(images[:1], 32)[0], atol=0.1)  # a crop, not the whole image
    flat = torch.full((2, 3, 64, 64), 128, dtype=torch.uint8)  # any crop of a flat image is that flat image
    out = data.random_resized_crop(flat, 32, scale=(0.1, 0.5), generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(out, data.normalize(flat[:, :, :32, :32]))
    # the whole image, resized: a bicubic anti-aliased reduction equals the 2 x 2 mean of smooth images
    smooth = torch.linspace(0, 255, 64).round().to(torch.uint8).expand(1, 3, 64, 64).contiguous()
    whole = data.random_resized_crop(smooth, 32, scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip=0.0)
    torch.testing.assert_close(whole, data.normalize(smooth).view(1, 3, 32, 2, 32, 2).mean((3, 5)), atol=0.02, rtol=0)


def test_per_class_splits() -> None:
    labels = torch.tensor([0, 0, 0, 1, 1, 1, 1, 2])
    train, held = data.split_per_class(labels, 1)
    assert train.tolist() == [0, 1, 3, 4, 5, 7] and held.tolist() == [2, 6]  # a class too small to split: all train
    assert data.subset_per_class(labels, 2).tolist() == [0, 1, 3, 4, 7]
    assert data.subset_per_class(labels, None).tolist() == list(range(8))


def test_parallelism_defaults() -> None:
    from benchmarks.proxy.run import parallelism

    assert parallelism(torch.device("cuda"), 10, None, None) == (1, None)
    jobs, threads = parallelism(torch.device("cpu"), 10, None, None)
    assert jobs >= 1 and threads is not None and threads >= 1
    assert parallelism(torch.device("cpu"), 1, None, 1) == (1, 1)  # never more processes than tasks
    assert parallelism(torch.device("cpu"), 10, 3, 2) == (3, 2)


def _fake_runs() -> list[dict[str, object]]:
    accs = {"milan": 50, "random_mask": 48, "mae_decoder": 47, "pixel_mae": 30, "random_init": 31, "teacher": 40}
    return [
        {"arm": a, "seed": s, "knn_top1": v + s, "linprobe_top1": v + 2 * s, "pretrain_wall_s": 10.0, "final_loss": 0.5}
        for a, v in accs.items()
        for s in (0, 1)
    ]


def test_summary_and_ordering() -> None:
    summary = report.summarize(_fake_runs())
    assert summary["milan"]["knn_top1_mean"] == pytest.approx(50.5)
    assert summary["milan"]["knn_top1_std"] == pytest.approx(0.7071, abs=1e-4)
    assert summary["milan"]["linprobe_top1_std"] == pytest.approx(1.4142, abs=1e-4)
    checks = {(c["metric"], c["expected"]): c for c in report.ordering(summary)}
    milan_vs_b = checks[("k-NN top-1", "(a) MILAN > (b) random mask")]
    assert milan_vs_b["holds"] and milan_vs_b["resolved"]  # +2.0 > 0.71 + 0.71
    assert not checks[("k-NN top-1", "(d) pixel MAE > (e) random init")]["holds"]
    assert not checks[("k-NN top-1", "(b) random mask > (d) pixel MAE")]["single_seed"]


def test_markdown_and_chart(tmp_path: Path) -> None:
    runs = _fake_runs()
    summary = report.summarize(runs)
    results = {
        "mode": "quick", "date": "2026-01-01", "git_commit": "abc", "budget": MODES["quick"].to_dict(),
        "models": {"student": {"embed_dim": 128, "depth": 4}},
        "data": {"pretrain_images": 20000, "test_images": 5000, "probe_train_images": 10000},
        "teacher": {"val_top1": 12.0, "num_classes": 202, "wall_time": 60.0, "train_images": 1000},
        "hardware": {"device": "CPU", "cpu": "x", "cpu_count": 2, "threads": 2},
        "versions": {"torch": "2"}, "total_wall_s": 600.0, "total_cpu_s": 1000.0,
        "runs": runs, "summary": summary, "ordering": report.ordering(summary),
    }  # fmt: skip
    md = report.markdown(results)
    assert "| (a) MILAN: teacher features, attention masking, prompting decoder | 50.5 ± 0.7 | 51.0 ± 1.4 |" in md
    assert "NOT CLIP" in md and "does NOT hold" in md
    png = report.bar_chart(results, tmp_path / "chart.png")
    assert Image.open(png).size == (1100, 506)


@pytest.mark.skipif(not (DEFAULT_DATA / "cifar10_jpg" / "test.tar.gz").is_file(), reason="shared data not present")
def test_smoke_run_end_to_end(tmp_path: Path) -> None:
    from benchmarks.proxy.run import main

    out = tmp_path / "out"
    assert (
        main(["--smoke", "--out", str(out), "--device", "cpu", "--threads", "1", "--publish", str(tmp_path / "pub")])
        == 0
    )
    results = json.loads((out / "results.json").read_text())
    assert [r["arm"] for r in results["runs"]] == [a.name for a in ARMS]
    for r in results["runs"]:
        assert 0.0 <= r["knn_top1"] <= 100.0 and 0.0 <= r["linprobe_top1"] <= 100.0
    assert all(r["pretrain_images"] > 0 for r in results["runs"] if "pretrain_images" in r)
    assert "NOT CLIP" in (out / "results.md").read_text()
    assert sorted(p.name for p in (tmp_path / "pub").iterdir()) == ["results.json", "results.md", "results.png"]
    assert load_teacher(out / "teacher" / "teacher.pt").out_dim == MODES["smoke"].teacher.out_dim
