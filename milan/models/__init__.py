"""MILAN models: encoder, teacher, decoders, the pretraining model and the variant factory."""

from milan.models.decoder import MAEDecoder, PromptingDecoder
from milan.models.factory import build_milan, create_model, list_models, model_config
from milan.models.milan import MILAN, MaskedStudent
from milan.models.teacher import Teacher
from milan.models.tower import TowerSpec, clip_vision_tower
from milan.models.vit import VIT_ARCHS, VisionTransformer

__all__ = [
    "MILAN",
    "VIT_ARCHS",
    "MAEDecoder",
    "MaskedStudent",
    "PromptingDecoder",
    "Teacher",
    "TowerSpec",
    "VisionTransformer",
    "build_milan",
    "clip_vision_tower",
    "create_model",
    "list_models",
    "model_config",
]
