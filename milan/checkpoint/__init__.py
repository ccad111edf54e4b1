"""Checkpoint files into our models and out of them: teachers in, official checkpoints in, backbones out, safely.

:class:`CheckpointError` is a file that cannot be used (one line); :class:`CheckpointWarning` a value the file does not
record was assumed (which, why, and the option that sets it).
"""

from milan.checkpoint.export import Exported, export_hf, export_timm, save_canonical
from milan.checkpoint.formats import FORMATS, Checkpoint, read_checkpoint, resolve_spec
from milan.checkpoint.io import atomic_save, read_torchscript, safe_load, save_safetensors
from milan.checkpoint.keymaps import (
    encoder_to_hf_vit,
    hf_clip_to_timm,
    hf_vit_to_encoder,
    milan_orig_to_milan,
    mmpretrain_classifier_to_milan,
    mmpretrain_milan_to_milan,
    openai_clip_to_timm,
)
from milan.checkpoint.loaders import (
    load_classifier,
    load_encoder,
    load_milan,
    load_student,
    load_teacher,
    model_from_config,
    teacher_from_checkpoint,
    teacher_from_config,
)
from milan.checkpoint.spec import DecoderArch, EncoderArch, HeadSpec, ModelSpec, Preprocessing, TeacherSpec
from milan.errors import CheckpointError, CheckpointWarning
from milan.models.tower import TowerSpec, describe_tower

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
    "model_from_config",
    "openai_clip_to_timm",
    "read_checkpoint",
    "read_torchscript",
    "resolve_spec",
    "safe_load",
    "save_canonical",
    "save_safetensors",
    "teacher_from_checkpoint",
    "teacher_from_config",
]
