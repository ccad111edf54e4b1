"""Our models from any supported checkpoint: right-sized from the shapes, loaded strictly, stored pos-embeds kept.

Teachers (:func:`load_teacher`) come from local files only, in every format of :mod:`milan.checkpoint.formats`:
OpenAI's TorchScript archive (read without running it) or state dicts, OpenCLIP, Hugging Face CLIP folders, and any
timm ``VisionTransformer`` (bring your own teacher: pass ``model_name``, e.g. ``"vit_base_patch14_reg4_dinov2"``, to
build it with timm's exact settings, or let the architecture be inferred; ``head=False`` drops a classifier head).
What a format cannot record is assumed with a warning (:mod:`milan.checkpoint.keymaps`). Not supported: towers
without a class token (SigLIP) and non-standard blocks (EVA / EVA-02 rotary blocks), as
:func:`~milan.models.teacher.check_teacher_tower` says.

Grid matching: MILAN needs the teacher's patch grid to equal the student's; ``img_size`` (or ``grid_size``) runs a
teacher at another resolution, as :func:`milan.models.factory.match_teacher_grid` does.

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

import dataclasses
import os
import warnings
from typing import TYPE_CHECKING, Any, cast

import torch.nn as nn

from milan.checkpoint.formats import Checkpoint, read_checkpoint, resolve_spec
from milan.checkpoint.keymaps import TowerOptions, timm_tower
from milan.errors import CheckpointError
from milan.models.classifier import FinetuneClassifier, LinearProbe
from milan.models.factory import ModelConfig, TeacherConfig, build_milan
from milan.models.milan import MILAN, MaskedStudent
from milan.models.teacher import Teacher, TeacherInputNorm
from milan.models.tower import TowerSpec, build_strict, build_tower
from milan.models.vit import VisionTransformer

if TYPE_CHECKING:
    from typing import Unpack  # Python 3.11 (annotations only)

Source = str | os.PathLike[str] | Checkpoint


def load_teacher(
    path: Source,
    input_norm: TeacherInputNorm = "imagenet",
    *,
    fmt: str = "auto",
    grid_size: int | None = None,
    model_name: str | None = None,
    head: bool = True,
    spec: TowerSpec | None = None,
    **options: Unpack[TowerOptions],
) -> Teacher:
    """Loads a frozen teacher from a local weights file or folder (see the module docstring).

    Args:
        path: Weights file, Hugging Face / OpenCLIP folder, or any of our checkpoints holding a teacher (or one
            already read: then the reading options are not used).
        input_norm: Teacher input normalisation (see :class:`milan.models.Teacher`).
        fmt: Force a format (``openai-clip``, ``open-clip``, ``hf``, ``timm``, ``milan``, ``mmpretrain``); ``auto``
            detects it.
        grid_size: Run the teacher on a patch grid of this side (``img_size = grid_size * patch_size``; position
            table resampled, inputs resized).
        model_name: timm model name for timm / OpenCLIP ``visual.trunk`` teachers.
        head: Keep a timm checkpoint's Linear head as the output projection.
        spec: Build exactly this tower instead of the inferred one, e.g. the ``teacher_spec`` that training
            checkpoints store (the file then only provides the weights).
        **options: What the weights do not record (:class:`~milan.checkpoint.keymaps.TowerOptions`: ``act``,
            ``norm_eps``, ``num_heads``) when the format's default is wrong, and ``img_size`` (inputs resized).

    Raises:
        CheckpointError: Unreadable file, unrecognised layout, no teacher in it, or weights that do not fit the
            inferred architecture (the message names the keys).
        TypeError: The tower's blocks are not timm ViT blocks (e.g. EVA).
    """
    if options.get("img_size") and grid_size:
        raise ValueError("pass img_size or grid_size, not both")
    ck = path
    if not isinstance(ck, Checkpoint):
        ck = read_checkpoint(
            ck, fmt, teacher_num_heads=options.get("num_heads"), model_name=model_name, head=head, **options
        )
    if ck.kind == "encoder":  # a plain timm ViT (or one of our encoders) brought as the teacher
        tower_sd, inferred = timm_tower(ck.state_dict, num_heads=ck.hints.get("num_heads"), **ck.tower_options)
    elif ck.tower is not None:
        tower_sd, inferred = ck.part("teacher.model." if ck.kind == "milan" else "model."), ck.tower
    else:
        raise CheckpointError(f"{ck.source}: this {ck.format} {ck.kind} checkpoint holds no teacher weights")
    spec = spec or inferred
    if grid_size:
        spec = dataclasses.replace(spec, img_size=grid_size * spec.patch_size)
    if options.get("img_size") or grid_size:
        spec = dataclasses.replace(spec, resize_input=True)
    teacher = Teacher(build_tower(spec, tower_sd), input_norm=input_norm)
    teacher.source_format = ck.format
    return teacher


def teacher_from_config(cfg: TeacherConfig) -> Teacher | None:
    """The teacher ``model.teacher.checkpoint`` names, read as pretraining reads it (``None``: no file named).

    It is run on the student's grid when :func:`~milan.models.build_milan` receives it.
    """
    if cfg.kind == "none" or not cfg.checkpoint:
        return None
    return load_teacher(cfg.checkpoint, cfg.input_norm, fmt=cfg.format, model_name=cfg.model_name, act=cfg.act)


def model_from_config(cfg: ModelConfig) -> MILAN:
    """Builds the MILAN model a config describes, reading its teacher from ``model.teacher.checkpoint`` if set."""
    return build_milan(cfg, teacher=teacher_from_config(cfg.teacher))


def _checkpoint(src: Source, **options: Any) -> Checkpoint:
    if isinstance(src, Checkpoint):
        for key in ("num_heads", "decoder_num_heads", "teacher_num_heads"):
            if options.get(key):
                src.hints[key] = options[key]
        return src
    return read_checkpoint(src, **{k: v for k, v in options.items() if v is not None})


def warn_assumed_heads(ck: Checkpoint, *, decoder: bool = False) -> None:
    """A warning when the encoder's (or the decoder's) head count is not recorded, naming the argument that sets it."""
    hint, key = ("decoder_num_heads", "decoder_heads") if decoder else ("num_heads", "encoder_heads")
    if hint in ck.hints:
        return
    assumed = resolve_spec(ck, heads_flag="num_heads=N", decoder_heads_flag="decoder_num_heads=N").assumed
    if key in assumed:
        warnings.warn(f"{ck.source}: {assumed[key]}", stacklevel=3)


def load_encoder(
    src: Source, *, fmt: str = "auto", num_heads: int | None = None, drop_path_rate: float = 0.0
) -> VisionTransformer:
    """Loads the student encoder, with its stored weights and position table, from any checkpoint that holds one.

    Pretraining, classifier (a fine-tuned one's encoder has no final norm) or timm ViT checkpoints. ``num_heads``:
    the encoder's heads when the file does not record them (default: the standard ViT table); ``drop_path_rate`` is
    for fine-tuning.
    """
    ck = _checkpoint(src, fmt=fmt, num_heads=num_heads)
    warn_assumed_heads(ck)
    arch = ck.encoder_arch()

    def build() -> VisionTransformer:
        encoder = arch.build(drop_path_rate=drop_path_rate)
        if ck.kind == "finetune":
            encoder.norm = nn.Identity()
        return encoder

    return build_strict(build, ck.encoder_state(), f"{ck.source}: student encoder")


def load_student(
    src: Source, *, fmt: str = "auto", num_heads: int | None = None, decoder_num_heads: int | None = None
) -> MaskedStudent:
    """Loads the trainable part of MILAN (encoder + decoder) from a pretraining checkpoint.

    mmpretrain / MMSelfSup, original MILAN or ours; ``decoder_num_heads`` defaults to ``width // 32`` (16 for
    MILAN's 512-wide decoder).
    """
    ck = _checkpoint(src, fmt=fmt, num_heads=num_heads, decoder_num_heads=decoder_num_heads)
    warn_assumed_heads(ck, decoder=True)
    decoder = build_strict(ck.decoder_arch().build, ck.part("student.decoder."), f"{ck.source}: decoder")
    return MaskedStudent(load_encoder(ck), decoder)


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
        teacher = load_teacher(ck, norm)
    elif teacher is None and teacher_path and os.path.exists(teacher_path):  # the file the run read its teacher from
        teacher = load_teacher(teacher_path, input_norm=norm, **grid)
    patch = student.encoder.patch_size
    if teacher is None and student.decoder.out_dim != patch * patch * 3:
        missing = f"; the teacher file it was trained with, {teacher_path}, is not found" if teacher_path else ""
        raise CheckpointError(
            f"{ck.source} holds no teacher weights{missing} and its decoder predicts {student.decoder.out_dim}-d "
            "features; pass teacher=<teacher weights> (the teacher it was trained with)"
        )
    kwargs = {k: stored[k] for k in ("mask_ratio", "masking", "loss_on") if k in stored}
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
