"""The stand-in semantic teacher: a CLIP-shaped ViT trained with labels on the Tiny-ImageNet subset.

No CLIP weights can be had offline, so the teacher is a small OpenAI-CLIP-shaped image tower
(:func:`milan.models.teacher.clip_vision_tower`: ``ln_pre``, QuickGELU, LayerNorm eps 1e-5, a bias-free projection)
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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers.weight_init import trunc_normal_
from torch.utils.data import Subset

from benchmarks.proxy.data import load_tensors, split_per_class, tiny_root
from benchmarks.proxy.settings import IMG_SIZE, PATCH, TeacherBudget
from milan.checkpoint import Checkpoint, load_teacher, save_canonical
from milan.checkpoint.arch import describe_tower
from milan.data import Batch, ImageFolderDataset, build_loader, eval_transform, pretrain_transform
from milan.engine.config import OptimConfig
from milan.engine.loop import StepOutput, TrainState, autocast_context, fit_epochs, train_one_epoch
from milan.engine.optim import build_adamw, param_groups
from milan.engine.schedule import CosineSchedule
from milan.eval.metrics import topk_correct
from milan.models.teacher import Teacher, clip_vision_tower


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


class _LossLog:
    """Collects the loop's per-step losses (a :class:`milan.engine.loop.StepLogger`)."""

    def __init__(self) -> None:
        self.losses: list[float] = []

    def step(self, state: TrainState, metrics: dict[str, float]) -> None:
        self.losses.append(float(metrics["loss"]))


def train_teacher(
    budget: TeacherBudget,
    data_root: Path,
    out_path: Path,
    device: torch.device,
    *,
    seed: int = 0,
    num_workers: int = 0,
    log: Any = print,
) -> TeacherResult:
    """Trains the stand-in teacher and saves its tower.

    Args:
        budget: Size and schedule.
        data_root: The shared data folder.
        out_path: Where to write the tower (``.pt``).
        device: Where to train.
        seed: Seed of the weights and the data order.
        num_workers: DataLoader workers.
        log: Progress printer.

    Returns:
        Where it was saved and how well it classifies held-out Tiny-ImageNet images.
    """
    t0 = time.perf_counter()
    root = tiny_root(data_root, budget.per_class)
    train_set = ImageFolderDataset(root, pretrain_transform(IMG_SIZE, scale=budget.crop_scale))
    val_set = ImageFolderDataset(root, eval_transform(IMG_SIZE, crop_pct=1.0))
    train_idx, val_idx = split_per_class(train_set, budget.val_per_class)
    num_classes = len(train_set.classes)

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

    loader = build_loader(
        Subset(train_set, train_idx),  # type: ignore[arg-type]
        budget.batch_size,
        shuffle=True,
        drop_last=True,
        seed=seed,
        num_workers=num_workers,
    )
    steps_per_epoch = len(loader)
    total = steps_per_epoch * budget.epochs
    optim_cfg = OptimConfig(betas=(0.9, 0.999), weight_decay=budget.weight_decay)
    optimizer = build_adamw(param_groups(model, budget.weight_decay), optim_cfg, budget.lr, device)
    schedule = CosineSchedule(budget.lr, total, round(budget.warmup_epochs * steps_per_epoch))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    losses = _LossLog()

    def step(batch: Batch) -> StepOutput:
        images = batch.images.to(device, non_blocking=True)
        labels = batch.labels.to(device, non_blocking=True)
        loss = F.cross_entropy(model(images), labels, label_smoothing=budget.label_smoothing)
        return StepOutput(loss, images.shape[0], len(batch.skipped))

    def run_epoch(state: TrainState) -> TrainState:
        model.train()
        state = train_one_epoch(
            step, loader, optimizer, schedule, state, num_batches=steps_per_epoch,
            ctx=autocast_context(device, dtype), logger=losses,
        )  # fmt: skip
        recent = losses.losses[-steps_per_epoch:]
        log(f"  teacher epoch {state.epoch + 1}/{budget.epochs}: loss {sum(recent) / max(len(recent), 1):.3f}")
        return state

    state = fit_epochs(
        run_epoch, TrainState(), epochs=budget.epochs, batches_per_epoch=steps_per_epoch, stop_step=total
    )
    train_time = time.perf_counter() - t0

    model.eval()
    val_top1 = float("nan")
    if val_idx:
        images, labels = load_tensors(Subset(val_set, val_idx))  # type: ignore[arg-type]
        correct = 0
        with torch.no_grad(), autocast_context(device, dtype):
            for i in range(0, len(images), 512):
                logits = model(images[i : i + 512].to(device))
                correct += int(topk_correct(logits.float().cpu(), labels[i : i + 512], (1,))[0])
        val_top1 = 100.0 * correct / len(labels)

    save_tower(tower.cpu(), out_path)
    check_roundtrip(tower, out_path)
    return TeacherResult(
        path=out_path,
        val_top1=val_top1,
        num_classes=num_classes,
        train_images=state.images_seen,
        wall_time=time.perf_counter() - t0,
        final_loss=losses.losses[-1] if losses.losses else None,
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
