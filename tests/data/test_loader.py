"""build_loader: seeding across workers/ranks, options; SkipReport aggregation."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from milan.data import (
    BadSample,
    ImageDataset,
    SkipReport,
    build_dataset,
    build_loader,
    collate_images,
    pretrain_transform,
)

from .conftest import encode, noisy_rgb


@pytest.fixture(scope="module")
def same_image_dataset(tmp_path_factory: pytest.TempPathFactory) -> ImageDataset:
    """Eight copies of one image: any difference between items comes from the augmentation randomness."""
    path = tmp_path_factory.mktemp("seed") / "img.jpg"
    path.write_bytes(encode(noisy_rgb(96, 72), "JPEG", quality=90))
    return build_dataset([path] * 8, pretrain_transform(16))


def _views(dataset: ImageDataset, seed: int | None, rank: int | None = None) -> torch.Tensor:
    loader = build_loader(dataset, batch_size=1, num_workers=2, persistent_workers=False, seed=seed, rank=rank)
    return torch.cat([batch.images for batch in loader])  # (8, 3, 16, 16), item i from worker i % 2


def _tiny(n: int) -> list[tuple[torch.Tensor, int]]:
    return [(torch.full((3, 4, 4), float(i)), i) for i in range(n)]


def test_worker_augmentations_are_seeded_by_seed_and_rank(same_image_dataset: ImageDataset) -> None:
    first = _views(same_image_dataset, seed=3)
    assert torch.equal(first, _views(same_image_dataset, seed=3))  # reproducible
    assert not torch.equal(first, _views(same_image_dataset, seed=4))  # the seed matters
    assert not torch.equal(first, _views(same_image_dataset, seed=3, rank=1))  # ranks differ
    assert not torch.equal(first[0], first[1])  # the two workers' first items differ: per-worker seeds
    assert len({tuple(v.flatten()[:20].tolist()) for v in first}) == 8  # and every item is a new view


def test_loader_options() -> None:
    dataset = _tiny(10)
    loader = build_loader(dataset, 4, num_workers=1, drop_last=True)
    assert loader.persistent_workers and loader.pin_memory == torch.cuda.is_available()
    assert [len(b) for b in loader] == [4, 4]
    sampler = torch.utils.data.SequentialSampler(range(3))
    assert [b.labels.tolist() for b in build_loader(dataset, 2, sampler=sampler)] == [[0, 1], [2]]
    with pytest.raises(ValueError, match="num_workers"):
        build_loader(dataset, 4, num_workers=-1)


def test_custom_collate_and_no_generator(same_image_dataset: ImageDataset) -> None:
    dataset = _tiny(10)
    labels = build_loader(dataset, 4, collate_fn=lambda items: [label for _, label in items])
    assert list(labels) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]  # the given collate, not collate_images
    assert build_loader(same_image_dataset, 4).generator is not None
    assert build_loader(same_image_dataset, 4, seed=None).generator is None
    views = []
    for global_seed in (0, 0, 1):  # seed=None: the workers' seeds come from the global torch RNG
        torch.manual_seed(global_seed)
        views.append(_views(same_image_dataset, seed=None))
    assert torch.equal(views[0], views[1]) and not torch.equal(views[0], views[2])


def test_collate_and_batch_helpers() -> None:
    good = (torch.ones(3, 2, 2), 7)
    bad = BadSample("x.jpg", "corrupt", "boom")
    batch = collate_images([good, bad, good])
    assert batch.images.shape == (2, 3, 2, 2) and batch.labels.tolist() == [7, 7] and batch.skipped == (bad,)
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
