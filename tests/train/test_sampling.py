from __future__ import annotations

import random

import pytest
import torch
from torch.utils.data import Dataset, DistributedSampler

from milan.data import BadSample, collate_images
from milan.data.sampling import EpochSampler, SeededSamples, keyed_collate, mix_seeds, seeded_loader
from milan.errors import ConfigError
from milan.masking import attention_masking, random_masking


class Sized(Dataset[int]):
    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> int:
        return i


@pytest.mark.parametrize(("n", "world"), [(10, 1), (10, 2), (11, 3), (7, 2)])
@pytest.mark.parametrize("drop_last", [True, False])
def test_order_matches_distributed_sampler(n: int, world: int, drop_last: bool) -> None:
    for epoch in (0, 3):
        for rank in range(world):
            ours = EpochSampler(n, seed=5, rank=rank, world_size=world, drop_last=drop_last)
            theirs = DistributedSampler(Sized(n), num_replicas=world, rank=rank, seed=5, drop_last=drop_last)
            ours.set_epoch(epoch)
            theirs.set_epoch(epoch)
            assert [i for _, i in ours] == list(theirs)
            assert len(ours) == len(theirs)


def test_ranks_split_the_single_process_order() -> None:
    single = EpochSampler(12, seed=1)
    single.set_epoch(2)
    order = [i for _, i in single]
    halves = []
    for rank in range(2):
        s = EpochSampler(12, seed=1, rank=rank, world_size=2)
        s.set_epoch(2)
        halves.append([i for _, i in s])
    # global batch k of 4 on one process == the two per-rank batches k of 2
    for k in range(3):
        assert sorted(order[4 * k : 4 * k + 4]) == sorted(halves[0][2 * k : 2 * k + 2] + halves[1][2 * k : 2 * k + 2])


def test_resume_position_skips_consumed_samples() -> None:
    s = EpochSampler(20, seed=0)
    s.set_epoch(4)
    full = list(s)
    s.set_epoch(4, start=6)
    assert list(s) == full[6:] and len(s) == 14
    assert all(key[0] == 4 for key in full)
    with pytest.raises(ValueError, match="empty"):
        EpochSampler(0)


class Augmented(Dataset[tuple[torch.Tensor, int]]):
    """Randomness from the global torch and random generators, like torchvision transforms."""

    def __len__(self) -> int:
        return 8

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return torch.rand(3) + random.random(), i


def test_per_sample_randomness_depends_only_on_the_key() -> None:
    ds = SeededSamples(Augmented(), seed=3, noise_len=5)
    a = ds[(1, 2)]
    torch.rand(10)  # disturbing the global generators changes nothing
    random.random()
    b = ds[(1, 2)]
    assert torch.equal(a.item[0], b.item[0]) and torch.equal(a.noise, b.noise)
    assert not torch.equal(ds[(2, 2)].item[0], a.item[0])  # another epoch: another crop
    assert not torch.equal(ds[(1, 3)].noise, a.noise)
    assert not torch.equal(SeededSamples(Augmented(), seed=4, noise_len=5)[(1, 2)].noise, a.noise)
    state = torch.get_rng_state()
    ds[(0, 0)]
    assert torch.equal(torch.get_rng_state(), state)  # the caller's generator is restored
    assert a.noise.shape == (5,) and ((a.noise >= 0) & (a.noise < 1)).all()
    assert len({mix_seeds(0, e, i, 0) for e in range(20) for i in range(200)}) == 4000


def test_keyed_collate_keeps_noise_aligned_with_good_images() -> None:
    ds = SeededSamples(Augmented(), seed=0, noise_len=4)
    items = [ds[(0, i)] for i in range(4)]
    items[1] = items[1]._replace(item=BadSample("x.jpg", "corrupt", "boom"))
    batch, noise = keyed_collate(collate_images)(items)
    assert len(batch) == 3 and len(batch.skipped) == 1
    assert torch.equal(noise, torch.stack([items[i].noise for i in (0, 2, 3)]))
    assert batch.labels.tolist() == [0, 2, 3]


def test_seeded_loader_yields_the_keyed_samples_in_sampler_order() -> None:
    cpu = torch.device("cpu")
    loader, sampler, batches = seeded_loader(Augmented(), batch_size=3, seed=5, noise_len=4, device=cpu, key="data.x")
    assert batches == 2 and loader.generator is None  # every sample seeds itself; the tail of 2 is dropped
    sampler.set_epoch(1)
    reference = EpochSampler(8, seed=5)
    reference.set_epoch(1)
    keys = list(reference)
    ds = SeededSamples(Augmented(), seed=5, noise_len=4)
    got = list(loader)
    assert len(got) == 2
    for b, (batch, noise) in enumerate(got):
        want, want_noise = keyed_collate(collate_images)([ds[k] for k in keys[3 * b : 3 * b + 3]])
        assert torch.equal(batch.images, want.images) and torch.equal(batch.labels, want.labels)
        assert torch.equal(noise, want_noise) and noise.shape == (3, 4)
    with pytest.raises(ConfigError, match=r"data\.x has 8 images: fewer than batch_size=9"):
        seeded_loader(Augmented(), batch_size=9, seed=0, device=cpu, key="data.x")


def test_noise_masking_draws_rowwise_and_follows_the_weights() -> None:
    g = torch.Generator().manual_seed(0)
    importance = torch.rand(6, 16, generator=g) + 0.01
    noise = torch.rand(6, 16, generator=g)
    whole = attention_masking(importance, 0.75, noise=noise)
    parts = [attention_masking(importance[i : i + 2], 0.75, noise=noise[i : i + 2]) for i in (0, 2, 4)]
    assert torch.equal(whole.ids_shuffle, torch.cat([p.ids_shuffle for p in parts]))  # per-sample, batch-independent
    assert torch.equal(torch.sort(whole.ids_shuffle, 1).values, torch.arange(16).expand(6, 16))  # permutations
    # Plackett-Luce: the first pick has probability w_i / sum(w), as torch.multinomial without replacement.
    w = torch.tensor([[8.0, 4.0, 2.0, 1.0, 1.0]])
    n = 40000
    u = torch.rand(n, 5, generator=g)
    first = attention_masking(w.expand(n, 5), 0.2, noise=u).ids_shuffle[:, 0]
    freq = torch.bincount(first, minlength=5).double() / n
    torch.testing.assert_close(freq, (w[0] / w.sum()).double(), atol=0.01, rtol=0)
    ref = torch.multinomial(w.expand(n, 5), 5, replacement=False, generator=g)[:, 1]
    ours = attention_masking(w.expand(n, 5), 0.2, noise=u).ids_shuffle[:, 1]
    torch.testing.assert_close(
        torch.bincount(ours, minlength=5).double() / n,
        torch.bincount(ref, minlength=5).double() / n,
        atol=0.015,
        rtol=0,
    )
    # random masking from noise is argsort(noise)
    r = random_masking(noise, 0.75)
    assert torch.equal(r.ids_shuffle, torch.argsort(noise, dim=1))
