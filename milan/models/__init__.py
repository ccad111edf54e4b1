"""MILAN models: encoder, teacher, decoders, the pretraining model and the variant factory."""

from milan.models.decoder import MAEDecoder, PromptBlock, PromptingDecoder
from milan.models.factory import (
    DecoderConfig,
    EncoderConfig,
    ModelConfig,
    TeacherConfig,
    build_milan,
    build_teacher,
    create_model,
    list_models,
    model_config,
)
from milan.models.milan import MILAN, MaskedStudent, MILANOutput
from milan.models.teacher import Teacher, TeacherOutput
from milan.models.tower import TowerSpec, build_tower, clip_vision_tower, describe_tower
from milan.models.vit import VIT_ARCHS, VisionTransformer

__all__ = [
    "MILAN",
    "VIT_ARCHS",
    "DecoderConfig",
    "EncoderConfig",
    "MAEDecoder",
    "MILANOutput",
    "MaskedStudent",
    "ModelConfig",
    "PromptBlock",
    "PromptingDecoder",
    "Teacher",
    "TeacherConfig",
    "TeacherOutput",
    "TowerSpec",
    "VisionTransformer",
    "build_milan",
    "build_teacher",
    "build_tower",
    "clip_vision_tower",
    "create_model",
    "describe_tower",
    "list_models",
    "model_config",
]
