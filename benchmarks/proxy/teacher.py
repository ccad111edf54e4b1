"""The stand-in semantic teacher: a CLIP-shaped ViT trained with labels on the Tiny-ImageNet subset.

No CLIP weights can be had offline, so the teacher is a small OpenAI-CLIP-shaped image tower
(:func:`milan.models.tower.clip_vision_tower`: ``ln_pre``, QuickGELU, LayerNorm eps 1e-5, a bias-free projection)
trained on *other images* (Tiny-ImageNet, 202 classes, none of them CIFAR-10's) with labels. Like CLIP's image
embedding, its projected CLS token is trained against learned class embeddings through a cosine-similarity softmax
(CLIP's zero-shot head, with the class names replaced by learned vectors). MILAN then uses the tower's per-token
outputs after ``ln_post`` and the projection as targets, exactly as it uses CLIP's.

The tower is saved in the library's own teacher layout (:func:`milan.checkpoint.save_canonical`, with its
architecture), so ``model.teacher.checkpoint=PATH`` / :func:`milan.checkpoint.load_teacher` read it back.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import PatchDropout
from timm.layers.weight_init import trunc_normal_

from benchmarks.proxy.data import folder_tensors, random_resized_crop, resize, split_per_class, tiny_root
from benchmarks.proxy.settings import IMG_SIZE, PATCH, TeacherBudget
from milan.checkpoint import Checkpoint, load_teacher, save_canonical
from milan.data import Batch
from milan.models.teacher import Teacher
from milan.models.tower import clip_vision_tower, describe_tower
from milan.train.config import AdamWConfig
from milan.train.evaluation import TopKAccuracy
from milan.train.loop import Optimization, StepOutput, TrainState, autocast_context, train_step
from milan.train.optim import build_adamw, param_groups
from milan.train.schedule import CosineSchedule

TINY_SIZE = 64  # the Tiny-ImageNet images' native size (decoded once at it, cropped to 32 px in batches)


class CosineClassifier(nn.Module):
    """Logits = ``scale * cos(embedding, class vector)``: CLIP's zero-shot head with learned class vectors."""

    def __init__(self, dim: int, num_classes: int, init_scale: float = 16.0) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_classes, dim))
        trunc_normal_(self.weight, std=0.02)
        self.log_scale = nn.Parameter(torch.tensor(math.log(init_scale)))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        scale = self.log_scale.exp().clamp(max=100.0)
        return scale * F.normalize(z, dim=-1) @ F.normalize(self.weight, dim=-1).T  # (B, C)


class TowerClassifier(nn.Module):
    """The tower (CLS token after ``ln_post`` and the projection) followed by the cosine classifier."""

    def __init__(self, tower: nn.Module, out_dim: int, num_classes: int) -> None:
        super().__init__()
        self.tower = tower
        self.classifier = CosineClassifier(out_dim, num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        embedding = self.tower(images)  # (B, out_dim): timm's forward = head(norm(x))[:, 0] with global_pool="token"
        logits: torch.Tensor = self.classifier(embedding)
        return logits


@dataclass
class TeacherResult:
    path: Path
    val_top1: float  # on held-out Tiny-ImageNet images (val_per_class per class)
    num_classes: int
    train_images: int
    wall_time: float
    final_loss: float | None
    images_per_second: float

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["path"] = str(self.path)
        return d


def _train_batches(
    images: torch.Tensor,
    labels: torch.Tensor,
    train_idx: torch.Tensor,
    budget: TeacherBudget,
    steps: int,
    g: torch.Generator,
) -> Iterator[Batch]:
    """One epoch of augmented batches: a fresh permutation, each batch cropped and flipped on the images' device."""
    order = train_idx[torch.randperm(len(train_idx), generator=g)]
    for i in range(steps):
        idx = order[i * budget.batch_size : (i + 1) * budget.batch_size].to(images.device)
        views = random_resized_crop(images[idx], IMG_SIZE, scale=budget.crop_scale, hflip=0.5, generator=g)
        yield Batch(views, labels[idx])  # (B, 3, 32, 32)


def _loss(batch: Batch, model: nn.Module, label_smoothing: float) -> StepOutput:
    loss = F.cross_entropy(model(batch.images), batch.labels, label_smoothing=label_smoothing)
    return StepOutput(loss, batch.images.shape[0])


def train_teacher(
    budget: TeacherBudget,
    data_root: Path,
    out_path: Path,
    device: torch.device,
    *,
    seed: int = 0,
    log: Any = print,
) -> TeacherResult:
    """Trains the stand-in teacher and saves its tower.

    The Tiny-ImageNet images are decoded once into a cached uint8 tensor (64 px) and augmented in batches
    (:func:`benchmarks.proxy.data.random_resized_crop` to 32 px), so training costs only the model's compute.

    Args:
        budget: Size and schedule.
        data_root: The shared data folder.
        out_path: Where to write the tower (``.pt``).
        device: Where to train.
        seed: Seed of the weights, the data order and the augmentation.
        log: Progress printer.

    Returns:
        Where it was saved and how well it classifies held-out Tiny-ImageNet images.
    """
    t0 = time.perf_counter()
    images, labels = folder_tensors(tiny_root(data_root, budget.per_class), TINY_SIZE)  # (N, 3, 64, 64) uint8
    train_idx, val_idx = split_per_class(labels, budget.val_per_class)
    num_classes = int(labels.max()) + 1
    images = images.to(device)
    labels = labels.to(device)

    torch.manual_seed(seed)
    tower = clip_vision_tower(
        img_size=IMG_SIZE,
        patch_size=PATCH,
        width=budget.width,
        depth=budget.depth,
        num_heads=budget.num_heads,
        out_dim=budget.out_dim,
    )
    head = tower.head
    if isinstance(head, nn.Linear) and head.bias is not None:
        head.bias.requires_grad_(False)  # CLIP's projection has no bias: keep it at zero
    model = TowerClassifier(tower, budget.out_dim, num_classes).to(device)

    steps_per_epoch = len(train_idx) // budget.batch_size
    total = steps_per_epoch * budget.epochs
    optim_cfg = AdamWConfig(betas=(0.9, 0.999), weight_decay=budget.weight_decay)
    optimizer = build_adamw(param_groups(model, budget.weight_decay), optim_cfg, budget.lr, device)
    schedule = CosineSchedule(budget.lr, total, round(budget.warmup_epochs * steps_per_epoch))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    opt = Optimization(optimizer, schedule, device, dtype)
    g = torch.Generator().manual_seed(seed)
    state = TrainState()
    losses: list[float] = []  # the last epoch's
    for epoch in range(budget.epochs):
        model.train()
        # FLIP-style token dropping (timm's PatchDropout) in the first epochs: cheaper steps, more epochs.
        dropping = budget.patch_drop > 0 and epoch < budget.epochs - budget.full_token_epochs
        tower.patch_drop = PatchDropout(budget.patch_drop, num_prefix_tokens=1) if dropping else nn.Identity()
        batches = _train_batches(images, labels, train_idx, budget, steps_per_epoch, g)
        losses = []
        for _ in range(steps_per_epoch):
            metrics = train_step(_loss, batches, state, opt, model, budget.label_smoothing)
            losses.append(metrics["loss"] if metrics is not None else float("nan"))
        log(f"  teacher epoch {epoch + 1}/{budget.epochs}: loss {sum(losses) / max(len(losses), 1):.3f}")
    tower.patch_drop = nn.Identity()
    train_time = time.perf_counter() - t0

    model.eval()
    val_top1 = float("nan")
    if len(val_idx):
        meter = TopKAccuracy((1,))
        with torch.no_grad(), autocast_context(device, dtype):
            for i in range(0, len(val_idx), 512):
                idx = val_idx[i : i + 512].to(device)
                meter.update(model(resize(images[idx], IMG_SIZE)).float().cpu(), labels[idx].cpu())
        val_top1 = meter.compute()["top1"]

    save_tower(tower.cpu(), out_path)
    check_roundtrip(tower, out_path)
    return TeacherResult(
        path=out_path,
        val_top1=val_top1,
        num_classes=num_classes,
        train_images=state.images_seen,
        wall_time=time.perf_counter() - t0,
        final_loss=losses[-1] if losses else None,
        images_per_second=state.images_seen / max(train_time, 1e-9),
    )


def save_tower(tower: nn.Module, path: Path) -> Path:
    """Writes the tower as a teacher checkpoint in the library's layout (weights plus its exact architecture)."""
    from timm.models.vision_transformer import VisionTransformer as TimmVisionTransformer

    assert isinstance(tower, TimmVisionTransformer)
    state = {f"model.{k}": v.detach().cpu() for k, v in tower.state_dict().items()}
    ck = Checkpoint(source="benchmarks/proxy teacher", format="milan", kind="teacher", state_dict=state)
    ck.tower = describe_tower(tower)
    return save_canonical(ck, path)


@torch.no_grad()
def check_roundtrip(tower: nn.Module, path: Path) -> None:
    """The saved teacher, loaded as users load teachers, gives the same features and attention as the trained one."""
    from timm.models.vision_transformer import VisionTransformer as TimmVisionTransformer

    assert isinstance(tower, TimmVisionTransformer)
    tower = tower.cpu().eval()
    x = torch.randn(2, 3, IMG_SIZE, IMG_SIZE, generator=torch.Generator().manual_seed(0))
    ours, loaded = Teacher(tower)(x), load_teacher(path)(x)
    torch.testing.assert_close(loaded.features, ours.features)
    torch.testing.assert_close(loaded.cls_attention, ours.cls_attention)
