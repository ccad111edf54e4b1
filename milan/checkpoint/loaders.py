"""Our models from any supported checkpoint: right-sized from the shapes, loaded strictly, stored pos-embeds kept.

Examples:
    >>> import tempfile, torch
    >>> from milan.models import create_model
    >>> model = create_model("milan_test_tiny")
    >>> path = tempfile.mkdtemp() + "/ckpt.pth"
    >>> _ = torch.save({"model": model.state_dict()}, path)
    >>> loaded = load_milan(path, num_heads=4, decoder_num_heads=4)
    >>> torch.equal(loaded.encoder.pos_embed, model.encoder.pos_embed)
    True
"""

from __future__ import annotations

import os
import warnings
from typing import Any, cast

import torch.nn as nn

from milan.checkpoint.arch import TowerSpec, build_strict
from milan.checkpoint.errors import CheckpointError
from milan.checkpoint.formats import Checkpoint, read_checkpoint
from milan.checkpoint.spec import resolve_spec
from milan.checkpoint.teachers import load_teacher, teacher_from_checkpoint
from milan.models.classifier import FinetuneClassifier, LinearProbe
from milan.models.milan import MILAN, MaskedStudent
from milan.models.teacher import Teacher, TeacherInputNorm
from milan.models.vit import VisionTransformer

Source = str | os.PathLike[str] | Checkpoint


def _checkpoint(src: Source, **options: Any) -> Checkpoint:
    if isinstance(src, Checkpoint):
        for key in ("num_heads", "decoder_num_heads", "teacher_num_heads"):
            if options.get(key):
                src.hints[key] = options[key]
        return src
    return read_checkpoint(src, **{k: v for k, v in options.items() if v is not None})


def warn_assumed_heads(ck: Checkpoint, *, decoder: bool = False) -> None:
    """One warning per head count a (foreign) file does not record, naming the argument that sets it."""
    if "num_heads" in ck.hints and (not decoder or "decoder_num_heads" in ck.hints):
        return
    assumed = resolve_spec(ck, heads_flag="num_heads=N", decoder_heads_flag="decoder_num_heads=N").assumed
    for key in ("decoder_heads",) if decoder else ("encoder_heads",):
        if key in assumed:
            warnings.warn(f"{ck.source}: {assumed[key]}", stacklevel=3)


def encoder_from_checkpoint(ck: Checkpoint, *, drop_path_rate: float = 0.0) -> VisionTransformer:
    """The student encoder of a canonical checkpoint (for a fine-tuned classifier: without its final norm).

    Args:
        ck: From :func:`~milan.checkpoint.formats.read_checkpoint`.
        drop_path_rate: Stochastic depth of the built encoder (fine-tuning).

    Returns:
        The encoder with the stored weights, including the stored position table.
    """
    warn_assumed_heads(ck)
    arch = ck.encoder_arch()

    def build() -> VisionTransformer:
        encoder = arch.build(drop_path_rate=drop_path_rate)
        if ck.kind == "finetune":
            encoder.norm = nn.Identity()  # type: ignore[assignment]
        return encoder

    return build_strict(build, ck.encoder_state(), f"{ck.source}: student encoder")


def load_encoder(src: Source, *, fmt: str = "auto", num_heads: int | None = None) -> VisionTransformer:
    """Loads the student encoder from any checkpoint that holds one (pretraining, classifier, timm ViT).

    Args:
        src: Path, folder or an already read :class:`Checkpoint`.
        fmt: Source format (``auto`` detects it).
        num_heads: Encoder heads when the file does not record them (default: the standard ViT table).

    Returns:
        The encoder with the stored weights, including the stored position table.
    """
    return encoder_from_checkpoint(_checkpoint(src, fmt=fmt, num_heads=num_heads))


def load_student(
    src: Source, *, fmt: str = "auto", num_heads: int | None = None, decoder_num_heads: int | None = None
) -> MaskedStudent:
    """Loads the trainable part of MILAN (encoder + decoder) from a pretraining checkpoint.

    Args:
        src: mmpretrain / MMSelfSup MILAN, original MILAN (MAE format) or our checkpoint.
        fmt: Source format.
        num_heads: Encoder heads (see :func:`load_encoder`).
        decoder_num_heads: Decoder heads (default ``width // 32``: 16 for MILAN's 512-wide decoder).

    Returns:
        The student.
    """
    ck = _checkpoint(src, fmt=fmt, num_heads=num_heads, decoder_num_heads=decoder_num_heads)
    warn_assumed_heads(ck, decoder=True)
    decoder = build_strict(ck.decoder_arch().build, ck.part("student.decoder."), f"{ck.source}: decoder")
    return MaskedStudent(encoder_from_checkpoint(ck), decoder)


def load_milan(
    src: Source,
    *,
    teacher: Teacher | str | os.PathLike[str] | None = None,
    input_norm: TeacherInputNorm | None = None,
    fmt: str = "auto",
    num_heads: int | None = None,
    decoder_num_heads: int | None = None,
    teacher_num_heads: int | None = None,
    **milan_kwargs: Any,
) -> MILAN:
    """Loads a whole MILAN model (student + teacher) from a pretraining checkpoint.

    Args:
        src: mmpretrain / MMSelfSup MILAN (``backbone``, ``neck``, ``target_generator``), original MILAN or ours.
        teacher: A teacher, or a path for :func:`milan.checkpoint.load_teacher`. Default: the teacher stored in the
            checkpoint, else the weights file named by its model spec or config. A teacher read from a file is built
            as the checkpoint's spec describes it (image size included), when it has one: the file provides the
            weights. Needed otherwise (original MILAN files, mmpretrain files saved without ``target_generator``).
        input_norm: Input normalisation of the teacher (default: the checkpoint's spec or config, else
            ``"imagenet"``).
        fmt: Source format.
        num_heads: Encoder heads.
        decoder_num_heads: Decoder heads.
        teacher_num_heads: Heads of the teacher stored in ``src``.
        **milan_kwargs: :class:`~milan.models.MILAN` options (``mask_ratio``, ``masking``, ``loss_on`` ...); by
            default those stored in the checkpoint's config, else MILAN's defaults.

    Returns:
        The model.
    """
    ck = _checkpoint(
        src, fmt=fmt, num_heads=num_heads, decoder_num_heads=decoder_num_heads, teacher_num_heads=teacher_num_heads
    )
    student = load_student(ck)
    stored = ck.hints.get("model_config") or {}
    norm = input_norm or ck.hints.get("teacher_input_norm") or (stored.get("teacher") or {}).get("input_norm")
    norm = norm or "imagenet"
    spec = ck.hints.get("teacher_spec")  # what the run built: rebuild exactly that, with a file's weights
    tower_spec = TowerSpec.from_dict(spec) if isinstance(spec, dict) else None
    # Without a stored spec a teacher file runs on the student's grid, as pretraining runs it (build_teacher).
    grid = {"grid_size": student.encoder.grid_size[0]} if tower_spec is None else {"spec": tower_spec}
    teacher_path = teacher_file(ck)
    if isinstance(teacher, (str, os.PathLike)):
        teacher = load_teacher(teacher, input_norm=norm, **grid)
    if teacher is None and ck.tower is not None:
        teacher = teacher_from_checkpoint(ck, norm)
    elif teacher is None and teacher_path and os.path.exists(teacher_path):  # the file the run read its teacher from
        teacher = load_teacher(teacher_path, input_norm=norm, **grid)
    patch = student.encoder.patch_size
    if teacher is None and student.decoder.out_dim != patch * patch * 3:
        missing = f"; the teacher file it was trained with, {teacher_path}, is not found" if teacher_path else ""
        raise CheckpointError(
            f"{ck.source} holds no teacher weights{missing} and its decoder predicts {student.decoder.out_dim}-d "
            "features; pass teacher=<teacher weights> (the teacher it was trained with)"
        )
    kwargs = {k: stored[k] for k in ("mask_ratio", "masking", "loss_on", "restore_order") if k in stored}
    if teacher is None:
        kwargs["masking"] = "random"
    kwargs.update(milan_kwargs)
    return MILAN(student.encoder, student.decoder, teacher, **kwargs)


def teacher_file(ck: Checkpoint) -> str | None:
    """The teacher weights file a pretraining checkpoint names (its model spec, else its config), if any."""
    spec = ck.hints.get("spec")
    teacher = getattr(spec, "teacher", None)
    if teacher is not None:
        return cast(str | None, teacher.weights)
    path = ((ck.hints.get("model_config") or {}).get("teacher") or {}).get("checkpoint")
    return str(path) if path else None


def load_classifier(
    src: Source, *, fmt: str = "auto", num_heads: int | None = None
) -> LinearProbe | FinetuneClassifier:
    """Loads a linear probe or fine-tuned classifier (mmpretrain ``ImageClassifier``, original MILAN/MAE, ours).

    Args:
        src: Path, folder or :class:`Checkpoint`.
        fmt: Source format.
        num_heads: Encoder heads.

    Returns:
        A :class:`~milan.models.classifier.LinearProbe` (BN + linear on the normed CLS token) or a
        :class:`~milan.models.classifier.FinetuneClassifier` (pooled tokens, ``fc_norm``, head).
    """
    ck = _checkpoint(src, fmt=fmt, num_heads=num_heads)
    if ck.kind not in ("linear_probe", "finetune"):
        raise CheckpointError(f"{ck.source}: a {ck.format} {ck.kind} checkpoint, not a classifier")
    warn_assumed_heads(ck)
    arch = ck.encoder_arch()

    def build() -> LinearProbe | FinetuneClassifier:
        if ck.kind == "linear_probe":
            return LinearProbe(arch.build(), num_classes=int(ck.state_dict["head.fc.weight"].shape[0]))
        pool = cast(Any, ck.hints.get("global_pool", "avg"))
        return FinetuneClassifier(arch.build(), int(ck.state_dict["head.weight"].shape[0]), global_pool=pool)

    model = build_strict(build, ck.state_dict, f"{ck.source}: {ck.kind.replace('_', ' ')} classifier")
    return model.eval()
