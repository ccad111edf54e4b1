"""Weighted k-NN against a per-query loop written plainly."""

import math

import pytest
import torch

from milan.knn import knn_scores


def _naive_knn(train, labels, queries, num_classes, k, t):
    out = torch.zeros(len(queries), num_classes, dtype=torch.float64)
    for qi, q in enumerate(queries.double()):
        sims = []
        for ti, x in enumerate(train.double()):
            sims.append((float(q @ x / (q.norm() * x.norm())), ti))
        sims.sort(key=lambda s: -s[0])
        for s, ti in sims[:k]:
            out[qi, int(labels[ti])] += math.exp(s / t)
    return out


@pytest.mark.parametrize(("query_chunk", "train_chunk"), [(256, None), (3, 7), (1, 1)])
def test_knn_matches_naive(query_chunk, train_chunk):
    g = torch.Generator().manual_seed(0)
    train = torch.randn(40, 6, generator=g)
    labels = torch.randint(0, 4, (40,), generator=g)
    queries = torch.randn(11, 6, generator=g)
    got = knn_scores(train, labels, queries, 4, k=5, temperature=0.07, query_chunk=query_chunk, train_chunk=train_chunk)
    exp = _naive_knn(train, labels, queries, 4, k=5, t=0.07)
    torch.testing.assert_close(got.double(), exp, rtol=1e-4, atol=0)
    assert torch.equal(got.argmax(1), exp.argmax(1))


def test_knn_k_larger_than_train_and_scale_invariance():
    g = torch.Generator().manual_seed(1)
    train = torch.randn(6, 3, generator=g)
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    queries = torch.randn(4, 3, generator=g)
    a = knn_scores(train, labels, queries, 3, k=20, temperature=0.5)
    b = knn_scores(train * 10, labels, queries * 0.1, 3, k=20, temperature=0.5)  # cosine: scale-free
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(a.double(), _naive_knn(train, labels, queries, 3, k=6, t=0.5), rtol=1e-5, atol=0)


def test_knn_rejects_bad_shapes():
    with pytest.raises(ValueError, match="labels"):
        knn_scores(torch.randn(5, 3), torch.zeros(4, dtype=torch.long), torch.randn(2, 3), 2)
    with pytest.raises(ValueError, match=r"\(N, D\)"):
        knn_scores(torch.randn(5, 3), torch.zeros(5, dtype=torch.long), torch.randn(2, 4), 2)
