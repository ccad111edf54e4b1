"""Weighted k-nearest-neighbour classification on frozen features (the DINO / InstDisc protocol).

For each query: cosine similarities to every train feature (both L2-normalised), the top ``k`` neighbours,
each voting for its class with weight ``exp(similarity / T)``; the class scores are the summed votes.
Queries are processed in chunks, and the train set can be split into chunks whose per-chunk top-k are merged,
so memory stays at ``O(query_chunk x train_chunk)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def knn_neighbours(
    train_features: torch.Tensor,
    query_features: torch.Tensor,
    k: int,
    *,
    query_chunk: int = 256,
    train_chunk: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` (capped at N) most cosine-similar of (N, D) train features for each of (M, D) queries.

    Both are normalised here; ``train_chunk=None`` compares with every train feature at once, else per-chunk top-k
    lists are merged.

    Returns:
        ``(similarities (M, k) float32, indices (M, k) int64)``, most similar first.
    """
    if train_features.ndim != 2 or query_features.ndim != 2 or train_features.shape[1] != query_features.shape[1]:
        raise ValueError(
            f"knn: expected (N, D) train and (M, D) query features, got {tuple(train_features.shape)} and "
            f"{tuple(query_features.shape)}"
        )
    n = train_features.shape[0]
    k = min(k, n)
    train = F.normalize(train_features.float(), dim=1)  # (N, D)
    train_chunk = train_chunk or n
    sims, ids = [], []
    for start in range(0, query_features.shape[0], query_chunk):
        query = F.normalize(query_features[start : start + query_chunk].float(), dim=1)  # (b, D)
        best_sim = query.new_full((query.shape[0], 0), float("-inf"))
        best_idx = torch.zeros((query.shape[0], 0), dtype=torch.long, device=query.device)
        for t0 in range(0, n, train_chunk):
            sim = query @ train[t0 : t0 + train_chunk].T  # (b, n_chunk)
            s, i = sim.topk(min(k, sim.shape[1]), dim=1)
            # merge with the running top-k (topk returns them sorted, most similar first)
            best_sim, pick = torch.cat([best_sim, s], 1).topk(min(k, best_sim.shape[1] + s.shape[1]), dim=1)
            best_idx = torch.gather(torch.cat([best_idx, i + t0], 1), 1, pick)
        sims.append(best_sim)
        ids.append(best_idx)
    if not sims:
        return train.new_zeros(0, k), torch.zeros(0, k, dtype=torch.long, device=train.device)
    return torch.cat(sims), torch.cat(ids)


def knn_vote(
    similarities: torch.Tensor, neighbour_labels: torch.Tensor, num_classes: int, temperature: float = 0.07
) -> torch.Tensor:
    """(M, k) similarities and int labels of the neighbours -> (M, num_classes) summed ``exp(similarity / T)`` votes."""
    weights = (similarities.float() / temperature).exp()  # (M, k)
    scores = weights.new_zeros(weights.shape[0], num_classes)
    return scores.scatter_add_(1, neighbour_labels.long(), weights)  # (M, C)


def knn_scores(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    query_features: torch.Tensor,
    num_classes: int,
    *,
    k: int = 20,
    temperature: float = 0.07,
    query_chunk: int = 256,
    train_chunk: int | None = None,
) -> torch.Tensor:
    """Class scores of weighted k-NN (:func:`knn_neighbours` then :func:`knn_vote`).

    (N, D) train features with (N,) int labels in ``[0, num_classes)``, (M, D) queries -> (M, num_classes) summed
    vote weights (float32); ``argmax`` is the prediction.
    """
    if train_labels.shape != train_features.shape[:1]:
        raise ValueError(f"knn: {train_labels.shape[0]} labels for {train_features.shape[0]} train features")
    sims, idx = knn_neighbours(train_features, query_features, k, query_chunk=query_chunk, train_chunk=train_chunk)
    return knn_vote(sims, train_labels.long().to(idx.device)[idx], num_classes, temperature)
