"""Top-k accuracy against a naive per-sample computation."""

import pytest
import torch

from milan.train.metrics import TopKAccuracy, topk_correct


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
    for b in (7, 1, 12):
        logits = torch.randn(b, 10, generator=g)
        targets = torch.randint(0, 10, (b,), generator=g)
        meter.update(logits, targets)
        all_logits.append(logits)
        all_targets.append(targets)
    logits, targets = torch.cat(all_logits), torch.cat(all_targets)
    got = meter.compute()
    for k in (1, 3, 5):
        assert got[f"top{k}"] == pytest.approx(100 * _naive(logits, targets, k) / 20)
    assert meter.count == 20


def test_k_beyond_classes_and_counts_roundtrip():
    logits = torch.tensor([[0.1, 0.9, 0.0], [0.5, 0.2, 0.3]])
    targets = torch.tensor([1, 2])
    assert topk_correct(logits, targets, (1, 2, 5)).tolist() == [1, 2, 2]
    m = TopKAccuracy((1, 5))
    m.update(logits, targets)
    other = TopKAccuracy((1, 5))
    other.load_counts(m.counts() * 2)  # as after an all-reduce over two identical ranks
    assert other.count == 4 and other.compute() == {"top1": 50.0, "top5": 100.0}
    with pytest.raises(ValueError, match="targets"):
        topk_correct(logits, torch.tensor([1]))
