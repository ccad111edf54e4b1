"""Segmentation evaluation over a loader, and BatchNorm across processes: one process against two gloo processes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

from milan import distributed as dist
from milan.data import SkipReport, eval_loader
from milan.data.segmentation import (
    EvalTransform,
    LabelError,
    LabelSpec,
    SegmentationDataset,
    collate_segmentation,
    find_pairs,
)
from milan.models.segmentation import SegmentationModel
from milan.models.vit import VisionTransformer
from milan.train.evaluation import segmentation_areas
from tests.segment.conftest import write_pairs

CPU = torch.device("cpu")


def tiny_model() -> SegmentationModel:
    torch.manual_seed(0)
    enc = VisionTransformer(img_size=32, patch_size=8, embed_dim=16, depth=1, num_heads=2)
    return SegmentationModel(enc, 3, crop_size=32, channels=8, aux_channels=0).eval()


def dataset(root: Path) -> SegmentationDataset:
    return SegmentationDataset(find_pairs(root / "images", root / "labels"), EvalTransform((48, 32)), LabelSpec(3, 255))


def areas_of(root: Path, **kw: object) -> tuple[torch.Tensor, int, SkipReport]:
    report = SkipReport()
    loader = eval_loader(dataset(root), 1, 0, CPU, collate_segmentation)
    areas, n = segmentation_areas(tiny_model(), loader, CPU, ignore_index=255, report=report, **kw)  # type: ignore[arg-type]
    return areas, n, report


@pytest.fixture(scope="module")
def pairs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """5 pairs of 40x30 images with labels 0..2 (some 255), the fourth label map of the wrong size."""
    root = tmp_path_factory.mktemp("pairs")
    stems = write_pairs(root / "images", root / "labels", 5, size=(40, 30), values=3)
    for stem in stems:
        label = np.array(Image.open(root / "labels" / f"{stem}.png"))
        label[:5] = 255
        Image.fromarray(label).save(root / "labels" / f"{stem}.png")
    Image.new("L", (20, 30)).save(root / "labels" / f"{stems[3]}.png")
    return root


def test_areas_count_every_labelled_pixel_at_the_label_maps_size(pairs: Path) -> None:
    areas, n, report = areas_of(pairs, mode="whole", crop=32, stride=21)
    assert n == 4 and report.counts == {"mismatched": 1} and areas.dtype == torch.long
    model, ds = tiny_model(), dataset(pairs)
    expected = np.zeros((4, 3), dtype=np.int64)
    for i in (0, 1, 2, 4):
        x, y = ds[i]  # type: ignore[misc]
        with torch.no_grad():  # logits at the resized scale, resized to the label map's 40x30, then arg-maxed
            logits = model.predict(x[None])
        pred = nn.functional.interpolate(logits, size=(30, 40), mode="bilinear").argmax(1)[0].numpy()
        truth = y.numpy()
        for c in range(3):  # pixel by pixel, class by class; 255 is left out
            p, t = (pred == c) & (truth != 255), truth == c
            expected[:, c] += [(p & t).sum(), (p | t).sum(), p.sum(), t.sum()]
    assert areas.tolist() == expected.tolist()
    assert areas[3].sum() == sum(int((ds[i][1] != 255).sum()) for i in (0, 1, 2, 4))  # type: ignore[index]


def test_a_bad_label_value_stops_the_evaluation_even_when_its_batch_is_empty(tmp_path: Path) -> None:
    stems = write_pairs(tmp_path / "images", tmp_path / "labels", 2, size=(40, 30), values=3)
    Image.fromarray(np.full((30, 40), 9, dtype=np.uint8)).save(tmp_path / "labels" / f"{stems[1]}.png")
    with pytest.raises(LabelError, match=rf"{stems[1]}\.png: label value 9"):
        areas_of(tmp_path, mode="slide", crop=32, stride=21)


def _worker(rank: int, store: str, pairs: str, out: str) -> None:
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        areas, n, report = areas_of(Path(pairs), mode="slide", crop=32, stride=21)  # this process's shard, summed
        report.all_reduce()
        x, weights = _bn_inputs()
        half = x[2 * rank : 2 * rank + 2].clone().requires_grad_()
        bn = dist.synchronise_batchnorm(nn.Sequential(_bn()), CPU)[0]
        (bn(half) * weights[2 * rank : 2 * rank + 2]).sum().backward()
        grads = torch.cat([bn.weight.grad, bn.bias.grad])  # type: ignore[list-item]
        torch.distributed.all_reduce(grads)  # the full batch's loss is the sum of both halves'
        torch.save({"areas": areas, "n": n, "skipped": report.skipped, "type": type(bn).__name__,
                    "input_grad": half.grad, "grads": grads, "running": torch.cat([bn.running_mean, bn.running_var])},
                   Path(out) / f"rank{rank}.pt")  # fmt: skip
    finally:
        torch.distributed.destroy_process_group()


def _bn_inputs() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(4, 3, 5, 6, generator=g) * 3 + 1, torch.randn(4, 3, 5, 6, generator=g)


def _bn() -> nn.BatchNorm2d:
    bn = nn.BatchNorm2d(3)
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([0.5, 1.0, 2.0]))
        bn.bias.copy_(torch.tensor([0.1, -0.2, 0.3]))
    return bn


@pytest.mark.ddp
def test_two_gloo_processes_evaluate_and_normalise_like_one(pairs: Path, tmp_path: Path) -> None:
    """Sharded areas sum to one process's; BatchNorm on two halves equals BatchNorm on the whole batch (outputs'
    gradients, parameter gradients, running statistics), where torch's SyncBatchNorm refuses CPUs."""
    torch.multiprocessing.spawn(_worker, args=(str(tmp_path / "store"), str(pairs), str(tmp_path)), nprocs=2)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    areas, n, report = areas_of(pairs, mode="slide", crop=32, stride=21)
    for r in ranks:
        assert torch.equal(r["areas"], areas) and r["n"] == n == 4 and r["skipped"] == report.skipped == 1
        assert r["type"] == "CrossProcessBatchNorm2d"
    x, weights = _bn_inputs()
    x.requires_grad_()
    bn = _bn()
    (bn(x) * weights).sum().backward()
    torch.testing.assert_close(torch.cat([r["input_grad"] for r in ranks]), x.grad)
    for r in ranks:
        torch.testing.assert_close(r["grads"], torch.cat([bn.weight.grad, bn.bias.grad]))  # type: ignore[list-item]
        torch.testing.assert_close(r["running"], torch.cat([bn.running_mean, bn.running_var]))  # type: ignore[list-item]
    model = nn.Sequential(_bn())
    assert dist.synchronise_batchnorm(model, CPU) is model and type(model[0]) is nn.BatchNorm2d  # one process: as is
