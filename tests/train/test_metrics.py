"""Top-k accuracy against a naive per-sample computation."""

import pytest
import torch

from milan.train.evaluation import TopKAccuracy


def _naive(logits, targets, k):
    hits = 0
    for row, t in zip(logits.tolist(), targets.tolist(), strict=True):
        order = sorted(range(len(row)), key=lambda c: -row[c])
        hits += int(t in order[:k])
    return hits


def test_topk_matches_naive_over_batches():
    g = torch.Generator().manual_seed(0)
    meter = TopKAccuracy((1, 3, 5))
    all_logits, all_targets = [], []
    for b in (7, 1, 12, 997):  # 997: counts recovered exactly from timm's percentages
        logits = torch.randn(b, 10, generator=g)
        targets = torch.randint(0, 10, (b,), generator=g)
        meter.update(logits, targets)
        all_logits.append(logits)
        all_targets.append(targets)
    logits, targets = torch.cat(all_logits), torch.cat(all_targets)
    for i, k in enumerate((1, 3, 5)):
        assert int(meter.correct[i]) == _naive(logits, targets, k)
    assert meter.count == 1017


def test_k_beyond_classes_and_counts_roundtrip():
    logits = torch.tensor([[0.1, 0.9, 0.0], [0.5, 0.2, 0.3]])
    targets = torch.tensor([1, 2])
    m = TopKAccuracy((1, 2, 5))
    m.update(logits, targets)
    assert m.correct.tolist() == [1, 2, 2]
    other = TopKAccuracy((1, 2, 5))
    other.load_counts(m.counts() * 2)  # as after an all-reduce over two identical ranks
    assert other.count == 4 and other.compute() == {"top1": 50.0, "top2": 100.0, "top5": 100.0}
    with pytest.raises(ValueError, match="targets"):
        m.update(logits, torch.tensor([1]))
