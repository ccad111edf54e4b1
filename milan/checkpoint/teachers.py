"""Loading teachers from weights files; the format is detected and the architecture inferred from the shapes.

Supported (all from local paths, nothing is downloaded):

1. OpenAI's TorchScript archive (``ViT-B-16.pt``): read without running TorchScript
   (:mod:`milan.checkpoint.torchscript`); the activation is the one its module tree names (QuickGELU for OpenAI's
   files), LayerNorm eps 1e-5, ``width // 64`` heads.
2. A plain state dict with OpenAI key names (MMSelfSup's ``clip_vit_base_16.pth.tar``). Its keys do not tell
   QuickGELU (OpenAI's weights, the paper's teacher) from GELU (CLIPs trained by OpenCLIP, e.g.
   ``open_clip.create_model('ViT-B-16').state_dict()``): QuickGELU is used and a warning says so; pass
   ``act="gelu"`` (config ``model.teacher.act=gelu``, CLI ``--act gelu``) for a GELU model, or put its
   ``open_clip_config.json`` next to it. Eps 1e-5 and ``width // 64`` heads as above.
3. OpenCLIP checkpoints (``.bin`` / ``.pt`` / ``.safetensors``, training checkpoints with ``module.`` too), native
   (OpenAI key names) or timm-backed (``visual.trunk.*``). OpenCLIP models differ in activation: OpenAI-pretrained
   and ``*-quickgelu`` models use QuickGELU, most LAION/DataComp models GELU. Put the hub's
   ``open_clip_config.json`` next to the weights (it is read), or pass ``act="quick_gelu"`` / ``act="gelu"``; an
   OpenCLIP training checkpoint without either is read with GELU (open_clip's default), with a warning.
4. A Hugging Face transformers CLIP folder (``config.json`` + weights; ``hidden_act``, ``layer_norm_eps`` and
   ``num_attention_heads`` come from the config) or its weights file alone (transformers' CLIP defaults, QuickGELU,
   with a warning).
5. Bring your own teacher: any timm ``VisionTransformer`` checkpoint. Pass ``model_name`` (e.g.
   ``"vit_base_patch14_reg4_dinov2"``) to build it with timm's exact settings, or let the architecture be inferred
   (timm defaults: GELU, eps 1e-6, ``width // 64`` heads; a CLIP tower, recognised by CLIP's ``norm_pre``, gets
   QuickGELU as OpenAI's CLIP and eps 1e-5, with a warning). DINOv2's original layout is converted by timm's rules.
   The output width is the Linear ``head``'s width if the checkpoint has one (``head=False`` drops a classifier
   head), else ``embed_dim``; the MILAN decoder then predicts that width (``build_milan`` reads ``teacher.out_dim``).
   Register tokens are handled (their features are dropped, the CLS attention is taken over patch keys only).
   Not supported: towers without a class token (SigLIP: MILAN's masking needs the CLS query's attention; use a
   CLS-token model) and non-standard blocks (EVA / EVA-02 use rotary embeddings in their own block class; a
   ``TypeError`` says so).

Grid matching: MILAN needs the teacher's patch grid to equal the student's. A /14 or /32 teacher can be run at
another resolution: ``img_size`` (or ``grid_size``) resamples its position table (bicubic, timm's
``resample_abs_pos_embed``) and resizes the images it is given to that resolution (bicubic, antialiased). E.g. a
ViT-B/16 student at 224 px (14 x 14) with a CLIP ViT-L/14 teacher: ``grid_size=14`` runs the teacher at 196 px.
This is an approximation of the teacher's native behaviour; a teacher with the student's patch size is exact.
"""

from __future__ import annotations

import dataclasses
import os

import torch
import torch.nn as nn
from timm.models.vision_transformer import Block, checkpoint_filter_fn
from timm.models.vision_transformer import VisionTransformer as TimmVisionTransformer

from milan.checkpoint.arch import Act, StateDict, TowerSpec, build_strict
from milan.checkpoint.errors import CheckpointError
from milan.checkpoint.formats import Checkpoint, read_checkpoint
from milan.checkpoint.towers import fit_pos_embed, openai_tower, timm_tower
from milan.models.teacher import Teacher, TeacherInputNorm

__all__ = ["build_tower", "load_teacher", "openai_clip_tower", "teacher_from_checkpoint"]


def openai_clip_tower(state_dict: StateDict, prefix: str = "visual.") -> TimmVisionTransformer:
    """Builds a timm CLIP image tower from an OpenAI-layout state dict, inferring its size, and loads it strictly.

    Args:
        state_dict: OpenAI key names (``visual.conv1.weight``, ``visual.transformer.resblocks.N...``,
            ``visual.proj``...); text-tower keys are ignored.
        prefix: Prefix of the image-tower keys.

    Returns:
        The loaded tower.
    """
    timm_sd, spec, _ = openai_tower(state_dict, prefix=prefix)
    return build_tower(spec, timm_sd)


def load_teacher(
    path: str | os.PathLike[str],
    input_norm: TeacherInputNorm = "imagenet",
    *,
    fmt: str = "auto",
    num_heads: int | None = None,
    act: Act | None = None,
    norm_eps: float | None = None,
    img_size: int | None = None,
    grid_size: int | None = None,
    model_name: str | None = None,
    head: bool = True,
    spec: TowerSpec | None = None,
) -> Teacher:
    """Loads a frozen teacher from a local weights file or folder (see the module docstring for the formats).

    Args:
        path: Weights file, Hugging Face / OpenCLIP folder, or any of our checkpoints holding a teacher.
        input_norm: Teacher input normalisation (see :class:`milan.models.Teacher`).
        fmt: Force a format (``openai-clip``, ``open-clip``, ``hf``, ``timm``, ``milan``, ``mmpretrain``); ``auto``
            detects it.
        num_heads: Attention heads, when the default for the format is wrong.
        act: MLP activation (``quick_gelu``, ``gelu``, ``gelu_tanh``) overriding the format's default.
        norm_eps: LayerNorm epsilon overriding the format's default.
        img_size: Run the teacher at this resolution (position table resampled, inputs resized).
        grid_size: Same, given as a patch grid side (``img_size = grid_size * patch_size``).
        model_name: timm model name for timm / OpenCLIP ``visual.trunk`` teachers.
        head: Keep a timm checkpoint's Linear head as the output projection.
        spec: Build exactly this tower instead of the inferred one, e.g. the ``teacher_spec`` that training
            checkpoints store (the file then only provides the weights).

    Returns:
        The teacher (frozen, eval mode).

    Raises:
        CheckpointError: Unreadable file, unrecognised layout, or weights that do not fit the inferred architecture
            (the message names the keys).
        TypeError: The tower's blocks are not timm ViT blocks (e.g. EVA).
    """
    if img_size and grid_size:
        raise ValueError("pass img_size or grid_size, not both")
    ck = read_checkpoint(
        path,
        fmt,
        num_heads=num_heads,
        teacher_num_heads=num_heads,
        act=act,
        norm_eps=norm_eps,
        img_size=img_size,
        model_name=model_name,
        head=head,
    )
    return teacher_from_checkpoint(
        ck, input_norm, grid_size=grid_size, resize_input=bool(img_size or grid_size), spec=spec
    )


def teacher_from_checkpoint(
    ck: Checkpoint,
    input_norm: TeacherInputNorm = "imagenet",
    *,
    grid_size: int | None = None,
    resize_input: bool = False,
    spec: TowerSpec | None = None,
) -> Teacher:
    """Builds the teacher held by a canonical checkpoint (a teacher, a MILAN checkpoint with one, or a timm ViT).

    Args:
        ck: From :func:`milan.checkpoint.read_checkpoint`.
        input_norm: Teacher input normalisation.
        grid_size: Run at ``grid_size * patch_size`` pixels.
        resize_input: Resize inputs of another size to the teacher's resolution.
        spec: The tower to build (default: the one inferred from ``ck``); ``ck`` then only provides the weights.

    Returns:
        The teacher.
    """
    if ck.kind == "encoder":  # a plain timm ViT (or one of our encoders) brought as the teacher
        tower_sd, inferred = timm_tower(ck.state_dict, num_heads=ck.hints.get("num_heads"), **ck.tower_options)
    elif ck.tower is not None:
        tower_sd, inferred = ck.part("teacher.model." if ck.kind == "milan" else "model."), ck.tower
    else:
        raise CheckpointError(f"{ck.source}: this {ck.format} {ck.kind} checkpoint holds no teacher weights")
    spec = spec or inferred
    if grid_size:
        spec = dataclasses.replace(spec, img_size=grid_size * spec.patch_size)
    if resize_input:
        spec = dataclasses.replace(spec, resize_input=True)
    teacher = Teacher(build_tower(spec, tower_sd), input_norm=input_norm)
    teacher.source_format = ck.format  # type: ignore[assignment]  # recorded in the model spec of checkpoints
    return teacher


def build_tower(spec: TowerSpec, state_dict: StateDict) -> TimmVisionTransformer:
    """Builds the tower described by ``spec`` and loads ``state_dict`` strictly.

    The stored position table is resampled when ``spec.img_size`` differs from it; with ``spec.resize_input`` the
    tower also resizes inputs of another size to ``spec.img_size`` (:func:`~milan.checkpoint.arch.resize_to_tower`).

    Raises:
        CheckpointError: Missing, unexpected or mis-shaped keys (all named).
        TypeError: Not a timm ``VisionTransformer`` with standard blocks (e.g. EVA).
        ValueError: No class token (e.g. SigLIP).
    """
    with torch.device("meta"):
        skeleton = spec.build()
    _check_supported(skeleton)
    # timm's own filter converts/resamples for named models; ours resamples the position table for inferred ones.
    fit = checkpoint_filter_fn(dict(state_dict), skeleton) if spec.timm_name else fit_pos_embed(state_dict, spec)
    return build_strict(spec.build, fit, "teacher tower")


def _check_supported(model: nn.Module) -> None:
    if not isinstance(model, TimmVisionTransformer):
        raise TypeError(f"the teacher must be a timm VisionTransformer, got {type(model).__name__}")
    if model.cls_token is None:
        raise ValueError(
            "this tower has no class token (SigLIP-style); MILAN's attention masking needs the CLS query's "
            "attention, so it cannot be a teacher. Use a CLS-token model (CLIP, DINOv2, MAE/DeiT ViTs)."
        )
    last = model.blocks[-1]
    if not isinstance(last, Block):
        raise TypeError(
            f"the teacher's blocks are {type(last).__name__}, not timm ViT Blocks; MILAN computes the CLS attention "
            "from a standard Block's qkv (EVA-style RoPE blocks are not supported)"
        )
