"""milan-pretrain: MILAN masked-image pretraining of Vision Transformers, evaluation and export."""

from milan.models import MILAN, create_model, list_models

__version__ = "0.1.0"

__all__ = ["MILAN", "__version__", "create_model", "list_models"]
