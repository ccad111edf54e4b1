"""Weighted k-nearest-neighbour classification on frozen features (the DINO / InstDisc protocol).

For each query: cosine similarities to every train feature (both L2-normalised), the top ``k`` neighbours,
each voting for its class with weight ``exp(similarity / T)``; the class scores are the summed votes.
Queries are processed in chunks, and the train set can be split into chunks whose per-chunk top-k are merged,
so memory stays at ``O(query_chunk x train_chunk)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _check(train_features: torch.Tensor, train_labels: torch.Tensor | None, query_features: torch.Tensor) -> None:
    if train_features.ndim != 2 or query_features.ndim != 2 or train_features.shape[1] != query_features.shape[1]:
        raise ValueError(
            f"knn: expected (N, D) train and (M, D) query features, got {tuple(train_features.shape)} and "
            f"{tuple(query_features.shape)}"
        )
    if train_labels is not None and train_labels.shape != train_features.shape[:1]:
        raise ValueError(f"knn: {train_labels.shape[0]} labels for {train_features.shape[0]} train features")


def knn_neighbours(
    train_features: torch.Tensor,
    query_features: torch.Tensor,
    k: int,
    *,
    query_chunk: int = 256,
    train_chunk: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` most cosine-similar train features of every query, most similar first.

    Args:
        train_features: (N, D) (normalised here).
        query_features: (M, D) (normalised here).
        k: Neighbours per query (capped at N).
        query_chunk: Queries per chunk.
        train_chunk: Train features per chunk (``None``: all at once); per-chunk top-k lists are merged.

    Returns:
        ``(similarities (M, k) float32, indices (M, k) int64)``.
    """
    _check(train_features, None, query_features)
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
    """Class scores from neighbours: each votes for its class with weight ``exp(similarity / temperature)``.

    Args:
        similarities: (M, k) cosine similarities.
        neighbour_labels: (M, k) int labels of the neighbours.
        num_classes: Number of classes.
        temperature: Vote temperature.

    Returns:
        (M, num_classes) summed weights.
    """
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

    Args:
        train_features: (N, D) features of the labelled set.
        train_labels: (N,) int labels in ``[0, num_classes)``.
        query_features: (M, D) features to classify.
        num_classes: Number of classes.
        k: Number of neighbours (capped at N).
        temperature: Vote temperature.
        query_chunk: Queries per chunk.
        train_chunk: Train features per chunk (``None``: all at once).

    Returns:
        (M, num_classes) summed vote weights (float32); ``argmax`` is the prediction.
    """
    _check(train_features, train_labels, query_features)
    sims, idx = knn_neighbours(train_features, query_features, k, query_chunk=query_chunk, train_chunk=train_chunk)
    return knn_vote(sims, train_labels.long().to(idx.device)[idx], num_classes, temperature)
