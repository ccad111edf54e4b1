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
from milan.models.teacher import Teacher, TeacherOutput, clip_vision_tower
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
    "VisionTransformer",
    "build_milan",
    "build_teacher",
    "clip_vision_tower",
    "create_model",
    "list_models",
    "model_config",
]
