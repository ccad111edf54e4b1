"""Checkpoint layouts, conversion and I/O: teachers in, official checkpoints in, backbones out, safely.

Entry points:

* :func:`read_checkpoint`: any supported file or folder -> :class:`Checkpoint` (our key names, detected format).
* :func:`load_teacher`: OpenAI (state dict or TorchScript archive), OpenCLIP, Hugging Face CLIP, timm ViTs.
* :func:`load_milan`, :func:`load_student`, :func:`load_encoder`, :func:`load_classifier`: our modules from
  mmpretrain / MMSelfSup, original MILAN / MAE, timm or our own checkpoints.
* :func:`export_timm`, :func:`export_hf`, :func:`save_canonical`: backbones out.
* :func:`safe_load`, :func:`atomic_save`: file I/O that never runs pickled code / never leaves partial files, and
  never allocates more than a file really holds.
* :class:`CheckpointError` (a file that cannot be used, one line) and :class:`CheckpointWarning` (a value the file
  does not record was assumed: which, why, and the option that sets it).
* :class:`ModelSpec`: what every checkpoint we write says about its model (:mod:`milan.checkpoint.spec`), and
  :func:`resolve_spec`, which completes it for files that carry none, naming each assumption.
"""

from milan.checkpoint.arch import DecoderArch, EncoderArch, TowerSpec, describe_tower
from milan.checkpoint.errors import CheckpointError, CheckpointWarning
from milan.checkpoint.export import Exported, export_hf, export_timm, save_canonical
from milan.checkpoint.formats import FORMATS, Checkpoint, read_checkpoint
from milan.checkpoint.io import atomic_save, safe_load, save_safetensors
from milan.checkpoint.keymaps import (
    encoder_to_hf_vit,
    hf_clip_to_timm,
    hf_vit_to_encoder,
    milan_orig_to_milan,
    mmpretrain_classifier_to_milan,
    mmpretrain_milan_to_milan,
    openai_clip_to_timm,
)
from milan.checkpoint.loaders import load_classifier, load_encoder, load_milan, load_student
from milan.checkpoint.spec import HeadSpec, ModelSpec, Preprocessing, TeacherSpec, resolve_spec
from milan.checkpoint.teachers import load_teacher, teacher_from_checkpoint
from milan.checkpoint.torchscript import read_torchscript

__all__ = [
    "FORMATS",
    "Checkpoint",
    "CheckpointError",
    "CheckpointWarning",
    "DecoderArch",
    "EncoderArch",
    "Exported",
    "HeadSpec",
    "ModelSpec",
    "Preprocessing",
    "TeacherSpec",
    "TowerSpec",
    "atomic_save",
    "describe_tower",
    "encoder_to_hf_vit",
    "export_hf",
    "export_timm",
    "hf_clip_to_timm",
    "hf_vit_to_encoder",
    "load_classifier",
    "load_encoder",
    "load_milan",
    "load_student",
    "load_teacher",
    "milan_orig_to_milan",
    "mmpretrain_classifier_to_milan",
    "mmpretrain_milan_to_milan",
    "openai_clip_to_timm",
    "read_checkpoint",
    "read_torchscript",
    "resolve_spec",
    "safe_load",
    "save_canonical",
    "save_safetensors",
    "teacher_from_checkpoint",
]
