"""build_loader: seeding across workers/ranks, options; SkipReport aggregation; SyntheticImages."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from milan.data import (
    BadSample,
    Batch,
    SkipReport,
    SyntheticImages,
    UnlabelledImages,
    build_loader,
    collate_images,
    pretrain_transform,
)

from .conftest import encode, noisy_rgb, unpack


@pytest.fixture(scope="module")
def same_image_dataset(tmp_path_factory: pytest.TempPathFactory) -> UnlabelledImages:
    """Eight copies of one image: any difference between items comes from the augmentation randomness."""
    path = tmp_path_factory.mktemp("seed") / "img.jpg"
    path.write_bytes(encode(noisy_rgb(96, 72), "JPEG", quality=90))
    return UnlabelledImages([path] * 8, pretrain_transform(16))


def _views(dataset: UnlabelledImages, seed: int, rank: int | None = None) -> torch.Tensor:
    loader = build_loader(dataset, batch_size=1, num_workers=2, persistent_workers=False, seed=seed, rank=rank)
    return torch.cat([batch.images for batch in loader])  # (8, 3, 16, 16), item i from worker i % 2


def test_worker_augmentations_are_seeded_by_seed_and_rank(same_image_dataset: UnlabelledImages) -> None:
    first = _views(same_image_dataset, seed=3)
    assert torch.equal(first, _views(same_image_dataset, seed=3))  # reproducible
    assert not torch.equal(first, _views(same_image_dataset, seed=4))  # the seed matters
    assert not torch.equal(first, _views(same_image_dataset, seed=3, rank=1))  # ranks differ
    assert not torch.equal(first[0], first[1])  # the two workers' first items differ: per-worker seeds
    assert len({tuple(v.flatten()[:20].tolist()) for v in first}) == 8  # and every item is a new view


def test_shuffle_order_follows_the_seed() -> None:
    dataset = SyntheticImages(32, 4, num_classes=32)
    order = [build_loader(dataset, 32, shuffle=True, seed=s).__iter__().__next__().labels.tolist() for s in (0, 0, 1)]
    assert order[0] == order[1] != order[2] and sorted(order[0]) == list(range(32))


def test_loader_options() -> None:
    dataset = SyntheticImages(10, 4)
    loader = build_loader(dataset, 4, num_workers=1, drop_last=True)
    assert loader.persistent_workers and loader.pin_memory == torch.cuda.is_available()
    assert [len(b) for b in loader] == [4, 4]
    sampler = torch.utils.data.SequentialSampler(range(3))
    assert [b.labels.tolist() for b in build_loader(dataset, 2, shuffle=True, sampler=sampler)] == [[0, 1], [2]]
    with pytest.raises(ValueError, match="num_workers"):
        build_loader(dataset, 4, num_workers=-1)


def test_custom_collate_and_no_generator() -> None:
    dataset = SyntheticImages(10, 4)
    labels = build_loader(dataset, 4, collate_fn=lambda items: [label for _, label in items])
    assert list(labels) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]  # the given collate, not collate_images
    assert build_loader(dataset, 4).generator is not None and build_loader(dataset, 4, seed=None).generator is None
    orders = []
    for global_seed in (0, 0, 1):  # seed=None: the order comes from the global torch RNG
        torch.manual_seed(global_seed)
        orders.append(next(iter(build_loader(dataset, 10, shuffle=True, seed=None))).labels.tolist())
    assert orders[0] == orders[1] != orders[2]


def test_collate_and_batch_helpers() -> None:
    good = (torch.ones(3, 2, 2), 7)
    bad = BadSample("x.jpg", "corrupt", "boom")
    batch = collate_images([good, bad, good])
    assert batch.images.shape == (2, 3, 2, 2) and batch.labels.tolist() == [7, 7] and batch.skipped == (bad,)
    moved = batch.to(torch.device("cpu"))
    assert isinstance(moved, Batch) and torch.equal(moved.images, batch.images) and moved.skipped == (bad,)
    empty = collate_images([bad])
    assert empty.empty and len(empty) == 0 and empty.labels.dtype == torch.long and empty.images.shape == (0, 3, 0, 0)


def test_skip_report_counts_merge_and_dict() -> None:
    epoch = SkipReport(max_examples=2)
    epoch.add([BadSample("a", "empty", "0 bytes"), BadSample("b", "empty", "0 bytes")], good=6)
    epoch.add([BadSample("c", "too large", "big")])
    assert (epoch.seen, epoch.skipped) == (9, 3)
    assert epoch.summary() == "skipped 3 of 9 images: 2 empty, 1 too large (first: a: empty, 0 bytes)"
    total = SkipReport()
    total.merge(epoch)
    total.merge(epoch)
    assert total.as_dict()["reasons"] == {"empty": 4, "too large": 2} and total.seen == 18
    assert len(total.examples) == 4  # two remembered per merged epoch, up to max_examples
    epoch.reset()
    assert epoch.summary() == "skipped 0 of 0 images"


def test_skip_report_all_reduce_single_process_group(tmp_path: Path) -> None:
    report = SkipReport()
    report.add([BadSample("a", "corrupt", "x")], good=4)
    report.all_reduce()  # no process group: unchanged
    assert report.seen == 5
    dist.init_process_group(
        "gloo",
        store=dist.FileStore(  # type: ignore[attr-defined]
            str(tmp_path / "store"), 1
        ),
        rank=0,
        world_size=1,
    )
    try:
        report.all_reduce()
    finally:
        dist.destroy_process_group()
    assert (report.seen, dict(report.counts)) == (5, {"corrupt": 1})


def test_synthetic_images() -> None:
    dataset = SyntheticImages(20, 8, num_classes=4, seed=1)
    image, label = unpack(dataset[5])
    assert image.shape == (3, 8, 8) and label == 1
    assert torch.equal(image, unpack(dataset[5])[0])
    assert not torch.equal(image, unpack(SyntheticImages(20, 8, num_classes=4, seed=2)[5])[0])
    means = torch.stack(
        [torch.stack([unpack(dataset[i])[0].mean((1, 2)) for i in range(k, 20, 4)]) for k in range(4)]
    )  # (class, image, channel)
    spread_within = means.std(dim=1).max()
    spread_between = means.mean(dim=1).std(dim=0).max()
    assert spread_between > 3 * spread_within  # labels are learnable from colour
    with pytest.raises(IndexError):
        dataset[20]
