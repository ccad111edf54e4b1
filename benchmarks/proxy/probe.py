"""Frozen-feature evaluation: weighted k-NN and a linear probe on cached CLS features.

Features are extracted once per model (:func:`milan.jobs.knn.extract_features`): the CLS token after the
encoder's final LayerNorm for a student, and the CLS embedding (after ``ln_post`` and the projection, CLIP's image
embedding) for the teacher. k-NN is :func:`milan.knn.knn_scores` (cosine, ``exp(s / T)`` votes). The linear
probe is the MAE/MILAN probe head (``BatchNorm1d(affine=False) -> Linear``) trained on the cached features with the
library's training step (:func:`milan.train.loop.train_step`), so it sees no augmentation (a fast, standard variant
of the probe; the same for every arm).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers.weight_init import trunc_normal_
from timm.utils.metrics import accuracy as timm_accuracy
from torch.utils.data import DataLoader, TensorDataset

from benchmarks.proxy.settings import EvalBudget
from milan.data import Batch
from milan.jobs.knn import extract_features
from milan.knn import knn_scores
from milan.train.config import AdamWConfig
from milan.train.loop import Optimization, StepOutput, TrainState, train_step
from milan.train.optim import build_adamw, param_groups
from milan.train.schedule import CosineSchedule


def features(
    fn: Callable[[torch.Tensor], torch.Tensor],
    images: torch.Tensor,
    labels: torch.Tensor,
    device: torch.device,
    batch_size: int = 500,
) -> torch.Tensor:
    """(N, D) features of in-memory images (``fn``: images on ``device`` -> (B, D))."""
    batches = [Batch(images[i : i + batch_size], labels[i : i + batch_size]) for i in range(0, len(images), batch_size)]
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    feats, _ = extract_features(fn, batches, device, dtype, progress=False)
    return feats


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Top-1 in percent."""
    return float(timm_accuracy(logits, labels)[0]) if len(labels) else 0.0


def knn_top1(
    train: torch.Tensor, train_labels: torch.Tensor, test: torch.Tensor, test_labels: torch.Tensor, budget: EvalBudget
) -> float:
    """Weighted k-NN top-1 (%)."""
    num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    scores = knn_scores(train, train_labels, test, num_classes, k=budget.knn_k, temperature=budget.knn_temperature)
    return accuracy(scores, test_labels)


def probe_head(dim: int, num_classes: int) -> nn.Sequential:
    """The linear-probe head of :class:`milan.models.classifier.LinearProbe`: affine-free BatchNorm, then Linear."""
    fc = nn.Linear(dim, num_classes)
    trunc_normal_(fc.weight, std=0.01)
    nn.init.zeros_(fc.bias)
    return nn.Sequential(OrderedDict(bn=nn.BatchNorm1d(dim, affine=False, eps=1e-6), fc=fc))


def _probe_loss(batch: list[torch.Tensor], head: nn.Module) -> StepOutput:
    x, y = batch
    return StepOutput(F.cross_entropy(head(x), y), x.shape[0])


def linear_probe_top1(
    train: torch.Tensor,
    train_labels: torch.Tensor,
    test: torch.Tensor,
    test_labels: torch.Tensor,
    budget: EvalBudget,
    *,
    seed: int = 0,
) -> float:
    """Trains the probe head on cached train features (AdamW, cosine schedule) and returns test top-1 (%)."""
    num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    torch.manual_seed(seed)
    head = probe_head(train.shape[1], num_classes)
    loader = DataLoader(
        TensorDataset(train.float(), train_labels),
        batch_size=min(budget.probe_batch_size, len(train)),
        shuffle=True,
        drop_last=True,
        generator=torch.Generator().manual_seed(seed),
    )
    steps = len(loader)
    optim_cfg = AdamWConfig(betas=(0.9, 0.999), weight_decay=budget.probe_weight_decay)
    device = torch.device("cpu")  # a Linear on a few thousand cached vectors: the CPU is fastest
    optimizer = build_adamw(param_groups(head, budget.probe_weight_decay), optim_cfg, budget.probe_lr, device)
    opt = Optimization(optimizer, CosineSchedule(budget.probe_lr, steps * budget.probe_epochs), device)
    state = TrainState()
    for _ in range(budget.probe_epochs):
        head.train()
        batches = iter(loader)
        for _ in range(steps):
            train_step(_probe_loss, batches, state, opt, head)
    head.eval()
    with torch.no_grad():
        return accuracy(head(test.float()), test_labels)
