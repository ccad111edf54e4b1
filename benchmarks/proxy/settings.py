"""What the proxy comparison runs: the models, the arms and the budgets of each mode (one place, all recorded).

Every arm uses the same student, the same data, the same optimizer, schedule, batch size and number of images;
only the pretraining objective differs. The student sees CIFAR-10 at 32 px with 4 px patches (an 8 x 8 grid, the
same grid as the teacher, as MILAN requires).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

from milan.models.factory import DecoderConfig, EncoderConfig, ModelConfig, TeacherConfig

IMG_SIZE = 32
PATCH = 4
NUM_CLASSES = 10  # CIFAR-10


@dataclass(frozen=True)
class TeacherBudget:
    """The stand-in teacher: a CLIP-shaped ViT trained with labels on the Tiny-ImageNet subset."""

    width: int = 128
    depth: int = 4
    num_heads: int = 4
    out_dim: int = 128  # width of its projection: MILAN's target width
    epochs: int = 6
    batch_size: int = 128
    lr: float = 2e-3
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    label_smoothing: float = 0.1
    crop_scale: tuple[float, float] = (0.35, 1.0)
    patch_drop: float = 0.0  # fraction of patch tokens dropped while training (FLIP-style; 0: off)
    full_token_epochs: int = 0  # the last epochs train on all tokens (with patch_drop > 0)
    per_class: int | None = None  # images per class used (None: all 100)
    val_per_class: int = 10  # held out from those, to report the teacher's own accuracy


@dataclass(frozen=True)
class StudentBudget:
    """The student (every arm), its decoder and the pretraining schedule shared by all arms."""

    embed_dim: int = 128
    depth: int = 4
    num_heads: int = 4
    decoder_dim: int = 64
    decoder_depth: int = 2
    decoder_heads: int = 4
    mask_ratio: float = 0.75
    train_per_class: int | None = 2000  # CIFAR-10 train images per class for pretraining (None: all 5,000)
    epochs: int = 2
    batch_size: int = 128
    lr: float = 1.5e-3
    weight_decay: float = 0.05
    warmup_epochs: float = 0.25
    crop_scale: tuple[float, float] = (0.35, 1.0)


@dataclass(frozen=True)
class EvalBudget:
    """k-NN and the linear probe on frozen CLS features of CIFAR-10."""

    train_per_class: int | None = 1000  # labelled CIFAR-10 train images per class (k-NN bank, probe training)
    test_per_class: int | None = 500  # CIFAR-10 test images per class (None: the full 10,000)
    knn_k: int = 20
    knn_temperature: float = 0.07
    probe_epochs: int = 60
    probe_batch_size: int = 256
    probe_lr: float = 1e-3
    probe_weight_decay: float = 1e-4


@dataclass(frozen=True)
class Budget:
    """One mode's budget."""

    mode: str
    seeds: tuple[int, ...]
    teacher: TeacherBudget = field(default_factory=TeacherBudget)
    student: StudentBudget = field(default_factory=StudentBudget)
    eval: EvalBudget = field(default_factory=EvalBudget)
    num_workers: int = 0  # DataLoader workers of each pretraining job

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


MODES: dict[str, Budget] = {
    # Seconds: checks the whole pipeline end to end (tests, CI); the numbers mean nothing.
    "smoke": Budget(
        mode="smoke",
        seeds=(0,),
        teacher=TeacherBudget(width=64, depth=1, num_heads=1, out_dim=32, epochs=1, per_class=3, val_per_class=1),
        student=StudentBudget(
            embed_dim=32,
            depth=1,
            num_heads=2,
            decoder_dim=32,
            decoder_depth=1,
            decoder_heads=2,
            train_per_class=8,
            epochs=1,
            batch_size=16,
            warmup_epochs=0.0,
        ),
        eval=EvalBudget(train_per_class=10, test_per_class=5, knn_k=5, probe_epochs=2, probe_batch_size=32),
    ),
    # Under 30 minutes on 2 idle CPU cores. The teacher drops half its patch tokens (FLIP-style) in 8 of its 10
    # epochs: 10.5 % held-out top-1 in 5.8 min, against 9.1 % for 6 full-token epochs in 5.1 min.
    "quick": Budget(mode="quick", seeds=(0, 1), teacher=TeacherBudget(epochs=10, patch_drop=0.5, full_token_epochs=2)),
    # About 10 minutes on one recent GPU: all of CIFAR-10, more epochs, 3 seeds, the full test set.
    "full": Budget(
        mode="full",
        seeds=(0, 1, 2),
        teacher=TeacherBudget(epochs=30, batch_size=256),
        student=StudentBudget(train_per_class=None, epochs=5, batch_size=256, warmup_epochs=0.5),
        eval=EvalBudget(train_per_class=None, test_per_class=None, probe_epochs=30, probe_batch_size=1024),
        num_workers=12,
    ),
}

ArmName = Literal["milan", "random_mask", "mae_decoder", "pixel_mae", "random_init", "teacher"]


@dataclass(frozen=True)
class Arm:
    """One row of the comparison."""

    name: ArmName
    label: str
    pretrain: bool  # has a pretraining run (random init and the teacher do not)
    teacher: bool = True  # feature targets from the teacher (else pixels)
    masking: Literal["attention", "random"] = "attention"
    decoder: Literal["prompting", "mae"] = "prompting"


ARMS: tuple[Arm, ...] = (
    Arm("milan", "(a) MILAN: teacher features, attention masking, prompting decoder", True),
    Arm("random_mask", "(b) teacher features, random masking, prompting decoder", True, masking="random"),
    Arm("mae_decoder", "(c) teacher features, attention masking, MAE decoder", True, decoder="mae"),
    Arm("pixel_mae", "(d) MAE: pixel targets, random masking, MAE decoder", True, False, "random", "mae"),
    Arm("random_init", "(e) no pretraining (random init)", False),
    Arm("teacher", "teacher itself (Tiny-ImageNet-supervised ViT, CLIP stand-in)", False),
)
ARM_NAMES = tuple(a.name for a in ARMS)


def model_config(arm: Arm, budget: Budget, teacher_checkpoint: str | None) -> ModelConfig:
    """The arm's MILAN model config (the student is identical in every arm).

    Args:
        arm: A pretraining arm.
        budget: The mode's budget.
        teacher_checkpoint: The teacher's weights file (ignored for pixel targets).

    Returns:
        The config.
    """
    s, t = budget.student, budget.teacher
    encoder = EncoderConfig(
        img_size=IMG_SIZE, patch_size=PATCH, embed_dim=s.embed_dim, depth=s.depth, num_heads=s.num_heads
    )
    decoder = DecoderConfig(kind=arm.decoder, embed_dim=s.decoder_dim, depth=s.decoder_depth, num_heads=s.decoder_heads)
    if arm.teacher:
        teacher = TeacherConfig(
            kind="clip",
            width=t.width,
            depth=t.depth,
            num_heads=t.num_heads,
            patch_size=PATCH,
            img_size=IMG_SIZE,
            out_dim=t.out_dim,
            checkpoint=teacher_checkpoint,
        )
    else:
        teacher = TeacherConfig(kind="none")
    return ModelConfig(
        encoder=encoder,
        decoder=decoder,
        teacher=teacher,
        mask_ratio=s.mask_ratio,
        masking=arm.masking,
        loss_on="all" if arm.teacher else "masked",
    )
