"""Checkpoint files into our models and out of them: teachers in, official checkpoints in, backbones out, safely.

:class:`CheckpointError` is a file that cannot be used (one line); :class:`CheckpointWarning` a value the file does not
record was assumed (which, why, and the option that sets it).
"""

from milan.checkpoint.export import Exported, export_hf, export_timm, save_canonical
from milan.checkpoint.formats import Checkpoint, read_checkpoint, resolve_spec
from milan.checkpoint.io import atomic_save, safe_load, save_safetensors
from milan.checkpoint.keymaps import mmpretrain_milan_to_milan, openai_clip_to_timm
from milan.checkpoint.loaders import (
    load_classifier,
    load_encoder,
    load_milan,
    load_student,
    load_teacher,
    model_from_config,
    teacher_from_config,
)
from milan.checkpoint.spec import DecoderArch, EncoderArch, HeadSpec, ModelSpec, Preprocessing, TeacherSpec
from milan.errors import CheckpointError, CheckpointWarning
from milan.models.tower import describe_tower

__all__ = [
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
    "atomic_save",
    "describe_tower",
    "export_hf",
    "export_timm",
    "load_classifier",
    "load_encoder",
    "load_milan",
    "load_student",
    "load_teacher",
    "mmpretrain_milan_to_milan",
    "model_from_config",
    "openai_clip_to_timm",
    "read_checkpoint",
    "resolve_spec",
    "safe_load",
    "save_canonical",
    "save_safetensors",
    "teacher_from_config",
]
